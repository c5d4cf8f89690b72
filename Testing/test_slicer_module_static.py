"""Checks of the Slicer extension that run without Slicer.

- Python 3.9 compatibility of every .py under MultiPlaneFusion/ (vermin; Slicer 5.8 ships Python 3.9);
- the module imports only what Slicer bundles (plus its own library);
- every ``self.ui.<name>`` in the module exists in the .ui with a widget class that supports how it is used;
- every .ui widget bound with ``SlicerParameterName`` names a field of the parameter node wrapper, with a
  widget class and annotations that Slicer's parameterNodeWrapper GUI connectors accept (5.8 and later);
- every file listed in the CMake files exists and every library file is listed (or globbed);
- the catalog entry validates against the extension index schema v1.0.1; the icons are 128x128 PNG.

The module and its library are read as text (ast, XML, regular expressions; the readers are in
support/static_files.py): nothing is imported, except in the last section, which runs the Logic with
Slicer's Python modules stood in.
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
from support.slicer_stand_ins import load_module_file, slicer_stand_in_modules
from support.static_files import (
    SCHEMA_URL,
    base_kind,
    module_cmake_files,
    parameter_fields,
    png_size,
    python_files,
    read,
    top_cmake,
    ui_usages,
    ui_widgets,
    validate_catalog_entry,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "MultiPlaneFusion")
MODULE_PY = os.path.join(MODULE_DIR, "MultiPlaneFusion.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "MultiPlaneFusion.ui")
LIB_DIR = os.path.join(MODULE_DIR, "MultiPlaneFusionLib")
CATALOG = os.path.join(ROOT, "MultiPlaneFusion.json")

# What Slicer 5.8..5.12 bundles and the module may import, and the standard-library modules it uses.
SLICER_PROVIDED = {"numpy", "vtk", "qt", "ctk", "slicer", "SimpleITK", "sitkUtils", "SampleData", "MultiPlaneFusionLib"}
STDLIB_ALLOWED = {"logging", "os", "pathlib", "threading", "time", "typing", "traceback", "json", "enum",
                  "dataclasses", "queue", "tempfile", "shutil", "unittest", "math", "collections", "functools"}

# Extension-index categories accepted by the ExtensionsIndex checks (and Slicer's module categories).
ACCEPTED_CATEGORIES = {
    "Surface Models", "Segmentation", "Registration", "Filtering", "Quantification", "Utilities",
    "Converters", "Printing", "Shape Analysis", "IGT", "Informatics", "Examples",
}


def module_tree():
    return ast.parse(read(MODULE_PY), MODULE_PY)


# ------------------------------------------------------------------------------- Python 3.9 syntax
def test_every_python_file_is_python39_compatible():
    files = python_files(MODULE_DIR)
    assert MODULE_PY in files and any(f.startswith(LIB_DIR) for f in files)
    proc = subprocess.run(
        # vermin has no __main__; call its entry point (it reads sys.argv) in the test's interpreter.
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
         "-t=3.9-", "--no-tips", "--violations", "--eval-annotations", *files],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"vermin found code that needs Python > 3.9:\n{proc.stdout}\n{proc.stderr}"


def test_module_imports_only_what_slicer_provides():
    tree = module_tree()
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in STDLIB_ALLOWED and top not in SLICER_PROVIDED:
                bad.append(f"line {node.lineno}: {name}")
    assert not bad, "the module imports packages Slicer does not bundle: " + ", ".join(bad)


def test_module_classes_follow_the_template():
    tree = module_tree()
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["MultiPlaneFusion"]
    assert "ScriptedLoadableModuleWidget" in classes["MultiPlaneFusionWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["MultiPlaneFusionLogic"]
    assert "ScriptedLoadableModuleTest" in classes["MultiPlaneFusionTest"]
    text = read(MODULE_PY)
    assert re.search(r'title = _\("Multi-Plane Fusion"\)', text)
    assert re.search(r'categories = \[translate\("qSlicerAbstractCoreModule", "Surface Models"\)\]', text)
    assert re.search(r'loadUI\(self\.resourcePath\("UI/MultiPlaneFusion\.ui"\)\)', text)
    # The Logic's console entry points, in SlicerElastix's shape.
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MultiPlaneFusionLogic")
    methods = {f.name: [a.arg for a in f.args.args] for f in logic.body if isinstance(f, ast.FunctionDef)}
    assert methods["process"] == ["self", "inputNodes", "settings", "outputs", "progressCallback", "cancel"]
    assert methods["processParameterNode"][:2] == ["self", "parameterNode"]
    test_methods = [f.name for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "MultiPlaneFusionTest"
                    for f in c.body if isinstance(f, ast.FunctionDef)]
    assert sum(name.startswith("test_") for name in test_methods) >= 2


# ------------------------------------------------------------------------------------- .ui and GUI
# How the module uses a widget -> the Qt/CTK/MRML classes that support that use.
BUTTONS = {"QPushButton", "QToolButton", "QCheckBox", "ctkCheckBox", "QRadioButton", "ctkCheckablePushButton"}
NODE_COMBOS = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLSubjectHierarchyComboBox"}
USAGE_CLASSES = {
    "currentNode": NODE_COMBOS,
    "setCurrentNode": NODE_COMBOS,
    "nodeCount": NODE_COMBOS,
    "nodeFromIndex": NODE_COMBOS,
    "checkedNodes": {"qMRMLCheckableNodeComboBox"},
    "checkState": {"qMRMLCheckableNodeComboBox"},
    "setCheckState": {"qMRMLCheckableNodeComboBox"},
    "checked": BUTTONS,
    "collapsed": {"ctkCollapsibleButton", "ctkCollapsibleGroupBox"},
    "currentPath": {"ctkPathLineEdit"},
    "minimumValue": {"ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"},
    "maximumValue": {"ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"},
    "value": {"QProgressBar", "QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "QSlider"},
    "text": {"QLabel", "QLineEdit", "QPushButton", "QToolButton", "QCheckBox", "ctkCollapsibleButton",
             "QRadioButton"},
    "wordWrap": {"QLabel"},
}
SIGNAL_CLASSES = {
    "clicked": BUTTONS | {"ctkCollapsibleButton"},
    "toggled": BUTTONS | {"ctkCollapsibleButton"},
    "checkedNodesChanged": {"qMRMLCheckableNodeComboBox"},
    "currentNodeChanged": NODE_COMBOS,
    "valueChanged": {"QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "QSlider"},
    "currentIndexChanged": {"QComboBox", "ctkComboBox"},
    "currentPathChanged": {"ctkPathLineEdit"},
}


def test_every_ui_widget_used_by_the_module_exists_with_a_suitable_class():
    widgets, _, _ = ui_widgets(UI_FILE)
    uses = ui_usages(module_tree())
    assert uses, "the module never uses self.ui"
    problems = []
    for name, used, line in uses:
        if name not in widgets:
            problems.append(f"line {line}: self.ui.{name} is not in MultiPlaneFusion.ui")
            continue
        cls = widgets[name][0]
        if used and used.startswith("signal:"):
            allowed = SIGNAL_CLASSES.get(used[7:])
        else:
            allowed = USAGE_CLASSES.get(used)
        if allowed is not None and cls not in allowed:
            problems.append(f"line {line}: self.ui.{name}.{used} needs one of {sorted(allowed)}, the .ui has {cls}")
    assert not problems, "\n".join(problems)


# Widgets the module panel must have: name -> (class, bound parameter or None).
REQUIRED_WIDGETS = {
    "axialVolumeSelector": ("qMRMLNodeComboBox", "axialVolume"),
    "coronalVolumeSelector": ("qMRMLNodeComboBox", "coronalVolume"),
    "sagittalVolumeSelector": ("qMRMLNodeComboBox", "sagittalVolume"),
    "extraVolumesSelector": ("qMRMLCheckableNodeComboBox", None),
    "outputVolumeSelector": ("qMRMLNodeComboBox", "outputVolume"),
    "outputSegmentationSelector": ("qMRMLNodeComboBox", "outputSegmentation"),
    "outputModelSelector": ("qMRMLNodeComboBox", "outputModel"),
    "applyButton": ("QPushButton", None),
    "progressBar": ("QProgressBar", None),
    "statusLabel": ("QLabel", None),
    "exportButton": ("QPushButton", None),
}


def test_ui_has_the_widgets_of_the_module_panel():
    widgets, top, connections = ui_widgets(UI_FILE)
    assert widgets[top][0] == "qMRMLWidget"
    for name, (cls, param) in REQUIRED_WIDGETS.items():
        assert name in widgets, f"{name} is missing from the .ui"
        assert widgets[name][0] == cls, f"{name} is a {widgets[name][0]}, expected {cls}"
        assert widgets[name][2] == param, f"{name} is bound to {widgets[name][2]!r}, expected {param!r}"
    # "create new" output volume.
    out = widgets["outputVolumeSelector"][1]
    assert out.get("addEnabled") == "true" and out.get("noneEnabled") == "true"
    # Inputs list scalar volumes only (no labelmaps).
    for name in ("axialVolumeSelector", "coronalVolumeSelector", "sagittalVolumeSelector", "extraVolumesSelector"):
        assert widgets[name][1].get("nodeTypes") == ["vtkMRMLScalarVolumeNode"], name
        assert widgets[name][1].get("showChildNodeTypes") == "false", name
    titles = {props.get("text") for cls, props, _ in widgets.values() if cls == "ctkCollapsibleButton"}
    assert {"Reconstruction", "Bone model", "Export"} <= titles, titles
    # Every MRML widget gets the scene from the top-level widget, or it stays empty in Slicer.
    fed = {r for s, sig, r, slot in connections
           if s == top and sig == "mrmlSceneChanged(vtkMRMLScene*)" and slot == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, (cls, _, _) in widgets.items() if cls.startswith("qMRML") and n != top}
    assert mrml <= fed, f"no mrmlSceneChanged -> setMRMLScene connection for {sorted(mrml - fed)}"
    assert all(r in widgets for _, _, r, _ in connections), "a .ui connection names a widget that does not exist"


def test_memory_limit_default_is_the_librarys():
    """memoryLimitGb defaults to 0, shown as "available memory" (the spin box's minimum, where Qt shows its
    special value text) and passed to the library as its default (None: 90 % of the available memory)."""
    fields, _ = parameter_fields(module_tree())
    _, extras, default = fields["memoryLimitGb"]
    assert ast.literal_eval(default) == 0.0 and extras["WithinRange"][0] == 0.0
    widgets, _, _ = ui_widgets(UI_FILE)
    (props,) = [props for cls, props, param in widgets.values() if param == "memoryLimitGb"]
    assert float(props["minimum"]) == 0.0 and "available" in props["specialValueText"]
    assert "p.memoryLimitGb or memory.DEFAULT_MEMORY_LIMIT_GB" in read(MODULE_PY)

# parameterNodeWrapper's GUI connectors (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, v5.8.1
# and main): widget class -> the parameter base types it can show.
CONNECTORS = {
    "QCheckBox": {"bool"}, "ctkCheckBox": {"bool"}, "QPushButton": {"bool"}, "ctkCheckablePushButton": {"bool"},
    "QSpinBox": {"int"}, "QSlider": {"int"},
    # 5.8 connects these to float only (int came later).
    "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "qMRMLSliderWidget": {"float"},
    "ctkDoubleSlider": {"float"}, "ctkDoubleSpinBox": {"float"}, "qMRMLSpinBox": {"float"},
    "QComboBox": {"str", "int", "float", "bool", "enum"}, "ctkComboBox": {"str", "int", "float", "bool", "enum"},
    "QLineEdit": {"str"}, "QLabel": {"str"}, "QTextEdit": {"str"},
    "ctkRangeWidget": {"FloatRange"}, "ctkDoubleRangeSlider": {"FloatRange"}, "qMRMLRangeWidget": {"FloatRange"},
    "ctkPathLineEdit": {"path"}, "ctkDirectoryButton": {"path"},
    "qMRMLNodeComboBox": {"node"},
}
RESERVED = {"allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
            "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver",
            "RemoveObserver", "Modified", "parameterNode"}


def test_bound_widgets_name_real_parameters_with_working_connectors():
    fields, _ = parameter_fields(module_tree())
    widgets, _, _ = ui_widgets(UI_FILE)
    problems = []
    bound = {}
    for name, (cls, _, param) in widgets.items():
        if param is None:
            continue
        if param in bound:
            problems.append(f"{name} and {bound[param]} are both bound to '{param}'")
        bound[param] = name
        if param not in fields:
            problems.append(f"{name} is bound to '{param}', which is not a parameter of the wrapper")
            continue
        base, extras, _ = fields[param]
        kind = base_kind(base)
        if kind not in CONNECTORS.get(cls, set()):
            problems.append(f"{name} ({cls}) cannot show parameter '{param}' of type {base}")
        if cls in ("QComboBox", "ctkComboBox") and kind != "enum" and "Choice" not in extras:
            problems.append(f"'{param}' is shown in a combo box: it needs a Choice([...]) annotation")
        if cls in ("ctkSliderWidget", "qMRMLSliderWidget") and not (
                "WithinRange" in extras or ("Minimum" in extras and "Maximum" in extras)):
            problems.append(f"'{param}' is shown in a slider: it needs WithinRange (or Minimum and Maximum)")
        if kind == "FloatRange" and "RangeBounds" not in extras:
            problems.append(f"'{param}' is a FloatRange shown in a range widget: it needs RangeBounds")
    assert not problems, "\n".join(problems)


def test_every_parameter_reaches_the_gui_and_names_are_allowed():
    tree = module_tree()
    fields, _ = parameter_fields(tree)
    widgets, _, _ = ui_widgets(UI_FILE)
    bound = {param for _, _, param in widgets.values() if param}
    widget_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MultiPlaneFusionWidget")
    used_by_widget = {n.attr for n in ast.walk(widget_cls) if isinstance(n, ast.Attribute)}
    assert not set(fields) & RESERVED, f"reserved parameter names: {set(fields) & RESERVED}"
    orphans = [p for p in fields if p not in bound and p not in used_by_widget]
    assert not orphans, f"parameters neither bound in the .ui nor handled by the widget: {orphans}"
    # Every setting of the module is a parameter of the node.
    for needed in ("axialVolume", "coronalVolume", "sagittalVolume", "spacingMm", "method", "register",
                   "regularization", "thresholdPreset", "thresholdRange", "smoothing", "decimation",
                   "surfaceMethod", "exportFormat", "exportPath", "exportCoordinates", "outputVolume",
                   "outputSegmentation", "outputModel"):
        assert needed in fields, needed


def test_parameter_choices_come_from_the_library():
    """Every Choice of the parameter node names a list imported from MultiPlaneFusionLib (one place)."""
    tree = module_tree()
    fields, _ = parameter_fields(tree)
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("MultiPlaneFusionLib"):
            imported |= {a.asname or a.name for a in node.names}
    choices = {name: extras["Choice"][0] for name, (_, extras, _) in fields.items() if "Choice" in extras}
    assert len(choices) >= 8
    for name, arg in choices.items():
        m = re.fullmatch(r"list\((\w+)\)", str(arg))
        assert m and m.group(1) in imported, f"the choices of '{name}' ({arg}) are not a list from the library"


# ------------------------------------------------------------------------------------------ CMake


def test_cmake_lists_exist_and_cover_every_library_file():
    listed, globbed, cmds, build_args = module_cmake_files(MODULE_DIR)
    def exists(f):  # CMake accepts a script named without its .py
        return os.path.exists(os.path.join(MODULE_DIR, f)) or os.path.exists(os.path.join(MODULE_DIR, f + ".py"))

    missing = [f for f in listed if not exists(f)]
    assert not missing, f"listed in MultiPlaneFusion/CMakeLists.txt but missing: {missing}"
    covered = {os.path.normpath(f if f.endswith((".py", ".png", ".ui", ".svg", ".json", ".txt")) or
                                os.path.exists(os.path.join(MODULE_DIR, f)) else f + ".py")
               for f in listed + globbed}
    needed = [os.path.relpath(f, MODULE_DIR) for f in python_files(MODULE_DIR)]
    for dirpath, dirnames, filenames in os.walk(LIB_DIR):  # data files the library may read at run time
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        needed += [os.path.relpath(os.path.join(dirpath, f), MODULE_DIR) for f in filenames
                   if not f.endswith((".py", ".pyc"))]
    for sub in ("Icons", "UI"):
        folder = os.path.join(MODULE_DIR, "Resources", sub)
        needed += [os.path.relpath(os.path.join(folder, f), MODULE_DIR) for f in os.listdir(folder)]
    absent = sorted(set(os.path.normpath(n) for n in needed) - covered)
    assert not absent, f"not listed (nor globbed) in MultiPlaneFusion/CMakeLists.txt: {absent}"
    assert "WITH_GENERIC_TESTS" in build_args
    tests = [args for cmd, args in cmds if cmd == "slicer_add_python_unittest"]
    assert any(a[:2] == ["SCRIPT", "${MODULE_NAME}.py"] or a[:2] == ["SCRIPT", "MultiPlaneFusion.py"]
               for a in tests), "the self-test is not registered with slicer_add_python_unittest"


def test_top_level_cmake_follows_the_extension_template():
    cmds, vars_ = top_cmake(ROOT)
    names = [c for c, _ in cmds]
    assert names[0] == "cmake_minimum_required"
    project = [a for c, a in cmds if c == "project"]
    assert project and project[0][0] == "MultiPlaneFusion"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert vars_.get(key), f"{key} is not set"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/Slicer[\w.-]+", vars_["EXTENSION_HOMEPAGE"])
    for url in (vars_["EXTENSION_ICONURL"], *vars_["EXTENSION_SCREENSHOTURLS"].split()):
        assert url.startswith("https://") and url.endswith((".png", ".jpg", ".jpeg", ".gif")), url
        # The URLs point into this repository: the file must exist at that path.
        m = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)", url)
        assert m and os.path.isfile(os.path.join(ROOT, m.group(1))), f"{url} names no file of the repository"
    assert ("find_package", ["Slicer", "REQUIRED"]) in cmds
    assert ("include", ["${Slicer_USE_FILE}"]) in cmds
    assert ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]) in cmds
    assert ("include", ["${Slicer_EXTENSION_CPACK}"]) in cmds
    subdirs = [a[0] for c, a in cmds if c == "add_subdirectory"]
    assert "MultiPlaneFusion" in subdirs
    for d in subdirs:
        assert os.path.isfile(os.path.join(ROOT, d, "CMakeLists.txt")), f"add_subdirectory({d}) has no CMakeLists.txt"


# ---------------------------------------------------------------------------------- catalog entry
def test_catalog_entry_validates_and_agrees_with_cmake():
    with open(CATALOG, encoding="utf-8") as f:
        entry = json.load(f)
    assert validate_catalog_entry(entry) == []
    assert entry["$schema"] == SCHEMA_URL
    assert entry["category"] in ACCEPTED_CATEGORIES
    cmds, vars_ = top_cmake(ROOT)
    # The ExtensionsIndex checks: file name == project name; repository name starts with "Slicer".
    project = [a for c, a in cmds if c == "project"][0][0]
    assert os.path.splitext(os.path.basename(CATALOG))[0] == project
    assert not project.startswith("Slicer")
    assert entry["scm_url"].rstrip("/").removesuffix(".git") == vars_["EXTENSION_HOMEPAGE"].rstrip("/")
    if "EXTENSION_CATEGORY" in vars_:
        assert vars_["EXTENSION_CATEGORY"] == entry["category"]
    deps = vars_.get("EXTENSION_DEPENDS", "NA")
    assert sorted(entry.get("build_dependencies", [])) == ([] if deps == "NA" else sorted(deps.split()))
    # The module's category agrees with the catalog's.
    assert f'translate("qSlicerAbstractCoreModule", "{entry["category"]}")' in read(MODULE_PY)


def test_catalog_validator_rejects_broken_entries():
    good = {"$schema": SCHEMA_URL, "category": "Surface Models", "scm_url": "https://x/SlicerY.git"}
    assert validate_catalog_entry(good) == []
    assert validate_catalog_entry({k: v for k, v in good.items() if k != "scm_url"})
    assert validate_catalog_entry({**good, "homepage": "x"})
    assert validate_catalog_entry({**good, "tier": 7})
    assert validate_catalog_entry({**good, "tier": True})
    assert validate_catalog_entry({**good, "scm_type": "svn"})
    assert validate_catalog_entry({**good, "enabled": "yes"})


def test_license_is_bsd3():
    text = read(os.path.join(ROOT, "LICENSE"))
    assert "BSD 3-Clause" in text and "MultiPlaneFusion contributors" in text
    assert "Neither the name of the copyright holder" in text


# ------------------------------------------------------------------------------------------- icons


@pytest.mark.parametrize("path", [
    os.path.join(ROOT, "MultiPlaneFusion.png"),
    os.path.join(MODULE_DIR, "Resources", "Icons", "MultiPlaneFusion.png"),
])
def test_icons_are_128_png(path):
    assert png_size(path) == (128, 128)


# ------------------------------------------------------------------- Logic wiring, Slicer stubbed out
# The Logic's prepare/compute steps touch only a volume node's array and matrices, so with a few stand-ins
# for Slicer's Python modules they run here against the real library: a renamed library option or a
# broken conversion fails in the main environment too. (Publish, export and the self-test run on Slicer's
# real MRML libraries in Testing/slicer_core, in their own environment: bash .ci/slicer-core.)
class _FakeVolumeNode:
    """The part of vtkMRMLScalarVolumeNode the Logic reads when converting an input."""

    def __init__(self, array, ijk_to_ras, name, parent_to_world=None):
        self.array, self.ijk_to_ras, self.name, self.parent = array, ijk_to_ras, name, parent_to_world

    def GetID(self):
        return "vtkMRMLScalarVolumeNode_" + self.name

    def GetName(self):
        return self.name

    def IsA(self, cls):
        return cls == "vtkMRMLScalarVolumeNode"

    def GetImageData(self):
        return object()

    def GetAttribute(self, name):
        return None

    def GetIJKToRASMatrix(self, m):
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(self.ijk_to_ras[r, c]))

    def GetParentTransformNode(self):
        return self.parent


class _FakeLinearTransformNode:
    def __init__(self, matrix):
        self.matrix = matrix

    def IsTransformToWorldLinear(self):
        return True

    def GetMatrixTransformToWorld(self, m):
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(self.matrix[r, c]))


@pytest.fixture
def stubbed_module(monkeypatch):
    """MultiPlaneFusion.py imported with stand-ins for slicer and qt (sys.modules restored afterwards)."""
    for name, module in slicer_stand_in_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return load_module_file(MODULE_PY, "MultiPlaneFusion_stubbed")


@pytest.fixture(scope="module")
def phantom_series():
    from MultiPlaneFusionLib import slicer_boundary as sb
    from MultiPlaneFusionLib.simulation import simulate_orthogonal_stacks

    stacks = simulate_orthogonal_stacks(thickness_mm=4.0, pixel_spacing_mm=1.5, scale=0.4, noise_hu=10.0, seed=0)
    return {s.orientation: sb.volume_from_stack(s) for s in stacks}


def test_parameter_defaults_are_the_librarys(stubbed_module):
    """The parameter node starts from the library's defaults (its option classes and its CT preset)."""
    from MultiPlaneFusionLib.model import ModelOptions
    from MultiPlaneFusionLib.model.thresholds import PRESETS, resolve_threshold
    from MultiPlaneFusionLib.pipeline import FuseOptions
    from MultiPlaneFusionLib.reconstruction.options import SrrOptions

    p = stubbed_module.MultiPlaneFusionParameterNode
    fusion, srr, model = FuseOptions(), SrrOptions(), ModelOptions()
    assert (p.method, p.extent, p.register) == (fusion.method, fusion.extent, fusion.register)
    assert p.regularizer == srr.regularizer
    assert (p.islands, p.minIslandMm3, p.fillCavities, p.removeThinMm, p.surfaceMethod, p.smoothing) == (
        model.islands, model.min_island_mm3, model.fill_cavities, model.remove_thin_mm, model.surface_method,
        model.smoothing)
    # The preset shown is the one the library applies to CT when none is named, with its range.
    lo, hi, label = resolve_threshold(None, preset=model.preset, auto=model.auto_threshold, modality="CT")
    assert label == f"preset {p.thresholdPreset}" and PRESETS[p.thresholdPreset] == (lo, hi)
    assert (p.thresholdRange.minimum, p.thresholdRange.maximum) == (lo, hi)


def test_logic_fuses_and_models_phantom_nodes_without_slicer(stubbed_module, phantom_series):
    import numpy as np

    from MultiPlaneFusionLib import slicer_boundary as sb

    nodes = {k: _FakeVolumeNode(px, m, k) for k, (px, m) in phantom_series.items()}
    logic = stubbed_module.MultiPlaneFusionLogic()
    # A rigid parent transform on one input is composed, not ignored: the coronal series moved away and
    # put back by its transform gives the same stack as the original.
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -3.0, 2.0)
    px, m = phantom_series["coronal"]
    moved = _FakeVolumeNode(px, np.linalg.inv(shift) @ m, "moved", _FakeLinearTransformNode(shift))
    assert np.allclose(logic.stackFromVolumeNode(moved).slice_origins_mm,
                       logic.stackFromVolumeNode(nodes["coronal"]).slice_origins_mm)

    from MultiPlaneFusionLib.model import ModelOptions
    from MultiPlaneFusionLib.pipeline import FuseOptions

    reports = []
    settings = stubbed_module.MultiPlaneFusionSettings(
        fusion=FuseOptions(method="srr", spacing_mm=2.0, register=False), model=ModelOptions(smoothing=0.3))
    job = logic.prepare([nodes["axial"], nodes["coronal"], nodes["sagittal"]], settings)
    logic.compute(job, lambda text, fraction: reports.append(fraction), None)
    assert reports[-1] == 1.0 and all(b >= a for a, b in zip(reports, reports[1:]))
    assert job.fusion.grid.spacing_mm == pytest.approx((2.0, 2.0, 2.0))
    assert job.model.report["closed"] and job.model.report["triangles"] > 100
    # The output volume's IJKToRAS (what publish sets) puts the fused voxels where the library put them.
    from MultiPlaneFusionLib.grid import grid_from_image

    ijk_to_ras = sb.ijk_to_ras_from_grid(grid_from_image(job.fusion.image))
    origin_lps = np.array(job.fusion.image.GetOrigin())
    assert np.allclose(sb.flip_points(ijk_to_ras[:3, 3]), origin_lps)
    status = logic.describeResult(job)
    assert "Fused 3 series (srr)" in status
    # The srr self-check reaches the status line, in the words that match its result.
    beats = job.fusion.summary["fusion_beats_single_series"]
    assert beats in (True, False) and ("WARNING self-check" in status) == (beats is False)
    job.fusion.summary["fusion_beats_single_series"] = False
    job.fusion.summary["fusion_worse_than_single_series"] = True
    assert "does not beat the best single series" in logic.describeResult(job)
    # a tie within the tolerance is said as such, not as a failure
    job.fusion.summary["fusion_worse_than_single_series"] = False
    job.fusion.summary["reconstruction"]["self_check"]["tie_fraction"] = 0.01
    tie = logic.describeResult(job)
    assert "WARNING self-check" in tie and "only as well as the best single series (within 1 %)" in tie
    assert "only one series" not in tie
    # one series alone is resampled, not fused: the status line says so
    job = logic.prepare([nodes["axial"]], settings)
    logic.compute(job, lambda text, fraction: None, None)
    assert "Fused 1 series" in logic.describeResult(job) and "WARNING only one series" in logic.describeResult(job)


def test_logic_refuses_bad_input_with_value_error(stubbed_module, phantom_series):
    import numpy as np

    from MultiPlaneFusionLib.errors import CancelledError
    from MultiPlaneFusionLib.model import ModelOptions
    from MultiPlaneFusionLib.pipeline import FuseOptions
    from MultiPlaneFusionLib.reconstruction.options import SrrOptions

    m = stubbed_module
    px, ijk = phantom_series["axial"]
    axial = _FakeVolumeNode(px, ijk, "axial")
    logic = m.MultiPlaneFusionLogic()
    # Settings are the library's option classes: they refuse bad values themselves, naming the setting.
    S = m.MultiPlaneFusionSettings
    bad = [
        (lambda: S(fusion=FuseOptions(method="magic")), "method"),
        (lambda: S(fusion=FuseOptions(spacing_mm=-1.0)), "spacing_mm"),
        (lambda: S(fusion=FuseOptions(extent="everything")), "extent"),
        (lambda: S(fusion=FuseOptions(srr=SrrOptions(regularizer="tv"))), "regularizer"),
        (lambda: S(model=ModelOptions(threshold=(500.0, 100.0))), "threshold range is empty"),
        (lambda: S(model=ModelOptions(preset="granite")), "preset"),
        (lambda: S(model=ModelOptions(remove_thin_mm=-1.0)), "remove_thin_mm"),
    ]
    for make, message in bad:
        # Settings built by a callable: the library's InputError reaches the user as ValueError.
        with pytest.raises(ValueError, match=message):
            logic.prepare(axial, make)
    with pytest.raises(ValueError, match="not writable|does not exist|folder"):
        logic.prepare(axial, m.MultiPlaneFusionSettings(
            export=m.MultiPlaneFusionExport(os.path.join(ROOT, "no such folder", "bone.stl"))))
    with pytest.raises(ValueError):
        m.MultiPlaneFusionExport("bone.ply")
    with pytest.raises(ValueError, match="export source"):
        m.MultiPlaneFusionExport("bone.stl", source="everything")
    with pytest.raises(ValueError, match="export needs the bone model"):
        logic.prepare(axial, m.MultiPlaneFusionSettings(model=None, export=m.MultiPlaneFusionExport("/tmp/b.stl")))
    with pytest.raises(ValueError, match="at least one"):
        logic.prepare(None)
    with pytest.raises(ValueError, match="twice"):
        logic.prepare([axial, axial])
    with pytest.raises(ValueError, match="output"):
        logic.prepare(axial, None, m.MultiPlaneFusionOutputs(volume=axial))
    mr = _FakeVolumeNode(np.abs(px) + 1.0, ijk, "mr")  # no air at -1000 HU: not CT
    with pytest.raises(ValueError, match="not CT"):
        logic.prepare(mr, m.MultiPlaneFusionSettings(model=ModelOptions(preset="bone")))
    logic.prepare(mr, m.MultiPlaneFusionSettings(model=ModelOptions(auto_threshold=True)))  # the MR route
    job = logic.prepare(axial, m.MultiPlaneFusionSettings(
        fusion=FuseOptions(method="average", spacing_mm=3.0), model=None))
    assert job.fuseOptions.register is False  # one series: nothing to register
    with pytest.raises(CancelledError):
        logic.compute(job, None, lambda: True)
    assert job.fusion is None
    assert logic.exportFilePath("/tmp/x", "STL") == "/tmp/x.stl"
    assert logic.exportFilePath("/tmp/x.stl", "OBJ") == "/tmp/x.obj"
