"""The batch's plain-Python parts (no Dask): manifests, DICOM-tree discovery, what counts as done, the
memory estimate from headers, worker planning; and that the library and the Slicer module import, and
``multiplanefusion batch`` fails with one line, where Dask is not installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from MultiPlaneFusionLib import memory
from MultiPlaneFusionLib.batch import (
    discover_cases,
    find_duplicates,
    input_fingerprint,
    load_cases,
    options_fingerprint,
    record,
)
from MultiPlaneFusionLib.batch.command import plan_workers
from MultiPlaneFusionLib.batch.estimate import estimate_case_bytes
from MultiPlaneFusionLib.errors import InputError
from MultiPlaneFusionLib.model import ModelOptions
from MultiPlaneFusionLib.pipeline import FuseOptions, plan_grid
from MultiPlaneFusionLib.reading import read_stacks
from MultiPlaneFusionLib.reconstruction.budget import estimate_fusion_bytes
from MultiPlaneFusionLib.reconstruction.options import SrrOptions
from MultiPlaneFusionLib.simulation import simulate_orthogonal_stacks, write_dicom_series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _series(folder, seed=0, patient_id="PHANTOM0001", study_uid=None, n=3):
    stacks = simulate_orthogonal_stacks(thickness_mm=4.0, pixel_spacing_mm=3.0, scale=0.3, noise_hu=5.0, seed=seed,
                                        study_uid=study_uid)
    out = []
    for k, s in enumerate(stacks[:n]):
        f = os.path.join(folder, s.orientation)
        write_dicom_series(s, f, series_number=k + 1, patient_id=patient_id)
        out.append(f)
    return out


# ------------------------------------------------------------------------------------------- manifests
def test_csv_manifest_resolves_paths_from_its_folder_and_merges_a_repeated_line(tmp_path):
    (tmp_path / "a").mkdir()
    m = tmp_path / "cases.csv"
    m.write_text("case,stacks,notes\nc1,a;/abs/b.nrrd,first\n\nc2, a ,\nc1,a;/abs/b.nrrd,again\n")
    cases = load_cases(str(m))
    assert [c.case for c in cases] == ["c1", "c2"]
    assert cases[0].stacks == [str(tmp_path / "a"), "/abs/b.nrrd"] and cases[1].stacks == [str(tmp_path / "a")]
    assert cases[0].origin == "cases.csv line 2"


@pytest.mark.parametrize("text,message", [
    ("case,stacks\nc1,a\nc1,b\n", "cases.csv line 3: case 'c1' is listed again with other stacks (cases.csv line 2)"),
    ("case,stacks\nC1,a\nc1,b\n", "cases.csv line 3: case 'c1' is listed again"),
    ("id,paths\nc1,a\n", "needs the columns 'case' and 'stacks' (found: id, paths)"),
    ("case,stacks\n../up,a\n", "cases.csv line 2: the case ID '../up' must be a plain folder name"),
    ("case,stacks\nbatch.csv,a\n", "is reserved for the batch summary"),
    ("case,stacks\nc1,\n", "cases.csv line 2: case 'c1' lists no stacks"),
    ("case,stacks\n", "lists no cases"),
])
def test_csv_manifest_errors_are_one_line_naming_the_line(tmp_path, text, message):
    m = tmp_path / "cases.csv"
    m.write_text(text)
    with pytest.raises(InputError) as e:
        load_cases(str(m))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_json_manifest_and_its_errors(tmp_path):
    m = tmp_path / "cases.json"
    m.write_text(json.dumps([{"case": "x", "stacks": ["s1", "s2"]}, {"case": "y", "stacks": ["/t"]}]))
    cases = load_cases(str(m))
    assert [(c.case, c.stacks) for c in cases] == [("x", [str(tmp_path / "s1"), str(tmp_path / "s2")]),
                                                   ("y", ["/t"])]
    for data, message in [({"case": "x"}, "must hold a list"), ([{"case": "x", "stacks": "s1"}], "item 0: 'stacks'"),
                          ([{"stacks": ["s"]}], "item 0: expected")]:
        m.write_text(json.dumps(data))
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            load_cases(str(m))
    m.write_text("[{")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_cases(str(m))
    (tmp_path / "cases.txt").write_text("case,stacks\n")
    with pytest.raises(InputError, match="neither a .csv or .json manifest nor a DICOM folder tree"):
        load_cases(str(tmp_path / "cases.txt"))


def test_the_same_stacks_under_two_ids_are_a_duplicate(tmp_path):
    m = tmp_path / "cases.json"
    m.write_text(json.dumps([{"case": "a", "stacks": ["s1", "s2"]}, {"case": "b", "stacks": ["s3"]},
                             {"case": "c", "stacks": ["s2", "./s1"]}]))
    assert find_duplicates(load_cases(str(m))) == [(2, 0)]


# ---------------------------------------------------------------------------------------------- DICOM tree
def test_dicom_tree_is_split_by_patient_and_study(tmp_path):
    tree = tmp_path / "tree"
    a1 = _series(str(tree / "ann" / "study1"), 0, "ANN", n=2)
    a2 = _series(str(tree / "ann" / "study2"), 1, "ANN", n=1)
    b1 = _series(str(tree / "bob" / "x"), 2, "BOB^2", n=3)
    cases = discover_cases(str(tree))
    assert len(cases) == 3
    by_folders = {tuple(c.stacks): c for c in cases}
    assert set(by_folders) == {tuple(sorted(a1)), tuple(a2), tuple(sorted(b1))}
    assert {c.patient_id for c in cases} == {"ANN", "BOB^2"} and len({c.study_uid for c in cases}) == 3
    bob = by_folders[tuple(sorted(b1))]
    assert bob.case.startswith("BOB_2_") and bob.problem is None and len(bob.headers) == 3
    assert all(c.problem is None for c in cases)


def test_a_folder_holding_two_studies_makes_those_cases_fail_not_the_others(tmp_path):
    tree = tmp_path / "tree"
    _series(str(tree / "mixed"), 0, "P1", n=1)  # mixed/axial: study of P1
    _series(str(tree / "mixed" / "axial" / "more"), 1, "P2", n=1)  # a study of P2 below it
    _series(str(tree / "clean"), 2, "P3", n=2)
    cases = {c.patient_id: c for c in discover_cases(str(tree))}
    assert "also holds series of 1 other study" in cases["P1"].problem
    assert cases["P2"].problem is None and cases["P3"].problem is None


# ---------------------------------------------------------------------------------------- done or not
def test_fingerprints_follow_the_files_and_the_settings_that_shape_outputs(tmp_path):
    folders = _series(str(tmp_path / "s"), n=2)
    fp = input_fingerprint(folders)
    assert fp == input_fingerprint(folders)
    f = sorted(os.listdir(folders[0]))[0]
    st = os.stat(os.path.join(folders[0], f))
    os.utime(os.path.join(folders[0], f), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert input_fingerprint(folders) != fp
    with pytest.raises(InputError, match="does not exist"):
        input_fingerprint([str(tmp_path / "gone")])
    base = options_fingerprint(FuseOptions(method="average"), ModelOptions(), "stl")
    # Memory limit and thread counts change no output: a case done under other values is still done.
    assert options_fingerprint(FuseOptions(method="average", memory_limit_gb=3, srr=SrrOptions(threads=1)),
                               ModelOptions(), "stl") == options_fingerprint(
        FuseOptions(method="average", srr=SrrOptions()), ModelOptions(), "stl")
    assert base != options_fingerprint(FuseOptions(method="srr"), ModelOptions(), "stl")
    assert base != options_fingerprint(FuseOptions(method="average", spacing_mm=2.0), ModelOptions(), "stl")
    assert base != options_fingerprint(FuseOptions(method="average"), ModelOptions(smoothing=0.1), "stl")
    assert base != options_fingerprint(FuseOptions(method="average"), ModelOptions(), "obj")


def test_a_case_is_done_only_with_its_summary_its_outputs_and_matching_fingerprints(tmp_path):
    out = str(tmp_path / "out")
    folder = os.path.join(out, "c")
    os.makedirs(folder)
    files = {k: os.path.join(folder, n) for k, n in (("volume", "fused.nrrd"), ("model", "bone.stl"),
                                                     ("report", "report.png"))}
    for p in files.values():
        with open(p, "w") as f:
            f.write("x")
    assert record.completed_summary(out, "c", "in", "opt") is None  # no summary: partial outputs
    fingerprints = {"input_fingerprint": "in", "options_fingerprint": "opt"}
    record.write_summary(out, "c", {"outputs": files, "batch": fingerprints})
    assert record.completed_summary(out, "c", "in", "opt")["outputs"] == files
    assert record.completed_summary(out, "c", "other", "opt") is None
    assert record.completed_summary(out, "c", "in", "other") is None
    os.remove(files["report"])
    assert record.completed_summary(out, "c", "in", "opt") is None
    with open(os.path.join(folder, ".fused.abc.partial.nrrd"), "w") as f:
        f.write("x")
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("mine")
    record.remove_partial(out, "c", "stl")
    assert sorted(os.listdir(folder)) == ["notes.txt"]  # ours removed (the summary first), the user's kept


def test_figures_from_a_run_summary():
    summary = {"mesh": {"triangles": 1200, "closed": True}, "fusion_beats_single_series": True, "stacks": [1, 2, 3],
               "reconstruction": {"self_check": {"per_stack": [
                   {"fusion_of_others_rms": 40.0, "best_single_rms": 90.0},
                   {"fusion_of_others_rms": 50.0, "best_single_rms": 70.0}], "stacks_not_beating_single_series": []}},
               "batch": {"wall_s": 3.5, "peak_memory_mb": 400.0}}
    row = record.figures_from_summary(summary)
    assert (row["triangles"], row["closed"], row["fusion_beats_single_series"]) == (1200, True, True)
    assert (row["fusion_rms"], row["best_single_rms"], row["stacks_not_beating_single_series"]) == (45.0, 80.0, 0)
    assert (row["n_stacks"], row["wall_s"], row["peak_memory_mb"]) == (3, 3.5, 400.0)
    assert record.figures_from_summary({"mesh": {}})["fusion_rms"] is None


# --------------------------------------------------------------------------------------- memory, workers
@pytest.mark.parametrize("method,spacing", [("average", 2.0), ("srr", 1.5)])
def test_the_estimate_from_headers_is_the_one_from_the_read_stacks(tmp_path, method, spacing):
    folders = _series(str(tmp_path / "s"), n=3)
    options = FuseOptions(method=method, spacing_mm=spacing, reference=1)
    stacks = read_stacks(folders)
    stacks = [stacks[1]] + [s for n, s in enumerate(stacks) if n != 1]
    grid = plan_grid(stacks, FuseOptions(method=method, spacing_mm=spacing))
    n_input = sum(s.n_voxels for s in stacks)
    fusion = estimate_fusion_bytes(stacks, grid, method, baseline_bytes=10**8, register=options.register)
    model = memory.estimate_model_bytes(grid.n_voxels, 10**8 + 4 * (grid.n_voxels + n_input), report=True)
    assert estimate_case_bytes(folders, options, baseline_bytes=10**8) == max(fusion, model)
    assert estimate_case_bytes(folders, options, baseline_bytes=10**8) >= memory.estimate_bytes(
        grid.n_voxels, n_input, method, 10**8)
    assert estimate_case_bytes([str(tmp_path / "missing")], options) is None


def test_workers_from_the_cores_the_cases_and_the_largest_estimate():
    gb = 1024**3
    assert plan_workers([1 * gb, 3 * gb], 10, 16 * gb, cpus=8) == (5, 16 * gb / 5)  # 16 GB / 3 GB
    assert plan_workers([1 * gb], 10, 16 * gb, cpus=2) == (2, 8 * gb)  # the cores
    assert plan_workers([1 * gb], 1, 16 * gb, cpus=8) == (1, 16 * gb)  # one case
    assert plan_workers([], 3, 4 * gb, cpus=2) == (2, 2 * gb)  # no estimate known: the cores
    assert plan_workers([20 * gb], 4, 16 * gb, cpus=8) == (1, 16 * gb)
    assert plan_workers([1 * gb], 4, 16 * gb, workers=3, cpus=8) == (3, 16 * gb / 3)


# ------------------------------------------------------------------------------------------- without Dask
BLOCK_DASK = textwrap.dedent("""
    import importlib.abc, sys

    class NoDask(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("dask", "distributed"):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoDask())
    for name in [m for m in sys.modules if m.split(".")[0] in ("dask", "distributed")]:
        del sys.modules[name]
""")

IMPORT_ALL = BLOCK_DASK + textwrap.dedent("""
    import importlib, pkgutil
    import MultiPlaneFusionLib

    skipped = {"MultiPlaneFusionLib.batch.engine"}  # the one module that imports Dask
    names = [m.name for m in pkgutil.walk_packages(MultiPlaneFusionLib.__path__, "MultiPlaneFusionLib.")]
    for name in names:
        if name not in skipped:
            importlib.import_module(name)

    # The Slicer module, with stand-ins for Slicer and Qt (it imports nothing else but the library).
    sys.path.insert(0, sys.argv[2])
    from support.slicer_stand_ins import load_module_file, slicer_stand_in_modules
    sys.modules.update(slicer_stand_in_modules())
    module = load_module_file(sys.argv[1], "MultiPlaneFusion")
    assert hasattr(module, "MultiPlaneFusionLogic")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))
    assert not loaded, loaded
    print(len(names), "modules")
""")


def test_the_library_and_the_slicer_module_import_without_dask():
    module_py = os.path.join(ROOT, "MultiPlaneFusion", "MultiPlaneFusion.py")
    testing = os.path.join(ROOT, "Testing")
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL, module_py, testing], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[0]) > 30


def test_batch_without_dask_is_one_line_and_exit_1(tmp_path):
    m = tmp_path / "cases.csv"
    m.write_text("case,stacks\nc1,a\n")
    code = BLOCK_DASK + "from MultiPlaneFusionLib.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    r = subprocess.run([sys.executable, "-c", code, "batch", str(m), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "multiplanefusion: error: multiplanefusion batch needs the batch extra: pip install 'multiplanefusion[batch]'"]
    assert not (tmp_path / "out").exists()
