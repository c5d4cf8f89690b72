"""Multi-Plane Fusion: fuse thick-slice axial, coronal and sagittal series into one isotropic volume,
an editable "Bone" segmentation and a closed bone model.

The module only converts MRML nodes and calls the ``MultiPlaneFusionLib`` library, which holds every
algorithm and is tested outside Slicer. Python 3.9 syntax throughout (Slicer 5.8 ships Python 3.9).
"""

import logging
import os
import pathlib
import threading
import time
from typing import Annotated, Optional

import numpy as np
import qt
import SimpleITK as sitk
import slicer
import vtk
from slicer import vtkMRMLModelNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (
    Choice,
    FloatRange,
    RangeBounds,
    WithinRange,
    parameterNodeWrapper,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MultiPlaneFusionLib import slicer_boundary

README_URL = "https://github.com/multiplanefusion/SlicerMultiPlaneFusion#readme"

METHODS = ["srr", "average"]
EXTENTS = ["overlap", "union"]
REGULARIZERS = ["huber", "tikhonov"]
# The library's CT presets (MultiPlaneFusionLib/model/thresholds.py, kept in step by
# Testing/test_slicer_module_static.py), then a user range and the automatic (Otsu) threshold.
THRESHOLD_PRESETS = ["bone", "compact bone", "spongy bone", "teeth", "soft tissue", "skin", "custom", "automatic"]
ISLAND_MODES = ["largest", "all"]
SURFACE_METHODS = ["iso", "labelmap"]
EXPORT_SOURCES = ["model", "segment"]
EXPORT_FORMATS = ["STL", "OBJ"]
EXPORT_COORDINATES = ["LPS", "RAS"]

BONE_SEGMENT_NAME = "Bone"
# Slicer's GenericAnatomyColors "bone" (241, 214, 145).
BONE_COLOR = (241 / 255.0, 214 / 255.0, 145 / 255.0)
MODEL_COLOR = (0.90, 0.88, 0.80)
# Closed-surface conversion parameters of segmentations (vtkBinaryLabelmapToClosedSurfaceConversionRule).
SMOOTHING_FACTOR_PARAMETER = "Smoothing factor"
DECIMATION_FACTOR_PARAMETER = "Decimation factor"


#
# MultiPlaneFusion
#


class MultiPlaneFusion(ScriptedLoadableModule):
    """Module description shown in the module panel and the help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Multi-Plane Fusion")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Surface Models")]
        self.parent.dependencies = []
        self.parent.contributors = ["MultiPlaneFusion contributors"]
        self.parent.helpText = _(
            "Fuses thick-slice series of the same patient acquired in several planes (axial, coronal, "
            "sagittal, tilted or with gaps) into one sharp isotropic volume by super-resolution "
            "reconstruction, then thresholds the bone into an editable <b>Bone</b> segment and a closed, "
            "smooth surface model ready for 3D printing.<br><br>"
            "How to use: pick the series in <i>Inputs</i> (at least one; more planes give more detail), "
            "check the output spacing in <i>Reconstruction</i> and the threshold in <i>Bone model</i>, "
            "then click <i>Apply</i> (it turns into <i>Cancel</i> while running). Edit the segment in the "
            "Segment Editor if needed and save the model from <i>Export</i> (LPS by default, like Slicer)."
            '<br><br>See the <a href="{url}">documentation</a>.'
        ).format(url=README_URL)
        self.parent.acknowledgementText = _(
            "Developed by the MultiPlaneFusion contributors. The reconstruction follows the slice-to-volume "
            "super-resolution literature (NiftyMIC, SVRTK, MIALSRTK); the module layout follows the 3D Slicer "
            "scripted module template by Jean-Christophe Fillion-Robin (Kitware), Andras Lasso (PerkLab) and "
            "Steve Pieper (Isomics)."
        )


#
# MultiPlaneFusionParameterNode
#


@parameterNodeWrapper
class MultiPlaneFusionParameterNode:
    """Every setting of the module, saved with the scene.

    Inputs: axialVolume, coronalVolume, sagittalVolume and extraVolumes (any further series).
    Reconstruction: method ('srr' super-resolution or 'average'), spacingMm (0 = finest input pixel),
    extent ('overlap' of all series or 'union'), register (rigid alignment of the series),
    regularization (srr weight alpha in mm^2, 0 = the library's default), regularizer ('huber'
    edge-preserving, default, or 'tikhonov' smooth), memoryLimitGb.
    Bone model: buildModel, thresholdPreset (CT presets in HU, 'custom' uses thresholdRange,
    'automatic' = Otsu for MR), islands ('largest' or 'all' above minIslandMm3), fillCavities,
    removeThinMm, surfaceMethod ('iso' grey-level isosurface or 'labelmap' like Slicer), smoothing
    (Slicer's factor 0..1), decimation (fraction of triangles removed, 0 = none).
    Export: exportSource ('model' or 'segment'), exportFormat, exportCoordinates (LPS default),
    exportPath, exportAfterApply.
    Outputs: outputVolume, outputSegmentation, outputModel (created when empty).
    """

    axialVolume: vtkMRMLScalarVolumeNode
    coronalVolume: vtkMRMLScalarVolumeNode
    sagittalVolume: vtkMRMLScalarVolumeNode
    extraVolumes: list[vtkMRMLScalarVolumeNode]

    method: Annotated[str, Choice(METHODS)] = "srr"
    spacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    extent: Annotated[str, Choice(EXTENTS)] = "overlap"
    register: bool = True
    regularization: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    regularizer: Annotated[str, Choice(REGULARIZERS)] = "huber"
    memoryLimitGb: Annotated[float, WithinRange(0.5, 1024.0)] = 16.0

    buildModel: bool = True
    thresholdPreset: Annotated[str, Choice(THRESHOLD_PRESETS)] = "bone"
    thresholdRange: Annotated[FloatRange, RangeBounds(-3024.0, 10000.0)] = FloatRange(226.0, 3071.0)
    islands: Annotated[str, Choice(ISLAND_MODES)] = "largest"
    minIslandMm3: Annotated[float, WithinRange(0.0, 1.0e7)] = 0.0
    fillCavities: bool = False
    removeThinMm: Annotated[float, WithinRange(0.0, 50.0)] = 0.0
    surfaceMethod: Annotated[str, Choice(SURFACE_METHODS)] = "iso"
    smoothing: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    decimation: Annotated[float, WithinRange(0.0, 0.95)] = 0.0

    exportSource: Annotated[str, Choice(EXPORT_SOURCES)] = "model"
    exportFormat: Annotated[str, Choice(EXPORT_FORMATS)] = "STL"
    exportCoordinates: Annotated[str, Choice(EXPORT_COORDINATES)] = "LPS"
    exportPath: pathlib.Path = pathlib.Path.home() / "MultiPlaneFusion-bone.stl"
    exportAfterApply: bool = False

    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputModel: vtkMRMLModelNode


#
# Background execution
#


class BackgroundTask:
    """Runs a library call in a Python thread while the GUI stays responsive.

    Why a thread and not ``processEvents`` in the progress callback: the library reports progress once
    per iteration, which can be seconds apart on large grids, so the GUI would freeze between reports.
    The library is pure numpy/SimpleITK/VTK and never touches MRML or Qt, so it can run in a worker
    thread; every MRML update happens afterwards in the main thread (``onFinished``).

    Why the QTimer waits on the thread: whether the worker gets the Python GIL while Qt idles in
    its event loop depends on how PythonQt was built. Each timer tick therefore blocks in
    ``Thread.join(timeout)``, which releases the GIL, so the worker runs for at least
    ``JOIN_S / (JOIN_S + POLL_MS)`` of the time (about 80 %) even in the worst case, and the GUI handles
    events at least every ``JOIN_S``. Long single C++ calls that keep the GIL (a VTK filter's Update)
    still block the GUI for their duration.

    Parameters
    ----------
    function : callable(progress, cancel) -> result
        Runs in the worker; ``progress(stage_text, fraction)``; ``cancel`` is a ``threading.Event``.
    onProgress : callable(stage_text, fraction), main thread
    onFinished : callable(result, error), main thread; ``error`` is the exception or None.
    """

    POLL_MS = 20
    JOIN_S = 0.1

    def __init__(self, function, onProgress=None, onFinished=None):
        self.cancelEvent = threading.Event()
        self._function = function
        self._onProgress = onProgress
        self._onFinished = onFinished
        self._lock = threading.Lock()
        self._progress = None
        self._result = None
        self._error = None
        self._thread = threading.Thread(target=self._run, name="MultiPlaneFusion", daemon=True)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)

    def start(self):
        self._thread.start()
        self._timer.start()

    def cancel(self):
        """Ask the library to stop at its next progress report (it raises CancelledError)."""
        self.cancelEvent.set()

    def isRunning(self):
        return self._thread.is_alive() or self._timer.isActive()

    def wait(self, timeout=None):
        """Block until the worker ends (used at shutdown; the finished callback is not called)."""
        self._timer.stop()
        self._thread.join(timeout)

    def _report(self, stage, fraction):  # worker thread: no Qt, no MRML
        with self._lock:
            self._progress = (stage, fraction)

    def _run(self):
        try:
            self._result = self._function(self._report, self.cancelEvent)
        except BaseException as e:  # handed to the main thread, re-raised or shown there
            self._error = e

    def _poll(self):
        self._thread.join(self.JOIN_S)  # releases the GIL: the worker's time slice
        with self._lock:
            progress, self._progress = self._progress, None
        if progress is not None and self._onProgress:
            self._onProgress(*progress)
        if not self._thread.is_alive():
            self._timer.stop()
            if self._onFinished:
                self._onFinished(self._result, self._error)


#
# MultiPlaneFusionWidget
#


class MultiPlaneFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: binds the .ui to the parameter node, runs the logic in the background."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._job = None
        self._updatingGUI = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MultiPlaneFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level widget's mrmlSceneChanged signal to every MRML widget.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MultiPlaneFusionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentationButton)
        # The checkable combo box has no parameter-node connector: it is synchronised by hand.
        self.ui.extraVolumesSelector.connect("checkedNodesChanged()", self.onExtraVolumesChanged)
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = ""

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task.wait(30.0)
            self._task = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None:
            # The results would land in a closed scene: stop and drop them.
            self._task.cancel()
            self._job = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.axialVolume:
            # Pre-select the series by their slice orientation to save the user a few clicks.
            guesses = self.logic.guessPlaneVolumes()
            for role in ("axialVolume", "coronalVolume", "sagittalVolume"):
                if guesses.get(role) and not getattr(self._parameterNode, role):
                    setattr(self._parameterNode, role, guesses[role])

    def setParameterNode(self, inputParameterNode: Optional[MultiPlaneFusionParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateExtraVolumesSelector()
        self._updateEnabledState()

    def _updateExtraVolumesSelector(self) -> None:
        if not self._parameterNode:
            return
        wanted = {n.GetID() for n in self._parameterNode.extraVolumes if n is not None}
        combo = self.ui.extraVolumesSelector
        self._updatingGUI = True
        try:
            for index in range(combo.nodeCount()):
                node = combo.nodeFromIndex(index)
                state = qt.Qt.Checked if node.GetID() in wanted else qt.Qt.Unchecked
                if combo.checkState(node) != state:
                    combo.setCheckState(node, state)
        finally:
            self._updatingGUI = False

    def onExtraVolumesChanged(self) -> None:
        if self._updatingGUI or not self._parameterNode:
            return
        self._parameterNode.extraVolumes = list(self.ui.extraVolumesSelector.checkedNodes())

    def _updateEnabledState(self) -> None:
        p = self._parameterNode
        running = self._task is not None
        for section in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.reconstructionCollapsibleButton, self.ui.boneModelCollapsibleButton,
                        self.ui.exportCollapsibleButton):
            section.enabled = not running
        if not p:
            self.ui.applyButton.enabled = False
            return
        self.ui.regularizationSpinBox.enabled = p.method == "srr"
        self.ui.regularizerComboBox.enabled = p.method == "srr"
        modelWidgets = (self.ui.thresholdPresetComboBox, self.ui.thresholdRangeWidget, self.ui.islandsComboBox,
                        self.ui.minIslandSpinBox, self.ui.fillCavitiesCheckBox, self.ui.removeThinSpinBox,
                        self.ui.surfaceMethodComboBox, self.ui.smoothingSliderWidget,
                        self.ui.decimationSliderWidget, self.ui.outputSegmentationSelector,
                        self.ui.outputModelSelector)
        for w in modelWidgets:
            w.enabled = p.buildModel
        self.ui.thresholdRangeWidget.enabled = p.buildModel and p.thresholdPreset == "custom"
        self.ui.minIslandSpinBox.enabled = p.buildModel and p.islands == "all"
        self.ui.editSegmentationButton.enabled = p.outputSegmentation is not None and not running
        self.ui.exportButton.enabled = not running and (
            p.outputModel is not None if p.exportSource == "model" else p.outputSegmentation is not None
        )
        inputs = [v for v in (p.axialVolume, p.coronalVolume, p.sagittalVolume) if v] + [
            v for v in p.extraVolumes if v
        ]
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the fusion; nothing is changed in the scene")
            self.ui.applyButton.enabled = not self._task.cancelEvent.is_set()
        elif inputs:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.toolTip = _("Fuse the selected series and build the bone model")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.toolTip = _("Select at least one input series")
            self.ui.applyButton.enabled = False

    # ------------------------------------------------------------------------------- running
    def onApplyButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self._updateEnabledState()
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Cannot start the fusion."), waitCursor=True):
                job = self.logic.prepareFromParameterNode(self._parameterNode)
        except Exception:
            return  # already shown to the user and logged
        self._job = job
        self._task = BackgroundTask(
            lambda progress, cancel: self.logic.compute(job, progress, cancel),
            self._onTaskProgress,
            self._onTaskFinished,
        )
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("Starting...")
        self._task.start()
        self._updateEnabledState()

    def _onTaskProgress(self, stage, fraction) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = stage

    def _onTaskFinished(self, result, error) -> None:
        job, self._job, self._task = self._job, None, None
        self.ui.progressBar.setVisible(False)
        try:
            if job is None:
                self.ui.statusLabel.text = _("Stopped: the scene was closed.")
            elif error is not None and self.logic.isCancellation(error):
                self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            elif error is not None:
                self.ui.statusLabel.text = _("Failed: {message}").format(message=str(error))
                slicer.util.errorDisplay(_("Fusion failed.") + "\n\n" + str(error),
                                         detailedText=self.logic.describeError(error))
            else:
                with slicer.util.tryWithErrorDisplay(_("Failed to show the results."), waitCursor=True):
                    self.logic.publish(job)
                    p = self._parameterNode
                    if p:
                        self.logic.storeOutputs(p, job)
                    self.ui.statusLabel.text = self.logic.describeResult(job)
                    if p and p.exportAfterApply:
                        self.onExportButton()
        except Exception:
            logging.exception("MultiPlaneFusion: showing the results failed")
        finally:
            self._updateEnabledState()

    def onExportButton(self) -> None:
        p = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
                report = self.logic.exportModel(
                    p.exportPath,
                    source=p.exportSource,
                    modelNode=p.outputModel,
                    segmentationNode=p.outputSegmentation,
                    fileFormat=p.exportFormat,
                    coordinates=p.exportCoordinates,
                )
        except Exception:
            return
        self.ui.statusLabel.text = _("Wrote {path} ({triangles} triangles, {closed}, {space}).").format(
            path=report["path"], triangles=report["triangles"],
            closed=_("closed") if report["closed"] else _("NOT closed"), space=report["space"])

    def onEditSegmentationButton(self) -> None:
        p = self._parameterNode
        if not p or not p.outputSegmentation:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(p.outputSegmentation)
        if p.outputVolume:
            editor.setSourceVolumeNode(p.outputVolume)


#
# MultiPlaneFusionJob
#


class MultiPlaneFusionJob:
    """One run: the inputs converted for the library, the settings, and the results.

    Created in the main thread by :meth:`MultiPlaneFusionLogic.prepare`; :meth:`~MultiPlaneFusionLogic.compute`
    fills ``fusion`` and ``model`` (any thread, library only); :meth:`~MultiPlaneFusionLogic.publish`
    writes them into the nodes (main thread).
    """

    def __init__(self):
        self.inputNodes = []
        self.stacks = []
        self.modality = "CT"
        self.fuseOptions = None
        self.modelOptions = None  # None: no model
        self.outputVolumeNode = None
        self.segmentationNode = None
        self.modelNode = None
        self.createSegmentation = True
        self.createModel = True
        self.smoothing = 0.5
        self.decimation = 0.0
        self.exportPath = None
        self.exportSource = "model"
        self.exportFormat = None
        self.exportCoordinates = "LPS"
        self.showResult = True
        self.fusion = None
        self.model = None
        self.segmentId = None
        self.exportReport = None
        self.timings = {}

    @property
    def summary(self):
        """The library's fusion summary plus the model report (JSON-ready dict)."""
        out = dict(self.fusion.summary) if self.fusion is not None else {}
        if self.model is not None:
            out["model"] = self.model.report
        if self.exportReport is not None:
            out["export"] = self.exportReport
        out["module_timings_s"] = dict(self.timings)
        return out


#
# MultiPlaneFusionLogic
#


class MultiPlaneFusionLogic(ScriptedLoadableModuleLogic):
    """Converts nodes for the library, runs it, and turns its results into nodes and files.

    Use it from the Python console without the GUI::

        logic = slicer.util.getModuleLogic("MultiPlaneFusion")  # or MultiPlaneFusionLogic()
        job = logic.process(axialNode, coronalNode, sagittalNode, None, spacingMm=0.5,
                            exportPath="/tmp/bone.stl")
        job.outputVolumeNode, job.segmentationNode, job.modelNode, job.summary
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MultiPlaneFusionParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------- console entry point
    def process(
        self,
        axialVolumeNode,
        coronalVolumeNode=None,
        sagittalVolumeNode=None,
        outputVolumeNode=None,
        extraVolumeNodes=None,
        method="srr",
        spacingMm=None,
        extent="overlap",
        register=True,
        regularization=None,
        regularizer="huber",
        memoryLimitGb=16.0,
        buildModel=True,
        thresholdPreset="bone",
        thresholdRange=None,
        islands="largest",
        minIslandMm3=0.0,
        fillCavities=False,
        removeThinMm=0.0,
        surfaceMethod="iso",
        smoothing=0.5,
        decimation=0.0,
        segmentationNode=None,
        modelNode=None,
        createSegmentation=True,
        createModel=True,
        exportPath=None,
        exportSource="model",
        exportFormat=None,
        exportCoordinates="LPS",
        showResult=True,
        progressCallback=None,
        cancel=None,
    ):
        """Fuse the series, build the bone model, show and optionally export it (synchronously).

        Parameters
        ----------
        axialVolumeNode, coronalVolumeNode, sagittalVolumeNode : vtkMRMLScalarVolumeNode or None
            The series; at least one input (these or ``extraVolumeNodes``) is needed. The first given
            is the reference: its axes orient the fused volume and the others register to it.
        outputVolumeNode : vtkMRMLScalarVolumeNode or None
            Receives the fused volume; None creates "Fused volume".
        extraVolumeNodes : list of vtkMRMLScalarVolumeNode
            More series (oblique, tilted, repeated).
        method : 'srr' or 'average'
        spacingMm : float or None
            Isotropic output spacing; None or 0 = the finest input pixel spacing.
        extent : 'overlap' or 'union'
        register : bool
            Rigid registration of the series to the reference before (and with srr during) fusion.
        regularization : float or None
            Weight alpha of the srr regulariser (mm^2, scale-invariant); None or 0 = the library's default.
        regularizer : 'huber' or 'tikhonov'
            Edge-preserving (Huber, default) or smooth (first-order Tikhonov) srr prior.
        memoryLimitGb : float
        buildModel : bool
            False stops after the fused volume.
        thresholdPreset : str
            One of ``THRESHOLD_PRESETS``; 'custom' uses ``thresholdRange``; 'automatic' is Otsu (MR).
        thresholdRange : (float, float)
        islands, minIslandMm3, fillCavities, removeThinMm : mask clean-up (see the library's ModelOptions)
        surfaceMethod : 'iso' or 'labelmap'
        smoothing : float in [0, 1]
            Slicer's smoothing factor, for the library's model and the segment's closed surface.
        decimation : float in [0, 1)
            Fraction of triangles removed (0 = none).
        segmentationNode, modelNode : existing nodes to update, or None to create them
        createSegmentation, createModel : bool
            Whether to create/update the "Bone" segmentation and the model node.
        exportPath : str or None
            Write the model (or segment, ``exportSource``) there after the run.
        exportFormat : 'STL' or 'OBJ' or None (from the path's extension)
        exportCoordinates : 'LPS' (default, like Slicer) or 'RAS'
        showResult : bool
            Show the fused volume in the slice views.
        progressCallback : callable(stageText, fraction)
        cancel : callable returning True, or an object with is_set(), to stop the run

        Returns
        -------
        MultiPlaneFusionJob
            With outputVolumeNode, segmentationNode, modelNode, segmentId, summary.

        Raises
        ------
        ValueError
            Bad input or settings (a one-line message).
        MultiPlaneFusionLib.errors.CancelledError
            When ``cancel`` fired; the scene is unchanged.
        """
        job = self.prepare(
            axialVolumeNode, coronalVolumeNode, sagittalVolumeNode, outputVolumeNode, extraVolumeNodes,
            method=method, spacingMm=spacingMm, extent=extent, register=register, regularization=regularization,
            regularizer=regularizer, memoryLimitGb=memoryLimitGb, buildModel=buildModel,
            thresholdPreset=thresholdPreset, thresholdRange=thresholdRange, islands=islands,
            minIslandMm3=minIslandMm3, fillCavities=fillCavities,
            removeThinMm=removeThinMm, surfaceMethod=surfaceMethod, smoothing=smoothing, decimation=decimation,
            segmentationNode=segmentationNode, modelNode=modelNode, createSegmentation=createSegmentation,
            createModel=createModel, exportPath=exportPath, exportSource=exportSource, exportFormat=exportFormat,
            exportCoordinates=exportCoordinates, showResult=showResult,
        )
        self.compute(job, progressCallback or self._logProgress, cancel)
        self.publish(job)
        return job

    def processParameterNode(self, parameterNode, progressCallback=None, cancel=None):
        """:meth:`process` with every setting taken from a :class:`MultiPlaneFusionParameterNode`."""
        job = self.prepareFromParameterNode(parameterNode)
        self.compute(job, progressCallback or self._logProgress, cancel)
        self.publish(job)
        self.storeOutputs(parameterNode, job)
        return job

    @staticmethod
    def storeOutputs(parameterNode, job):
        """Remember the output nodes so the next run updates them instead of adding new ones (a run
        without a model leaves the segmentation and model selections alone)."""
        parameterNode.outputVolume = job.outputVolumeNode
        if job.segmentationNode is not None:
            parameterNode.outputSegmentation = job.segmentationNode
        if job.modelNode is not None:
            parameterNode.outputModel = job.modelNode

    # ------------------------------------------------------------------------------ step 1: prepare
    def prepareFromParameterNode(self, p):
        if p is None:
            raise ValueError(_("No parameter node"))
        export = p.exportPath if p.exportAfterApply else None
        return self.prepare(
            p.axialVolume, p.coronalVolume, p.sagittalVolume, p.outputVolume, list(p.extraVolumes),
            method=p.method, spacingMm=p.spacingMm, extent=p.extent, register=p.register,
            regularization=p.regularization, regularizer=p.regularizer, memoryLimitGb=p.memoryLimitGb,
            buildModel=p.buildModel,
            thresholdPreset=p.thresholdPreset,
            thresholdRange=(p.thresholdRange.minimum, p.thresholdRange.maximum),
            islands=p.islands, minIslandMm3=p.minIslandMm3, fillCavities=p.fillCavities,
            removeThinMm=p.removeThinMm, surfaceMethod=p.surfaceMethod, smoothing=p.smoothing,
            decimation=p.decimation, segmentationNode=p.outputSegmentation, modelNode=p.outputModel,
            exportPath=export, exportSource=p.exportSource, exportFormat=p.exportFormat,
            exportCoordinates=p.exportCoordinates,
        )

    def prepare(self, axialVolumeNode, coronalVolumeNode=None, sagittalVolumeNode=None, outputVolumeNode=None,
                extraVolumeNodes=None, **settings):
        """Validate the inputs and convert them for the library (main thread; raises ValueError).

        ``settings`` are the keyword arguments of :meth:`process` after ``extraVolumeNodes``.
        """
        from MultiPlaneFusionLib.errors import MultiPlaneFusionError

        job = MultiPlaneFusionJob()
        nodes = [n for n in (axialVolumeNode, coronalVolumeNode, sagittalVolumeNode) if n is not None]
        nodes += [n for n in (extraVolumeNodes or []) if n is not None]
        if not nodes:
            raise ValueError(_("Select at least one input volume (axial, coronal, sagittal or extra)."))
        ids = [n.GetID() for n in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(_("The same volume is selected twice as an input."))
        if outputVolumeNode is not None and outputVolumeNode.GetID() in ids:
            raise ValueError(_("The output volume is one of the inputs: choose another output or create a new one."))
        job.inputNodes = nodes
        try:
            job.stacks = [self.stackFromVolumeNode(n) for n in nodes]
            self._applySettings(job, settings)
        except MultiPlaneFusionError as e:
            raise ValueError(str(e)) from e
        job.outputVolumeNode = outputVolumeNode
        return job

    def _applySettings(self, job, s):
        from MultiPlaneFusionLib.model import ModelOptions
        from MultiPlaneFusionLib.pipeline import FuseOptions
        from MultiPlaneFusionLib.writing import check_writable

        method = s.get("method", "srr")
        if method not in METHODS:
            raise ValueError(_("Unknown method '{method}': use one of {choices}.").format(
                method=method, choices=", ".join(METHODS)))
        spacing = s.get("spacingMm") or None
        if spacing is not None and not spacing > 0:
            raise ValueError(_("The output spacing must be positive (or 0 for automatic)."))
        job.modality = "CT" if all(st.modality == "CT" for st in job.stacks) else job.stacks[0].modality
        srr = self._srrOptions(s.get("regularization"), s.get("regularizer", "huber")) if method == "srr" else None
        job.fuseOptions = FuseOptions(
            method=method,
            spacing_mm=spacing,
            extent=s.get("extent", "overlap"),
            reference=0,
            register=bool(s.get("register", True)) and len(job.stacks) > 1,
            memory_limit_gb=float(s.get("memoryLimitGb", 16.0)),
            srr=srr,
        )
        job.showResult = bool(s.get("showResult", True))
        if s.get("buildModel", True):
            preset = s.get("thresholdPreset", "bone")
            if preset not in THRESHOLD_PRESETS:
                raise ValueError(_("Unknown threshold preset '{preset}'.").format(preset=preset))
            threshold = None
            if preset == "custom":
                rng = s.get("thresholdRange")
                if rng is None or len(rng) != 2 or not float(rng[0]) < float(rng[1]):
                    raise ValueError(_("A custom threshold needs a range with lower < upper."))
                threshold = (float(rng[0]), float(rng[1]))
            elif preset != "automatic" and job.modality != "CT":
                raise ValueError(
                    _("The inputs are not CT (modality {modality}): HU presets do not apply. Choose the 'custom' "
                      "or 'automatic' threshold.").format(modality=job.modality))
            job.smoothing = float(s.get("smoothing", 0.5))
            job.decimation = float(s.get("decimation", 0.0) or 0.0)
            job.modelOptions = ModelOptions(
                preset=preset if preset not in ("custom", "automatic") else "bone",
                threshold=threshold,
                auto_threshold=preset == "automatic",
                islands=s.get("islands", "largest"),
                min_island_mm3=float(s.get("minIslandMm3", 0.0)),
                fill_cavities=bool(s.get("fillCavities", False)),
                remove_thin_mm=float(s.get("removeThinMm", 0.0)),
                surface_method=s.get("surfaceMethod", "iso"),
                smoothing=job.smoothing,
                decimate=job.decimation if job.decimation > 0 else None,
                ras=False,
            )
            job.segmentationNode = s.get("segmentationNode")
            job.modelNode = s.get("modelNode")
            job.createSegmentation = bool(s.get("createSegmentation", True))
            job.createModel = bool(s.get("createModel", True))
        job.exportSource = s.get("exportSource", "model")
        if job.exportSource not in EXPORT_SOURCES:
            raise ValueError(_("Export source must be 'model' or 'segment'."))
        job.exportCoordinates = s.get("exportCoordinates", "LPS")
        if job.exportCoordinates not in EXPORT_COORDINATES:
            raise ValueError(_("Export coordinates must be 'LPS' or 'RAS'."))
        if s.get("exportPath"):
            if job.modelOptions is None:
                raise ValueError(_("Export needs the bone model: turn 'Build bone model' on."))
            job.exportFormat = s.get("exportFormat")
            job.exportPath = self.exportFilePath(s["exportPath"], job.exportFormat)
            check_writable(job.exportPath)  # fail now, not after minutes of work

    @staticmethod
    def _srrOptions(regularization=None, regularizer="huber"):
        """The library's SRR options from the user's prior (None when everything is the default)."""
        if regularizer not in REGULARIZERS:
            raise ValueError(_("Unknown regularizer '{name}': use tikhonov or huber.").format(name=regularizer))
        if not regularization and regularizer == "huber":
            return None  # the library's defaults
        from MultiPlaneFusionLib.reconstruction.srr import SrrOptions

        settings = {"regularizer": regularizer}
        if regularization:
            settings["alpha"] = float(regularization)
        return SrrOptions(**settings)

    def stackFromVolumeNode(self, volumeNode):
        """A library stack (LPS, per-slice geometry) from a scalar volume node, parent transform included.

        A linear parent transform is composed with IJK-to-RAS; a non-linear one (the acquisition
        transform Slicer adds to a gantry-tilted series) is evaluated at every slice's corners, which
        recovers the true tilted slice positions without resampling (see ``slicer_boundary``).
        """
        if volumeNode is None:
            raise ValueError(_("No volume"))
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode") or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(_("'{name}' is not a scalar (grey-level) volume.").format(name=volumeNode.GetName()))
        if volumeNode.GetImageData() is None:
            raise ValueError(_("'{name}' has no voxels.").format(name=volumeNode.GetName()))
        array = slicer.util.arrayFromVolume(volumeNode)
        if array.ndim != 3:
            raise ValueError(_("'{name}' is not a 3-D scalar volume.").format(name=volumeNode.GetName()))
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        worldFromRAS = None
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None:
            if transformNode.IsTransformToWorldLinear():
                matrix = vtk.vtkMatrix4x4()
                transformNode.GetMatrixTransformToWorld(matrix)
                worldFromRAS = slicer.util.arrayFromVTKMatrix(matrix)
            else:
                transform = vtk.vtkGeneralTransform()
                transformNode.GetTransformToWorld(transform)

                def worldFromRAS(points, transform=transform):
                    return np.array([transform.TransformPoint(p) for p in points])

        info = self._dicomInfo(volumeNode)
        from MultiPlaneFusionLib.reading.volume_file import guess_modality

        # Loaded DICOM series have their slices along k; other files may store them on any axis.
        return slicer_boundary.stack_from_volume(
            np.array(array, dtype=np.float32),
            slicer.util.arrayFromVTKMatrix(ijkToRAS),
            world_from_ras=worldFromRAS,
            thickness_mm=info.get("thickness"),
            slice_axis="k" if info else "auto",
            modality=guess_modality(array, info.get("modality")),
            description=volumeNode.GetName(),
            series_uid=info.get("seriesUID", ""),
            frame_of_reference_uid=info.get("frameOfReferenceUID", ""),
            source=volumeNode.GetID(),
        )

    @staticmethod
    def _dicomInfo(volumeNode):
        """Slice thickness, modality and UIDs from the DICOM database, when the volume came from DICOM."""
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return {}
        info = {}
        try:
            uid = uids[0]
            thickness = database.instanceValue(uid, "0018,0050").strip()
            if thickness:
                info["thickness"] = float(thickness)
            info["modality"] = database.instanceValue(uid, "0008,0060").strip() or None
            info["seriesUID"] = database.instanceValue(uid, "0020,000E").strip()
            info["frameOfReferenceUID"] = database.instanceValue(uid, "0020,0052").strip()
        except Exception:  # a database without these files: fall back to the geometry
            logging.debug("MultiPlaneFusion: no DICOM details for %s", volumeNode.GetName(), exc_info=True)
        return info

    def guessPlaneVolumes(self):
        """{'axialVolume': node, 'coronalVolume': node, 'sagittalVolume': node} by slice orientation."""
        from MultiPlaneFusionLib.stack import orientation_label

        found = {}
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetImageData() is None:
                continue
            m = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(m)
            cols = slicer_boundary.flip_index_matrix(slicer.util.arrayFromVTKMatrix(m))[:3, :3]
            label = orientation_label(np.cross(cols[:, 0], cols[:, 1]))
            role = {"axial": "axialVolume", "coronal": "coronalVolume", "sagittal": "sagittalVolume"}.get(label)
            if role and role not in found:
                found[role] = node
        return found

    # ------------------------------------------------------------------------------ step 2: compute
    def compute(self, job, progress=None, cancel=None):
        """Run the library on the prepared job: fusion, then the model. Touches no MRML or Qt, so it
        may run in a worker thread. ``progress(stageText, fraction)`` gets the overall fraction."""
        from MultiPlaneFusionLib.errors import CancelledError, MultiPlaneFusionError
        from MultiPlaneFusionLib.model import build_model
        from MultiPlaneFusionLib.pipeline import fuse_stacks

        mapper = _ProgressMapper(progress, job.fuseOptions.register, job.modelOptions is not None)
        try:
            t = time.perf_counter()
            job.fusion = fuse_stacks(job.stacks, job.fuseOptions, mapper.fusion, cancel)
            job.timings["fuse_s"] = time.perf_counter() - t
            if job.modelOptions is not None:
                t = time.perf_counter()
                job.model = build_model(job.fusion.image, job.modelOptions, job.modality, mapper.model, cancel)
                job.timings["model_s"] = time.perf_counter() - t
        except CancelledError:
            raise
        except MultiPlaneFusionError as e:
            raise ValueError(str(e)) from e
        mapper.done()
        return job

    # ------------------------------------------------------------------------------ step 3: publish
    def publish(self, job):
        """Write the results into MRML nodes (main thread), then export if asked."""
        t = time.perf_counter()
        with slicer.util.RenderBlocker():
            self._publishVolume(job)
            if job.model is not None:
                if job.createSegmentation:
                    self._publishSegmentation(job)
                if job.createModel:
                    self._publishModel(job)
        if job.showResult:
            slicer.util.setSliceViewerLayers(background=job.outputVolumeNode, fit=True)
        job.timings["publish_s"] = time.perf_counter() - t
        if job.exportPath:
            job.exportReport = self.exportModel(
                job.exportPath, source=job.exportSource, modelNode=job.modelNode,
                segmentationNode=job.segmentationNode, fileFormat=job.exportFormat,
                coordinates=job.exportCoordinates,
            )
        logging.info("MultiPlaneFusion: %s", self.describeResult(job))
        return job

    @staticmethod
    def _alive(node):
        return node is not None and slicer.mrmlScene.IsNodePresent(node)

    def _publishVolume(self, job):
        from MultiPlaneFusionLib.grid import grid_from_image

        image = job.fusion.image
        array = sitk.GetArrayFromImage(image)
        node = job.outputVolumeNode if self._alive(job.outputVolumeNode) else None
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(_("Fused volume")))
        # The geometry is exact in world coordinates: a parent transform would move it.
        node.SetAndObserveTransformNodeID(None)
        slicer.util.updateVolumeFromArray(node, array)
        ijkToRAS = slicer_boundary.ijk_to_ras_from_grid(grid_from_image(image))
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            window, level = slicer_boundary.display_window_level(array, job.modality)
            display.AutoWindowLevelOff()
            display.SetWindowLevel(window, level)
        node.SetAttribute("MultiPlaneFusion.method", job.fuseOptions.method)
        job.outputVolumeNode = node

    def _publishSegmentation(self, job):
        from MultiPlaneFusionLib.grid import grid_from_image

        seg = job.segmentationNode if self._alive(job.segmentationNode) else None
        if seg is None:
            seg = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(_("Bone segmentation")))
        # Display nodes first: the Segment Editor's effects ask about hidden segments otherwise.
        seg.CreateDefaultDisplayNodes()
        seg.SetAndObserveTransformNodeID(None)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(job.outputVolumeNode)
        segmentation = seg.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName(BONE_SEGMENT_NAME)
        if not segmentId:
            segmentId = segmentation.AddEmptySegment("", BONE_SEGMENT_NAME, list(BONE_COLOR))
        mask = job.model.mask
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MultiPlaneFusionMask__")
        try:
            slicer.util.updateVolumeFromArray(labelmap, sitk.GetArrayFromImage(mask).astype(np.uint8))
            ijkToRAS = slicer_boundary.ijk_to_ras_from_grid(grid_from_image(mask))
            labelmap.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
            segmentIds = vtk.vtkStringArray()
            segmentIds.InsertNextValue(segmentId)  # label 1 -> the Bone segment (replaces its content)
            if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, seg, segmentIds):
                raise RuntimeError(_("Importing the bone mask into the segmentation failed."))
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)
        segmentation.SetConversionParameter(SMOOTHING_FACTOR_PARAMETER, f"{job.smoothing:g}")
        segmentation.SetConversionParameter(DECIMATION_FACTOR_PARAMETER, f"{job.decimation:g}")
        # Re-create the surface so the new labelmap and parameters are used; it shows the segment in 3D.
        seg.RemoveClosedSurfaceRepresentation()
        seg.CreateClosedSurfaceRepresentation()
        display = seg.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility3D(True)
        job.segmentationNode = seg
        job.segmentId = segmentId

    def _publishModel(self, job):
        model = job.modelNode if self._alive(job.modelNode) else None
        if model is None:
            model = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLModelNode", slicer.mrmlScene.GenerateUniqueName(_("Bone model")))
        model.SetAndObserveTransformNodeID(None)
        model.SetAndObservePolyData(slicer_boundary.flip_polydata(job.model.polydata))  # LPS -> RAS
        model.CreateDefaultDisplayNodes()
        display = model.GetDisplayNode()
        if display is not None:
            display.SetColor(*MODEL_COLOR)
            display.SetScalarVisibility(False)
            display.SetVisibility2D(True)  # its outline in the slice views
            # Both surfaces in 3D would overlap: the editable segment is shown, the model when alone.
            display.SetVisibility3D(job.segmentationNode is None)
        model.SetAttribute("MultiPlaneFusion.surfaceMethod", job.modelOptions.surface_method)
        job.modelNode = model

    # ---------------------------------------------------------------------------------------- export
    @staticmethod
    def exportFilePath(path, fileFormat=None):
        """``path`` with the extension of ``fileFormat`` ('STL'/'OBJ'); the format from the path if None."""
        path = os.fspath(path).strip()
        if not path or path == ".":
            raise ValueError(_("Choose a file to export to."))
        root, ext = os.path.splitext(path)
        if fileFormat is None:
            if ext.lower() not in (".stl", ".obj"):
                raise ValueError(_("Cannot tell the format of '{path}': use .stl or .obj.").format(path=path))
            return path
        if fileFormat.upper() not in EXPORT_FORMATS:
            raise ValueError(_("Unsupported export format '{fmt}': use STL or OBJ.").format(fmt=fileFormat))
        wanted = "." + fileFormat.lower()
        if ext.lower() == wanted:
            return path
        return (root if ext.lower() in (".stl", ".obj") else path) + wanted

    def exportModel(self, path, source="model", modelNode=None, segmentationNode=None, segmentId=None,
                    fileFormat=None, coordinates="LPS"):
        """Write the model node's or the Bone segment's closed surface (world coordinates) to a file.

        ``coordinates`` 'LPS' (default; what Slicer writes) or 'RAS'. Returns the library's mesh
        report of the written file (triangles, closed, volume, path, space...). Raises ValueError.
        """
        from MultiPlaneFusionLib.errors import MultiPlaneFusionError
        from MultiPlaneFusionLib.model import write_model

        path = self.exportFilePath(path, fileFormat)
        if coordinates not in EXPORT_COORDINATES:
            raise ValueError(_("Export coordinates must be 'LPS' or 'RAS'."))
        if source == "model":
            if modelNode is None or modelNode.GetPolyData() is None:
                raise ValueError(_("There is no model to export: run Apply first."))
            polyRAS = self._worldPolyData(modelNode)
        elif source == "segment":
            if segmentationNode is None:
                raise ValueError(_("There is no segmentation to export: run Apply first."))
            if not segmentId:
                segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(BONE_SEGMENT_NAME)
            if not segmentId:
                raise ValueError(_("The segmentation has no '{name}' segment.").format(name=BONE_SEGMENT_NAME))
            polyRAS = vtk.vtkPolyData()
            ok = slicer.modules.segmentations.logic().GetSegmentClosedSurfaceRepresentation(
                segmentationNode, segmentId, polyRAS, True)
            if not ok or polyRAS.GetNumberOfPoints() == 0:
                raise ValueError(_("The '{name}' segment is empty.").format(name=BONE_SEGMENT_NAME))
        else:
            raise ValueError(_("Export source must be 'model' or 'segment'."))
        try:
            return write_model(slicer_boundary.flip_polydata(polyRAS), path, ras=(coordinates == "RAS"))
        except MultiPlaneFusionError as e:
            raise ValueError(str(e)) from e

    @staticmethod
    def _worldPolyData(modelNode):
        """The model's mesh in world RAS (its parent transform applied, as Slicer's exporters do)."""
        poly = modelNode.GetPolyData()
        transformNode = modelNode.GetParentTransformNode()
        if transformNode is None:
            return poly
        transform = vtk.vtkGeneralTransform()
        transformNode.GetTransformToWorld(transform)
        f = vtk.vtkTransformPolyDataFilter()
        f.SetInputData(poly)
        f.SetTransform(transform)
        f.Update()
        return f.GetOutput()

    # --------------------------------------------------------------------------------------- reports
    @staticmethod
    def isCancellation(error):
        from MultiPlaneFusionLib.errors import CancelledError

        return isinstance(error, CancelledError)

    @staticmethod
    def describeError(error):
        import traceback

        return "".join(traceback.format_exception(type(error), error, error.__traceback__))

    @staticmethod
    def describeResult(job):
        """One status line: grid, method, model size and closedness, export."""
        parts = []
        if job.fusion is not None:
            size = "x".join(str(v) for v in job.fusion.grid.shape[::-1])
            parts.append(_("Fused {n} series ({method}) into {size} voxels of {spacing:.2f} mm").format(
                n=len(job.stacks), method=job.fuseOptions.method, size=size,
                spacing=float(job.fusion.grid.spacing_mm[0])))
        if job.model is not None:
            r = job.model.report
            parts.append(_("bone model {triangles} triangles, {closed}").format(
                triangles=r.get("triangles", 0), closed=_("closed") if r.get("closed") else _("NOT closed")))
        if job.exportReport is not None:
            parts.append(_("written to {path}").format(path=job.exportReport.get("path")))
        seconds = sum(job.timings.values())
        return "; ".join(parts) + _(" ({seconds:.1f} s).").format(seconds=seconds)

    @staticmethod
    def _logProgress(stage, fraction):
        logging.info("MultiPlaneFusion: %s (%d%%)", stage, int(round(100 * fraction)))


class _ProgressMapper:
    """Maps the library's (stage, fraction) reports onto one overall fraction and a readable text.

    The fusion takes the first 85 % when a model follows (registration its first 30 % when on), the
    model the rest (segmentation 40 %, surface 60 %). The overall fraction never decreases. Called from
    the worker thread; it only forwards numbers and strings.
    """

    LABELS = {
        "register": _("Registering series"),
        "reconstruct": _("Reconstructing"),
        "segment": _("Segmenting bone"),
        "surface": _("Building the surface"),
    }
    # Parts of the model step taken by the library's stages (build_model reports "segment", then "surface").
    MODEL_SPANS = {"segment": (0.0, 0.4), "surface": (0.4, 1.0)}
    # Translated here, in the main thread: the callbacks run in the worker, which must not call Qt.
    DONE = _("Done")

    def __init__(self, callback, register, withModel):
        self._callback = callback
        self._register = register
        self._fuseEnd = 0.85 if withModel else 1.0
        self._last = 0.0

    def _emit(self, stage, overall):
        if self._callback is None:
            return
        overall = max(self._last, min(1.0, overall))  # never runs backwards across stages
        self._last = overall
        label = self.LABELS.get(stage, stage.capitalize())
        self._callback(f"{label}... {int(round(100 * overall))}%", overall)

    def fusion(self, stage, fraction):
        if self._register:
            start, stop = (0.0, 0.3) if stage == "register" else (0.3, 1.0)
        else:
            start, stop = 0.0, 1.0
        self._emit(stage, self._fuseEnd * (start + (stop - start) * fraction))

    def model(self, stage, fraction):
        start, stop = self.MODEL_SPANS.get(stage, (0.0, 1.0))
        self._emit(stage, self._fuseEnd + (1.0 - self._fuseEnd) * (start + (stop - start) * fraction))

    def done(self):
        if self._callback is not None:
            self._callback(self.DONE, 1.0)


#
# MultiPlaneFusionTest
#


class MultiPlaneFusionTest(ScriptedLoadableModuleTest):
    """End-to-end tests on the library's head phantom (no network): series are simulated, pushed as
    volume nodes, fused by the real logic, and checked against the phantom's ground truth."""

    # Small and coarse so the test runs in well under a minute.
    SCALE = 0.5
    THICKNESS_MM = 4.0
    PIXEL_MM = 1.0
    SPACING_MM = 1.0

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_MultiPlaneFusion_BadInput,
            self.test_MultiPlaneFusion_EndToEnd,
            self.test_MultiPlaneFusion_Cancel,
            self.test_MultiPlaneFusion_ParameterNodeInBackground,
        ):
            self.setUp()
            test()

    def _pushPhantomSeries(self):
        from MultiPlaneFusionLib.simulation import simulate_orthogonal_stacks

        stacks = simulate_orthogonal_stacks(
            thickness_mm=self.THICKNESS_MM, pixel_spacing_mm=self.PIXEL_MM, scale=self.SCALE, noise_hu=10.0, seed=0)
        nodes = {}
        for stack in stacks:
            pixels, ijkToRAS = slicer_boundary.volume_from_stack(stack)
            nodes[stack.orientation] = slicer.util.addVolumeFromArray(
                pixels, ijkToRAS, name=f"{stack.orientation} {self.THICKNESS_MM:g} mm")
        self.assertEqual(set(nodes), {"axial", "coronal", "sagittal"})
        return nodes

    def test_MultiPlaneFusion_BadInput(self):
        self.delayDisplay("Bad input is refused with ValueError")
        logic = MultiPlaneFusionLogic()
        with self.assertRaises(ValueError):
            logic.process(None)
        volume = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32))
        with self.assertRaises(ValueError):
            logic.process(volume, volume)  # the same series twice
        with self.assertRaises(ValueError):
            logic.process(volume, outputVolumeNode=volume)  # output overwrites an input
        with self.assertRaises(ValueError):
            logic.process(volume, thresholdPreset="custom", thresholdRange=(500.0, 100.0))
        with self.assertRaises(ValueError):
            logic.process(volume, method="magic")
        self.delayDisplay("Test passed")

    def test_MultiPlaneFusion_EndToEnd(self):
        from MultiPlaneFusionLib.metrics import psnr
        from MultiPlaneFusionLib.model import read_model
        from MultiPlaneFusionLib.model.meshio import mesh_report
        from MultiPlaneFusionLib.pipeline import FuseOptions, fuse_stacks
        from MultiPlaneFusionLib.simulation import phantom_truth

        self.delayDisplay("Simulating three thick-slice series of the head phantom")
        nodes = self._pushPhantomSeries()
        logic = MultiPlaneFusionLogic()
        exportPath = os.path.join(slicer.app.temporaryPath, "MultiPlaneFusionTest-bone.stl")
        if os.path.exists(exportPath):
            os.remove(exportPath)

        self.delayDisplay("Fusing")
        job = logic.process(
            nodes["axial"], nodes["coronal"], nodes["sagittal"], None,
            method="srr", spacingMm=self.SPACING_MM, register=False, exportPath=exportPath,
        )
        fused = job.outputVolumeNode
        self.assertIsNotNone(fused)

        # The fused volume on its grid, read back through the node (geometry included).
        m = vtk.vtkMatrix4x4()
        fused.GetIJKToRASMatrix(m)
        fusedArray = slicer.util.arrayFromVolume(fused)
        grid = slicer_boundary.grid_from_ijk_to_ras(slicer.util.arrayFromVTKMatrix(m), fusedArray.shape)
        truth = phantom_truth(grid, scale=self.SCALE)
        # The axial series alone on the same grid, also read back from its node.
        axialStack = logic.stackFromVolumeNode(nodes["axial"])
        axialOnly = fuse_stacks([axialStack], FuseOptions(method="average", grid=grid, register=False))
        axialArray = sitk.GetArrayFromImage(axialOnly.image)
        fusedPsnr = psnr(fusedArray, truth)
        axialPsnr = psnr(axialArray, truth)
        logging.info("MultiPlaneFusionTest: PSNR fused %.2f dB, axial only %.2f dB", fusedPsnr, axialPsnr)
        self.assertGreater(fusedPsnr, axialPsnr + 1.0)

        # Segmentation hand-off: Bone segment on the fused grid, smoothing from the parameter.
        seg = job.segmentationNode
        self.assertIsNotNone(seg)
        segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName("Bone")
        self.assertTrue(segmentId)
        boneVoxels = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentId, fused)
        self.assertEqual(boneVoxels.shape, fusedArray.shape)
        self.assertGreater(int(boneVoxels.sum()), 0)
        self.assertAlmostEqual(float(seg.GetSegmentation().GetConversionParameter(SMOOTHING_FACTOR_PARAMETER)), 0.5)
        self.assertTrue(seg.GetSegmentation().ContainsRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()))

        # The model node holds the library's surface in RAS; the file written is closed, in LPS.
        self.assertIsNotNone(job.modelNode)
        self.assertGreater(job.modelNode.GetPolyData().GetNumberOfPoints(), 0)
        self.assertTrue(os.path.isfile(exportPath))
        self.assertEqual(job.exportReport["space"], "LPS")
        written = mesh_report(read_model(exportPath))
        self.assertTrue(written["closed"])
        self.assertGreater(written["triangles"], 100)

        # Exporting the segment as OBJ in RAS works too.
        objPath = logic.exportModel(
            os.path.join(slicer.app.temporaryPath, "MultiPlaneFusionTest-segment"), source="segment",
            segmentationNode=seg, fileFormat="OBJ", coordinates="RAS")["path"]
        self.assertTrue(objPath.endswith(".obj") and os.path.isfile(objPath))
        self.delayDisplay("Test passed")

    def test_MultiPlaneFusion_Cancel(self):
        from MultiPlaneFusionLib.errors import CancelledError

        nodes = self._pushPhantomSeries()
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "untouched")
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(CancelledError):
            MultiPlaneFusionLogic().process(
                nodes["axial"], nodes["coronal"], nodes["sagittal"], output, method="average",
                spacingMm=2.0, register=False, cancel=lambda: True)
        self.assertIsNone(output.GetImageData())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")

    def test_MultiPlaneFusion_ParameterNodeInBackground(self):
        """The GUI path: settings from the parameter node, the library in a worker thread."""
        nodes = self._pushPhantomSeries()
        logic = MultiPlaneFusionLogic()
        p = logic.getParameterNode()
        p.axialVolume, p.coronalVolume, p.sagittalVolume = nodes["axial"], nodes["coronal"], nodes["sagittal"]
        p.method = "average"
        p.spacingMm = 2.0
        p.register = False
        p.buildModel = False
        job = logic.prepareFromParameterNode(p)
        reports = []
        finished = []
        task = BackgroundTask(lambda progress, cancel: logic.compute(job, progress, cancel),
                              lambda stage, fraction: reports.append(fraction),
                              lambda result, error: finished.append(error))
        task.start()
        deadline = time.time() + 120.0
        while not finished and time.time() < deadline:
            slicer.app.processEvents()  # the GUI keeps running while the worker fuses
            time.sleep(0.01)
        self.assertEqual(finished, [None])
        self.assertTrue(reports and max(reports) <= 1.0)
        logic.publish(job)
        self.assertEqual(slicer.util.arrayFromVolume(job.outputVolumeNode).shape, job.fusion.grid.shape)
        self.assertIsNone(job.segmentationNode)
        self.delayDisplay("Test passed")
