"""Stand-ins for the parts of ``slicer`` and ``qt`` that MultiPlaneFusion.py imports, so that the module loads
without Slicer (the slicer-core tests in ``Testing/slicer_core`` use Slicer's real libraries instead)."""

import importlib.util
import types

import numpy as np


class Annotation:
    """Stand-in for parameterNodeWrapper's Choice / RangeBounds / WithinRange: keeps its arguments."""

    def __init__(self, *args, **kwargs):
        self.args = args


class FloatRange:
    """Stand-in for parameterNodeWrapper's FloatRange."""

    def __init__(self, minimum=0.0, maximum=0.0):
        self.minimum, self.maximum = minimum, maximum


def slicer_stand_in_modules():
    """``{module name: module}`` for ``slicer``, its submodules the module imports, and ``qt``."""
    slicer = types.ModuleType("slicer")
    for name in ("vtkMRMLModelNode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
        setattr(slicer, name, type(name, (), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.RangeBounds = pnw.WithinRange = Annotation
    pnw.FloatRange = FloatRange
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *args: None}))
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {})
    util.arrayFromVolume = lambda node: node.array
    util.arrayFromVTKMatrix = lambda m: np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    slicer.util = util
    return {"slicer": slicer, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw,
            "slicer.ScriptedLoadableModule": slm, "slicer.util": util, "qt": types.ModuleType("qt")}


def load_module_file(path, name):
    """Execute the module file ``path`` as module ``name`` (the stand-ins must already be in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
