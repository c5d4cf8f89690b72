"""3D Slicer's real MRML libraries (the ``slicer-core`` wheel) with only what that wheel lacks stood in.

Real (from slicer-core): one ``vtkMRMLScene``, a ``vtkSlicerApplicationLogic``, the Volumes, Segmentations,
Models, Transforms and Colors logics set up with the scene as Slicer's application sets them up at start-up,
the storage nodes, the segmentation conversion rules and ``slicer.util``.

Stood in (written here, nothing copied from Slicer): ``qt`` and ``ctk`` (only a QTimer driven by
``slicer.app.processEvents()`` and a few enums: there is no event loop and no GUI), ``slicer.app``,
the ``slicer.modules`` namespace over the real logics, ``slicer.i18n``, a minimal ``ScriptedLoadableModule``
and a minimal ``parameterNodeWrapper`` that stores typed values and node references in a real
``vtkMRMLScriptedModuleNode`` (so persistence is that of MRML). GUI binding (``connectGui``) is not
stood in: the module's widget is not exercised here.
"""

import enum
import os
import pathlib
import sys
import tempfile
import time
import types
import typing
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MultiPlaneFusion"

SKIP_REASON = (
    "needs Slicer's libraries: the 'slicer' package of the slicer-core wheel (Python >= 3.10). "
    "Run them with: bash .ci/slicer-core"
)


def slicer_core_available():
    """True when ``import slicer`` gives slicer-core's MRML classes (not a stand-in or nothing)."""
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "vtkMRMLScene") and hasattr(slicer, "vtkSlicerApplicationLogic")


# ----------------------------------------------------------------------------------------------- qt
class _QtEnums:
    Unchecked, PartiallyChecked, Checked = 0, 1, 2
    WaitCursor = 3


class QTimer:
    """A timer fired by ``slicer.app.processEvents()`` when its interval has elapsed."""

    _active = []

    def __init__(self, parent=None):
        self._interval_s = 0.0
        self._slots = []
        self._due = None
        self.singleShot_ = False

    def setInterval(self, msec):
        self._interval_s = msec / 1000.0

    def setSingleShot(self, value):
        self.singleShot_ = bool(value)

    def connect(self, signal, slot):
        if signal != "timeout()":
            raise NotImplementedError(f"stand-in QTimer has no signal {signal}")
        self._slots.append(slot)

    def start(self, msec=None):
        if msec is not None:
            self.setInterval(msec)
        self._due = time.monotonic() + self._interval_s
        if self not in QTimer._active:
            QTimer._active.append(self)

    def stop(self):
        self._due = None
        if self in QTimer._active:
            QTimer._active.remove(self)

    def isActive(self):
        return self._due is not None

    @classmethod
    def _fire_due(cls):
        now = time.monotonic()
        for timer in list(cls._active):
            if timer._due is not None and now >= timer._due:
                if timer.singleShot_:
                    timer.stop()
                else:
                    timer._due = now + timer._interval_s
                for slot in list(timer._slots):
                    slot()


def _make_qt():
    qt = types.ModuleType("qt")
    qt.QTimer = QTimer
    qt.Qt = _QtEnums
    return qt


# --------------------------------------------------------------------------------------- slicer.app
class _App:
    """The parts of qSlicerApplication a scripted module's Logic and Test use, without Qt."""

    applicationName = "Slicer (slicer-core stand-in)"

    def __init__(self, scene, app_logic, temporary_path):
        self._scene = scene
        self._app_logic = app_logic
        self.temporaryPath = temporary_path
        self._render_paused = 0

    def mrmlScene(self):
        return self._scene

    def applicationLogic(self):
        return self._app_logic

    def testingEnabled(self):
        return True  # no dialogs: errors are raised, not shown

    def processEvents(self, *args):
        QTimer._fire_due()

    def pauseRender(self):
        self._render_paused += 1

    def resumeRender(self):
        self._render_paused -= 1

    def layoutManager(self):
        return None  # no views

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass


class _LoadableModule:
    """``slicer.modules.<name>``: a module object whose ``logic()`` is the real module logic."""

    def __init__(self, name, logic):
        self.name = name
        self._logic = logic

    def logic(self):
        return self._logic


# ------------------------------------------------------------------------------------------- i18n
def _make_i18n():
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return i18n


# ---------------------------------------------------------------------------- ScriptedLoadableModule
def _make_scripted_loadable_module(slicer):
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class _Parent:
        def __init__(self):
            self.title = self.helpText = self.acknowledgementText = ""
            self.categories, self.dependencies, self.contributors = [], [], []

    class ScriptedLoadableModule:
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else _Parent()
            self.moduleName = type(self).__name__
            slicer.selfTests[self.moduleName] = self.runTest

        def runTest(self, msec=100, **kwargs):
            module = sys.modules[type(self).__module__]
            getattr(module, self.moduleName + "Test")().runTest()

    class ScriptedLoadableModuleLogic:
        isSingletonParameterNode = True

        def __init__(self, parent=None):
            name = type(self).__name__
            self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name

        def getParameterNode(self):
            """The module's singleton vtkMRMLScriptedModuleNode, created on first use."""
            scene = slicer.mrmlScene
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                node = scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
                if node.GetAttribute("ModuleName") == self.moduleName:
                    return node
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            return scene.AddNode(node)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            raise NotImplementedError("no GUI in the slicer-core harness")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, methodName="runTest"):
            super().__init__(methodName)

        def delayDisplay(self, message, msec=100):
            slicer.app.processEvents()

        def runTest(self):
            for name in sorted(n for n in dir(self) if n.startswith("test")):
                self.setUp()
                getattr(self, name)()

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return slm


# ------------------------------------------------------------------------------ parameterNodeWrapper
class _Validator:
    def check(self, name, value):
        pass


class Choice(_Validator):
    def __init__(self, choices):
        self.choices = list(choices)

    def check(self, name, value):
        if value not in self.choices:
            raise ValueError(f"{name}: {value!r} is not one of {self.choices}")


class WithinRange(_Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def check(self, name, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{name}: {value!r} is outside [{self.minimum}, {self.maximum}]")


class RangeBounds(_Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def check(self, name, value):
        if not (self.minimum <= value.minimum <= value.maximum <= self.maximum):
            raise ValueError(f"{name}: ({value.minimum}, {value.maximum}) is outside [{self.minimum}, {self.maximum}]")


class FloatRange:
    def __init__(self, minimum=0.0, maximum=0.0):
        self.minimum, self.maximum = float(minimum), float(maximum)

    def __eq__(self, other):
        return isinstance(other, FloatRange) and (self.minimum, self.maximum) == (other.minimum, other.maximum)

    def __repr__(self):
        return f"FloatRange({self.minimum}, {self.maximum})"


def _make_parameter_node_wrapper(slicer):
    """A decorator storing each annotated field in the wrapped vtkMRMLScriptedModuleNode: scalars, paths
    and ranges as parameters (strings), nodes and lists of nodes as node references."""
    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def _split(annotation):
        if typing.get_origin(annotation) is typing.Annotated:
            base, *extras = typing.get_args(annotation)
            return base, [e for e in extras if isinstance(e, _Validator)]
        return annotation, []

    def _is_node_class(t):
        return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)

    def _field(name, base, validators, default):
        if _is_node_class(base):
            def get(self):
                return self.parameterNode.GetNodeReference(name)

            def set_(self, node):
                if node is not None and not node.IsA(base.__name__):
                    raise TypeError(f"{name} must be a {base.__name__}, got {node.GetClassName()}")
                self.parameterNode.SetNodeReferenceID(name, node.GetID() if node is not None else None)
            return property(get, set_)
        if typing.get_origin(base) is list and _is_node_class(typing.get_args(base)[0]):
            def get(self):
                p = self.parameterNode
                return [p.GetNthNodeReference(name, i) for i in range(p.GetNumberOfNodeReferences(name))]

            def set_(self, nodes):
                p = self.parameterNode
                p.RemoveNodeReferenceIDs(name)
                for node in nodes:
                    p.AddNodeReferenceID(name, node.GetID())
            return property(get, set_)

        def to_text(value):
            if base is bool:
                return "true" if value else "false"
            if base is FloatRange:
                return f"{value.minimum!r},{value.maximum!r}"
            return str(value)

        def from_text(text):
            if base is bool:
                return text == "true"
            if base is FloatRange:
                lo, hi = text.split(",")
                return FloatRange(float(lo), float(hi))
            if isinstance(base, type) and issubclass(base, enum.Enum):
                return base[text]
            return base(text)

        def get(self):
            text = self.parameterNode.GetParameter(name)
            return from_text(text) if text != "" else default

        def set_(self, value):
            if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            if base in (str, float, int, bool) and not isinstance(value, base):
                raise TypeError(f"{name} must be a {base.__name__}, got {value!r}")
            for v in validators:
                v.check(name, value)
            self.parameterNode.SetParameter(name, to_text(value))
        return property(get, set_)

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        defaults = {}
        for name, annotation in hints.items():
            base, validators = _split(annotation)
            default = cls.__dict__.get(name)
            for v in validators:
                if default is not None and not _is_node_class(base):
                    v.check(name, default)  # a default outside its own choices is a bug
            defaults[name] = (base, default)
            setattr(cls, name, _field(name, base, validators, default))

        def __init__(self, parameterNode):
            self.parameterNode = parameterNode
            for name, (_base, default) in defaults.items():
                if default is not None and parameterNode.GetParameter(name) == "":
                    setattr(self, name, default)  # written once, as Slicer's wrapper does

        def connectGui(self, ui):
            raise NotImplementedError("no GUI in the slicer-core harness")

        cls.__init__ = __init__
        cls.connectGui = connectGui
        cls.disconnectGui = lambda self, tag: None
        cls.allParameters = property(lambda self: {n: getattr(self, n) for n in defaults})
        return cls

    pnw.parameterNodeWrapper = parameterNodeWrapper
    pnw.Choice, pnw.WithinRange, pnw.RangeBounds, pnw.FloatRange = Choice, WithinRange, RangeBounds, FloatRange
    return pnw


# ------------------------------------------------------------------------------------- the harness
class SlicerCoreApp:
    """One MRML scene with Slicer's application logic and module logics, and the stand-ins installed.

    After :meth:`install`, ``import MultiPlaneFusion`` loads the module as Slicer would (its folder on
    ``sys.path``, its library next to it).
    """

    def __init__(self, temporary_path=None):
        import slicer
        import vtk

        self.slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        # What the application does at start-up (qSlicerCoreApplication + each module's setup): the
        # application logic observes the scene, the colour logic adds its default colour tables, and every
        # module logic gets the scene and the application logic and is registered under its module name.
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.SetViewLogics(vtk.vtkCollection())
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
        self.logics = {}
        for module, cls in (("Volumes", "vtkSlicerVolumesLogic"),
                            ("Models", "vtkSlicerModelsLogic"),
                            ("Transforms", "vtkSlicerTransformLogic"),
                            ("Segmentations", "vtkSlicerSegmentationsModuleLogic")):
            logic = getattr(slicer, cls)()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(module, logic)
            self.logics[module] = logic
        self.temporary_path = temporary_path or tempfile.mkdtemp(prefix="mpf-slicer-core-")
        os.makedirs(self.temporary_path, exist_ok=True)

    def install(self):
        """Put the stand-ins in ``sys.modules`` and on ``slicer``; returns the ``slicer`` package."""
        slicer = self.slicer
        slicer.mrmlScene = self.scene
        slicer.app = _App(self.scene, self.app_logic, self.temporary_path)
        slicer.selfTests = {}
        slicer.modules = types.SimpleNamespace(
            **{name.lower(): _LoadableModule(name, logic) for name, logic in self.logics.items()})
        i18n = _make_i18n()
        slm = _make_scripted_loadable_module(slicer)
        pnw = _make_parameter_node_wrapper(slicer)
        slicer.i18n, slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper = i18n, slm, pnw
        sys.modules.update({"qt": _make_qt(), "ctk": types.ModuleType("ctk"), "slicer.i18n": i18n,
                            "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw})
        if str(MODULE_DIR) not in sys.path:
            sys.path.insert(0, str(MODULE_DIR))  # Slicer puts each scripted module's folder on the path
        return slicer

    def module(self):
        """The MultiPlaneFusion module, imported with the stand-ins, and registered in slicer.modules."""
        import MultiPlaneFusion

        self.slicer.modules.multiplanefusion = MultiPlaneFusion.MultiPlaneFusion(None)
        return MultiPlaneFusion
