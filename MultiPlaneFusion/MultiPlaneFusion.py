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

from MultiPlaneFusionLib import memory, slicer_boundary
from MultiPlaneFusionLib.model.options import ISLAND_MODES, SURFACE_METHODS, ModelOptions
from MultiPlaneFusionLib.model.thresholds import DEFAULT_CT_PRESET, PRESETS
from MultiPlaneFusionLib.pipeline import EXTENTS, METHODS, FuseOptions
from MultiPlaneFusionLib.reconstruction.options import REGULARIZERS, SrrOptions
from MultiPlaneFusionLib.slicer_boundary import COORDINATE_SYSTEMS as EXPORT_COORDINATES
from MultiPlaneFusionLib.slicer_boundary import EXPORT_FORMATS, EXPORT_SOURCES, THRESHOLD_CHOICES

README_URL = "https://github.com/multiplanefusion/SlicerMultiPlaneFusion#readme"

# The choice lists shown in the combo boxes and the parameters' defaults are the library's own (imported
# above: its option classes' field defaults and its CT preset), so they cannot drift.

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
    regularization (srr weight alpha in mm^2, 0 = the library's default; for 'hybrid' its Tikhonov share),
    regularizer ('hybrid' Tikhonov plus Huber, the default; 'tikhonov' smooth; 'huber' edge-preserving),
    memoryLimitGb (0 = the library's default: 90 % of the memory
    available when the run starts).
    Bone model: buildModel, thresholdPreset (CT presets in HU, 'custom' uses thresholdRange,
    'automatic' = Otsu for MR), islands ('region': the largest piece and the bones near it,
    'largest', or 'all' above minIslandMm3), fillCavities,
    removeThinMm, surfaceMethod ('iso' grey-level isosurface or 'labelmap' like Slicer), smoothing
    (Slicer's factor 0..1), decimation (fraction of triangles removed, 0 = none).
    Export: exportSource ('model' or 'segment'), exportFormat, exportCoordinates (LPS default),
    exportPath, exportAfterApply.
    Outputs: outputVolume, outputSegmentation, outputModel (created when empty).
    The defaults of the library's settings are read from its option classes (FuseOptions, SrrOptions,
    ModelOptions) and its default CT preset, where they are written once.
    """

    axialVolume: vtkMRMLScalarVolumeNode
    coronalVolume: vtkMRMLScalarVolumeNode
    sagittalVolume: vtkMRMLScalarVolumeNode
    extraVolumes: list[vtkMRMLScalarVolumeNode]

    method: Annotated[str, Choice(list(METHODS))] = FuseOptions.method
    spacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    extent: Annotated[str, Choice(list(EXTENTS))] = FuseOptions.extent
    register: bool = FuseOptions.register
    regularization: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    regularizer: Annotated[str, Choice(list(REGULARIZERS))] = SrrOptions.regularizer
    memoryLimitGb: Annotated[float, WithinRange(0.0, 1024.0)] = 0.0

    buildModel: bool = True
    thresholdPreset: Annotated[str, Choice(list(THRESHOLD_CHOICES))] = DEFAULT_CT_PRESET
    thresholdRange: Annotated[FloatRange, RangeBounds(-3024.0, 10000.0)] = FloatRange(*PRESETS[DEFAULT_CT_PRESET])
    islands: Annotated[str, Choice(list(ISLAND_MODES))] = ModelOptions.islands
    minIslandMm3: Annotated[float, WithinRange(0.0, 1.0e7)] = ModelOptions.min_island_mm3
    fillCavities: bool = ModelOptions.fill_cavities
    removeThinMm: Annotated[float, WithinRange(0.0, 50.0)] = ModelOptions.remove_thin_mm
    surfaceMethod: Annotated[str, Choice(list(SURFACE_METHODS))] = ModelOptions.surface_method
    smoothing: Annotated[float, WithinRange(0.0, 1.0)] = ModelOptions.smoothing
    decimation: Annotated[float, WithinRange(0.0, 0.95)] = 0.0

    exportSource: Annotated[str, Choice(list(EXPORT_SOURCES))] = "model"
    exportFormat: Annotated[str, Choice(list(EXPORT_FORMATS))] = "STL"
    exportCoordinates: Annotated[str, Choice(list(EXPORT_COORDINATES))] = "LPS"
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
# Settings, outputs and one run
#


class MultiPlaneFusionExport:
    """Where :meth:`MultiPlaneFusionLogic.process` writes the bone surface after the run.

    path : file to write; fileFormat 'STL' or 'OBJ' (None: from the path's extension); source 'model' (the
    library's surface) or 'segment' (the Bone segment's closed surface, with the user's edits);
    coordinates 'LPS' (default, what Slicer writes) or 'RAS'. Raises ValueError for a bad choice.
    """

    def __init__(self, path, source="model", fileFormat=None, coordinates="LPS"):
        if source not in EXPORT_SOURCES:
            raise ValueError(_("export source must be one of {choices}, not '{value}'").format(
                choices=", ".join(EXPORT_SOURCES), value=source))
        if coordinates not in EXPORT_COORDINATES:
            raise ValueError(_("export coordinates must be one of {choices}, not '{value}'").format(
                choices=", ".join(EXPORT_COORDINATES), value=coordinates))
        self.path = MultiPlaneFusionLogic.exportFilePath(path, fileFormat)
        self.source = source
        self.fileFormat = fileFormat
        self.coordinates = coordinates


class MultiPlaneFusionSettings:
    """Every setting of a run, as the library's own option classes (they validate themselves).

    fusion : MultiPlaneFusionLib.pipeline.FuseOptions
        method, spacing_mm, extent, register, memory_limit_gb, srr (SrrOptions or None)...
    model : MultiPlaneFusionLib.model.ModelOptions, True or None
        The bone model (threshold, islands, surface method, smoothing, decimate); True (the default): the
        library's default ModelOptions; None: no model, the run stops after the fused volume. Its smoothing
        and decimation also set the Bone segment's closed-surface conversion.
    export : MultiPlaneFusionExport or None
        Write the model or segment to a file after the run.

    ``MultiPlaneFusionSettings()`` is the default run: the library's default ``FuseOptions()`` and
    ``ModelOptions()``.
    """

    def __init__(self, fusion=None, model=True, export=None):
        self.fusion = FuseOptions() if fusion is None else fusion
        self.model = ModelOptions() if model is True else (model or None)
        self.export = export

    def validate(self):
        """Raise the library's InputError (or ValueError) for a setting out of range; returns self."""
        self.fusion.validate()
        if self.model is not None:
            self.model.validate()
        if self.export is not None and self.model is None:
            raise ValueError(_("export needs the bone model: build the model (settings.model) or export nothing"))
        return self


class MultiPlaneFusionOutputs:
    """The nodes a run writes into; None creates "Fused volume", "Bone segmentation", "Bone model".

    createSegmentation / createModel False leave that output out (the segmentation takes memory on big grids).
    """

    def __init__(self, volume=None, segmentation=None, model=None, createSegmentation=True, createModel=True):
        self.volume = volume
        self.segmentation = segmentation
        self.model = model
        self.createSegmentation = createSegmentation
        self.createModel = createModel


class MultiPlaneFusionJob:
    """One run: the inputs converted for the library, the settings, and the results.

    Created in the main thread by :meth:`MultiPlaneFusionLogic.prepare`; :meth:`~MultiPlaneFusionLogic.compute`
    fills ``fusion`` and ``model`` (any thread, library only); :meth:`~MultiPlaneFusionLogic.publish`
    writes them into the nodes (main thread).
    """

    def __init__(self, settings, outputs):
        self.settings = settings
        self.inputNodes = []
        self.stacks = []
        self.modality = "CT"
        self.fuseOptions = settings.fusion
        self.modelOptions = settings.model  # None: no model
        self.export = settings.export
        self.outputVolumeNode = outputs.volume
        self.segmentationNode = outputs.segmentation
        self.modelNode = outputs.model
        self.createSegmentation = outputs.createSegmentation
        self.createModel = outputs.createModel
        self.showResult = True
        self.fusion = None
        self.model = None
        self.segmentId = None
        self.exportReport = None
        self.timings = {}

    @property
    def smoothing(self):
        return self.modelOptions.smoothing if self.modelOptions is not None else 0.0

    @property
    def decimation(self):
        """The fraction removed (the segment's "Decimation factor"); a triangle count has no such factor."""
        d = self.modelOptions.decimate if self.modelOptions is not None else None
        return float(d) if isinstance(d, float) else 0.0

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

        import MultiPlaneFusion
        from MultiPlaneFusionLib.pipeline import FuseOptions
        logic = MultiPlaneFusion.MultiPlaneFusionLogic()
        settings = MultiPlaneFusion.MultiPlaneFusionSettings(
            fusion=FuseOptions(spacing_mm=0.5), export=MultiPlaneFusion.MultiPlaneFusionExport("/tmp/bone.stl"))
        job = logic.process([axialNode, coronalNode, sagittalNode], settings)
        job.outputVolumeNode, job.segmentationNode, job.modelNode, job.summary

    ``showResult`` (default True) shows the fused volume in the slice views.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.showResult = True

    def getParameterNode(self):
        return MultiPlaneFusionParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------- console entry points
    def process(self, inputNodes, settings=None, outputs=None, progressCallback=None, cancel=None):
        """Fuse the series, build the bone model, show and optionally export it (synchronously).

        Parameters
        ----------
        inputNodes : vtkMRMLScalarVolumeNode or list of them
            The series (any planes, tilted, with gaps). The first is the reference: its axes orient the
            fused volume and the others register to it.
        settings : MultiPlaneFusionSettings or None
            The library's options for the fusion and the model, and the export; None: the defaults.
        outputs : MultiPlaneFusionOutputs or None
            Nodes to update; None creates new ones.
        progressCallback : callable(stageText, fraction)
        cancel : callable returning True, or an object with is_set(), to stop the run

        Returns
        -------
        MultiPlaneFusionJob
            With outputVolumeNode, segmentationNode, modelNode, segmentId, exportReport, summary.

        Raises
        ------
        ValueError
            Bad input or settings (a one-line message naming the setting).
        MultiPlaneFusionLib.errors.CancelledError
            When ``cancel`` fired; the scene is unchanged.
        """
        job = self.prepare(inputNodes, settings, outputs)
        self.compute(job, progressCallback or self._logProgress, cancel)
        self.publish(job)
        return job

    def processParameterNode(self, parameterNode, progressCallback=None, cancel=None):
        """:meth:`process` with the inputs, settings and outputs of a :class:`MultiPlaneFusionParameterNode`;
        the output nodes are stored back so the next run updates them."""
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
    @staticmethod
    def inputNodesFromParameterNode(p):
        return [n for n in (p.axialVolume, p.coronalVolume, p.sagittalVolume) if n is not None] + [
            n for n in p.extraVolumes if n is not None]

    @staticmethod
    def settingsFromParameterNode(p):
        """The :class:`MultiPlaneFusionSettings` the parameter node describes (library errors propagate)."""
        srr = None
        if p.method == "srr":
            srr = SrrOptions(alpha=p.regularization or None, regularizer=p.regularizer)
        fusion = FuseOptions(method=p.method, spacing_mm=p.spacingMm or None, extent=p.extent, register=p.register,
                             memory_limit_gb=p.memoryLimitGb or memory.DEFAULT_MEMORY_LIMIT_GB, srr=srr)
        model = None
        if p.buildModel:
            preset = p.thresholdPreset
            model = ModelOptions(
                preset=None if preset in ("custom", "automatic") else preset,
                threshold=(p.thresholdRange.minimum, p.thresholdRange.maximum) if preset == "custom" else None,
                auto_threshold=preset == "automatic",
                islands=p.islands, min_island_mm3=p.minIslandMm3, fill_cavities=p.fillCavities,
                remove_thin_mm=p.removeThinMm, surface_method=p.surfaceMethod, smoothing=p.smoothing,
                decimate=p.decimation or None, ras=p.exportCoordinates == "RAS",
            )
        export = None
        if p.exportAfterApply:
            export = MultiPlaneFusionExport(p.exportPath, p.exportSource, p.exportFormat, p.exportCoordinates)
        return MultiPlaneFusionSettings(fusion=fusion, model=model, export=export)

    def prepareFromParameterNode(self, p):
        if p is None:
            raise ValueError(_("No parameter node"))
        outputs = MultiPlaneFusionOutputs(p.outputVolume, p.outputSegmentation, p.outputModel)
        return self.prepare(self.inputNodesFromParameterNode(p), lambda: self.settingsFromParameterNode(p), outputs)

    def prepare(self, inputNodes, settings=None, outputs=None):
        """Validate the inputs and convert them for the library (main thread; raises ValueError).

        ``settings`` may also be a callable returning the settings (so that the library's errors while
        building them are reported like the others).
        """
        from MultiPlaneFusionLib.errors import MultiPlaneFusionError
        from MultiPlaneFusionLib.writing import check_writable

        if inputNodes is None:
            inputNodes = []
        elif not isinstance(inputNodes, (list, tuple)):
            inputNodes = [inputNodes]
        nodes = [n for n in inputNodes if n is not None]
        if not nodes:
            raise ValueError(_("Select at least one input volume (axial, coronal, sagittal or extra)."))
        ids = [n.GetID() for n in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(_("The same volume is selected twice as an input."))
        outputs = outputs if outputs is not None else MultiPlaneFusionOutputs()
        if isinstance(outputs, dict):
            outputs = MultiPlaneFusionOutputs(**outputs)
        if outputs.volume is not None and outputs.volume.GetID() in ids:
            raise ValueError(_("The output volume is one of the inputs: choose another output or create a new one."))
        try:
            settings = settings() if callable(settings) else settings
            settings = (settings if settings is not None else MultiPlaneFusionSettings()).validate()
            job = MultiPlaneFusionJob(settings, outputs)
            job.inputNodes = nodes
            job.showResult = self.showResult
            job.stacks = [self.stackFromVolumeNode(n) for n in nodes]
            job.modality = "CT" if all(st.modality == "CT" for st in job.stacks) else job.stacks[0].modality
            m = job.modelOptions
            if m is not None and m.threshold is None and not m.auto_threshold and job.modality != "CT":
                # Checked now, not after the fusion. Stricter than the library (which trusts a named preset on
                # a volume of unknown modality): a node without DICOM details and without air is not CT.
                raise ValueError(_(
                    "The inputs are not CT (modality {modality}): HU presets do not apply. Choose the "
                    "'custom' or 'automatic' threshold.").format(modality=job.modality))
            if job.export is not None:
                check_writable(job.export.path)  # fail now, not after minutes of work
        except MultiPlaneFusionError as e:
            raise ValueError(str(e)) from e
        if len(job.stacks) < 2 and job.fuseOptions.register:
            from dataclasses import replace

            job.fuseOptions = replace(job.fuseOptions, register=False)  # nothing to register
        return job

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
            acquisition=info.get("acquisition", ""),
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
            # AcquisitionType, SpiralPitchFactor, ScanOptions: sequenced or spiral CT (the nominal slice profile)
            from MultiPlaneFusionLib.reading.dicom import acquisition_from_values

            info["acquisition"] = acquisition_from_values(
                info["modality"], *(database.instanceValue(uid, tag).strip() for tag in ("0018,9302", "0018,9311",
                                                                                       "0018,0022")))
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
                job.model = build_model(job.fusion.image, job.modelOptions, modality=job.modality,
                                        progress=mapper.model, cancel=cancel)
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
        if job.export is not None:
            e = job.export
            job.exportReport = self.exportModel(
                e.path, source=e.source, modelNode=job.modelNode, segmentationNode=job.segmentationNode,
                fileFormat=e.fileFormat, coordinates=e.coordinates,
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
        """One status line: grid, method, self-check, model size and closedness, export."""
        parts = []
        if job.fusion is not None:
            size = "x".join(str(v) for v in job.fusion.grid.shape[::-1])
            parts.append(_("Fused {n} series ({method}) into {size} voxels of {spacing:.2f} mm").format(
                n=len(job.stacks), method=job.fuseOptions.method, size=size,
                spacing=float(job.fusion.grid.spacing_mm[0])))
            # The library's self-check: each series predicted from the fusion of the others against the
            # best single other series; None when it did not run (average method, one series).
            summary = job.fusion.summary or {}
            beats = summary.get("fusion_beats_single_series")
            if beats is True:
                parts.append(_("self-check: the fusion predicts every series better than any single series"))
            elif beats is False and summary.get("fusion_worse_than_single_series") is False:
                check = (summary.get("reconstruction") or {}).get("self_check") or {}
                parts.append(_("WARNING self-check: the fusion predicts some series only as well as the best single "
                               "series (within {tie:g} %), no better").format(
                                   tie=100.0 * float(check.get("tie_fraction", 0.0))))
            elif beats is False:
                parts.append(_("WARNING self-check: the fusion does not beat the best single series "
                               "(a series misregistered or not belonging?)"))
            if len(job.fusion.stacks) == 1:  # one series (or copies of it): resampled, not fused
                parts.append(_("WARNING only one series: nothing to fuse it with; select the other planes' series "
                               "too"))
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
    volume nodes, fused by the real logic, and checked against the phantom's ground truth and against
    geometry read from the nodes themselves (not through the module's own conversion functions)."""

    # Small and coarse so the test runs in well under a minute.
    SCALE = 0.5
    THICKNESS_MM = 4.0
    PIXEL_MM = 1.0
    SPACING_MM = 1.0
    # The phantom is centred on the origin, where an LPS/RAS mix-up moves nothing: shift it (RAS mm).
    OFFSET_RAS = (40.0, -25.0, 10.0)

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
            ijkToRAS = np.array(ijkToRAS)
            ijkToRAS[:3, 3] += self.OFFSET_RAS
            nodes[stack.orientation] = slicer.util.addVolumeFromArray(
                pixels, ijkToRAS, name=f"{stack.orientation} {self.THICKNESS_MM:g} mm")
        self.assertEqual(set(nodes), {"axial", "coronal", "sagittal"})
        return nodes

    @staticmethod
    def _centreRAS(volumeNode):
        """Centre of a volume's voxel box in RAS, from its own IJKToRAS (independent of the module)."""
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        dims = volumeNode.GetImageData().GetDimensions()
        return np.array(m.MultiplyPoint([(d - 1) / 2.0 for d in dims] + [1.0])[:3])

    @staticmethod
    def _pointsOf(polydata):
        from vtk.util.numpy_support import vtk_to_numpy

        return vtk_to_numpy(polydata.GetPoints().GetData()).astype(float)

    def _closedSurface(self, seg, segmentId):
        poly = vtk.vtkPolyData()
        self.assertTrue(slicer.modules.segmentations.logic().GetSegmentClosedSurfaceRepresentation(
            seg, segmentId, poly, True))
        copy = vtk.vtkPolyData()
        copy.DeepCopy(poly)
        return copy

    def _assertFileAtNode(self, path, report, polyRAS):
        """The file's points are the node's, in the coordinates its report claims (checked by position)."""
        from MultiPlaneFusionLib.model import read_model

        filePoints = self._pointsOf(read_model(path))
        nodePoints = self._pointsOf(polyRAS)
        expected = nodePoints.mean(axis=0)
        if report["space"] == "LPS":
            expected = expected * (-1.0, -1.0, 1.0)
        # The offset phantom makes the two spaces differ by far more than the tolerance.
        self.assertGreater(float(np.linalg.norm(nodePoints.mean(axis=0)[:2])), 10.0)
        self.assertLess(float(np.linalg.norm(filePoints.mean(axis=0) - expected)), 0.05)
        lo, hi = filePoints.min(axis=0), filePoints.max(axis=0)
        nlo, nhi = nodePoints.min(axis=0), nodePoints.max(axis=0)
        if report["space"] == "LPS":
            nlo, nhi = np.array([-nhi[0], -nhi[1], nlo[2]]), np.array([-nlo[0], -nlo[1], nhi[2]])
        self.assertTrue(np.allclose(lo, nlo, atol=1e-3) and np.allclose(hi, nhi, atol=1e-3))

    def test_MultiPlaneFusion_BadInput(self):
        self.delayDisplay("Bad input is refused with ValueError")
        logic = MultiPlaneFusionLogic()
        with self.assertRaises(ValueError):
            logic.process(None)
        volume = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32))
        with self.assertRaises(ValueError):
            logic.process([volume, volume])  # the same series twice
        with self.assertRaises(ValueError):
            logic.process(volume, outputs=MultiPlaneFusionOutputs(volume=volume))  # output overwrites an input
        # The library's options validate themselves, naming the setting.
        with self.assertRaisesRegex(Exception, "threshold range is empty"):
            logic.process(volume, MultiPlaneFusionSettings(model=ModelOptions(threshold=(500.0, 100.0))))
        with self.assertRaisesRegex(Exception, "method"):
            logic.process(volume, MultiPlaneFusionSettings(fusion=FuseOptions(method="magic")))
        with self.assertRaisesRegex(ValueError, "coordinates"):
            MultiPlaneFusionExport("/tmp/bone.stl", coordinates="XYZ")
        self.delayDisplay("Test passed")

    def test_MultiPlaneFusion_EndToEnd(self):
        import dataclasses

        from MultiPlaneFusionLib.metrics import psnr
        from MultiPlaneFusionLib.model import read_model
        from MultiPlaneFusionLib.model.mesh import mesh_report
        from MultiPlaneFusionLib.pipeline import fuse_stacks
        from MultiPlaneFusionLib.simulation import phantom_truth

        self.delayDisplay("Simulating three thick-slice series of the head phantom")
        nodes = self._pushPhantomSeries()
        logic = MultiPlaneFusionLogic()
        exportPath = os.path.join(slicer.app.temporaryPath, "MultiPlaneFusionTest-bone.stl")
        if os.path.exists(exportPath):
            os.remove(exportPath)

        self.delayDisplay("Fusing")
        smoothing = 0.7
        settings = MultiPlaneFusionSettings(
            fusion=FuseOptions(method="srr", spacing_mm=self.SPACING_MM, register=False),
            model=ModelOptions(preset="bone", smoothing=smoothing),
            export=MultiPlaneFusionExport(exportPath))
        job = logic.process([nodes["axial"], nodes["coronal"], nodes["sagittal"]], settings)
        fused = job.outputVolumeNode
        self.assertIsNotNone(fused)

        # The fused volume sits where the inputs are (centres agree to a few mm: overlap of three boxes).
        self.assertLess(float(np.linalg.norm(self._centreRAS(fused) - self._centreRAS(nodes["axial"]))), 5.0)
        # The fused volume on its grid, read back through the node (geometry included).
        m = vtk.vtkMatrix4x4()
        fused.GetIJKToRASMatrix(m)
        fusedArray = slicer.util.arrayFromVolume(fused)
        grid = slicer_boundary.grid_from_ijk_to_ras(slicer.util.arrayFromVTKMatrix(m), fusedArray.shape)
        offsetLPS = np.array(self.OFFSET_RAS) * (-1.0, -1.0, 1.0)
        truthGrid = dataclasses.replace(grid, origin_mm=tuple(np.array(grid.origin_mm) - offsetLPS))
        truth = phantom_truth(truthGrid, scale=self.SCALE)
        # The axial series alone on the same grid, also read back from its node.
        axialStack = logic.stackFromVolumeNode(nodes["axial"])
        axialOnly = fuse_stacks([axialStack], FuseOptions(method="average", grid=grid, register=False))
        axialArray = sitk.GetArrayFromImage(axialOnly.image)
        fusedPsnr = psnr(fusedArray, truth)
        axialPsnr = psnr(axialArray, truth)
        logging.info("MultiPlaneFusionTest: PSNR fused %.2f dB, axial only %.2f dB", fusedPsnr, axialPsnr)
        self.assertGreater(fusedPsnr, axialPsnr + 1.0)

        # Segmentation hand-off: Bone segment on the fused grid.
        seg = job.segmentationNode
        self.assertIsNotNone(seg)
        segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName("Bone")
        self.assertTrue(segmentId)
        boneVoxels = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentId, fused)
        self.assertEqual(boneVoxels.shape, fusedArray.shape)
        self.assertEqual(int(boneVoxels.sum()), int(sitk.GetArrayFromImage(job.model.mask).sum()))
        self.assertTrue(seg.GetSegmentation().ContainsRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()))
        # The smoothing reaches the segment's closed surface: checked by its effect, not by reading the
        # parameter back (a misspelled parameter name would be read back just as well).
        smoothed = self._closedSurface(seg, segmentId)
        segmentation = seg.GetSegmentation()
        segmentation.SetConversionParameter(SMOOTHING_FACTOR_PARAMETER, "0")
        seg.RemoveClosedSurfaceRepresentation()
        seg.CreateClosedSurfaceRepresentation()
        raw = self._closedSurface(seg, segmentId)
        segmentation.SetConversionParameter(SMOOTHING_FACTOR_PARAMETER, f"{smoothing:g}")
        seg.RemoveClosedSurfaceRepresentation()
        seg.CreateClosedSurfaceRepresentation()
        self.assertEqual(raw.GetNumberOfPoints(), smoothed.GetNumberOfPoints())  # smoothing moves points only
        moved = np.linalg.norm(self._pointsOf(raw) - self._pointsOf(smoothed), axis=1)
        self.assertGreater(float(np.mean(moved)), 0.05 * self.SPACING_MM)
        again = self._closedSurface(seg, segmentId)
        self.assertTrue(np.allclose(self._pointsOf(again), self._pointsOf(smoothed)))

        # The model node holds the library's surface in RAS; the file written is closed, in LPS, at the
        # node's position (compared by coordinates, not by the report's label).
        self.assertIsNotNone(job.modelNode)
        self.assertGreater(job.modelNode.GetPolyData().GetNumberOfPoints(), 0)
        self.assertTrue(os.path.isfile(exportPath))
        self.assertEqual(job.exportReport["space"], "LPS")
        written = mesh_report(read_model(exportPath))
        self.assertTrue(written["closed"])
        self.assertGreater(written["triangles"], 100)
        self._assertFileAtNode(exportPath, job.exportReport, job.modelNode.GetPolyData())

        # Exporting the segment as OBJ in RAS works too, at the segment's position.
        report = logic.exportModel(
            os.path.join(slicer.app.temporaryPath, "MultiPlaneFusionTest-segment"), source="segment",
            segmentationNode=seg, fileFormat="OBJ", coordinates="RAS")
        self.assertTrue(report["path"].endswith(".obj") and os.path.isfile(report["path"]))
        self.assertEqual(report["space"], "RAS")
        self._assertFileAtNode(report["path"], report, smoothed)
        self.delayDisplay("Test passed")

    def test_MultiPlaneFusion_Cancel(self):
        from MultiPlaneFusionLib.errors import CancelledError

        nodes = self._pushPhantomSeries()
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "untouched")
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(CancelledError):
            MultiPlaneFusionLogic().process(
                [nodes["axial"], nodes["coronal"], nodes["sagittal"]],
                MultiPlaneFusionSettings(fusion=FuseOptions(method="average", spacing_mm=2.0, register=False)),
                MultiPlaneFusionOutputs(volume=output), cancel=lambda: True)
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
        logic.storeOutputs(p, job)
        self.assertEqual(slicer.util.arrayFromVolume(job.outputVolumeNode).shape, job.fusion.grid.shape)
        self.assertIsNone(job.segmentationNode)
        self.assertIs(p.outputVolume, job.outputVolumeNode)
        self.delayDisplay("Test passed")
