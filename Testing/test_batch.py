"""``multiplanefusion batch`` on a local Dask cluster of 2 worker processes, with tiny phantom cases.

- a cohort with a corrupt case, a duplicate, a case whose worker is killed on every attempt (retried
  once, then reported) and one killed on its first attempt only (done on the retry); the same command
  again does only the cases not done;
- a DICOM tree (cases by PatientID + StudyInstanceUID) interrupted with Ctrl-C: exit 130, the finished
  cases kept, no partial output left; the same command again does only the missing cases.

The batch runs as a subprocess (its own cluster, the real CLI, real signals).
"""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("distributed", reason="the batch extra (dask[distributed]) is not installed")

from MultiPlaneFusionLib.simulation import simulate_orthogonal_stacks, write_dicom_series  # noqa: E402

FAST = ["--workers", "2", "--method", "average", "--no-register", "--spacing", "2.5"]
OUTPUTS = ("fused.nrrd", "bone.stl", "report.png", "summary.json")


def write_case(folder, seed, patient_id="PHANTOM0001"):
    """A tiny phantom study (axial, coronal, sagittal 4 mm series at 2.5 mm pixels); its folders."""
    stacks = simulate_orthogonal_stacks(thickness_mm=4.0, pixel_spacing_mm=2.5, scale=0.3, noise_hu=10.0, seed=seed)
    folders = []
    for n, s in enumerate(stacks):
        f = os.path.join(folder, s.orientation)
        write_dicom_series(s, f, series_number=n + 1, patient_id=patient_id)
        folders.append(f)
    return folders


def run_batch(args, env_extra=None, timeout=240):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "MultiPlaneFusionLib.cli", "batch", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def read_rows(outdir):
    with open(os.path.join(outdir, "batch.csv"), newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def assert_done(outdir, case):
    folder = os.path.join(outdir, case)
    assert all(os.path.getsize(os.path.join(folder, name)) > 0 for name in OUTPUTS), os.listdir(folder)
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    assert summary["batch"]["case"] == case and len(summary["batch"]["input_fingerprint"]) == 64
    assert summary["mesh"]["closed"] and summary["mesh"]["triangles"] > 100


def assert_nothing_left(outdir, case):
    folder = os.path.join(outdir, case)
    left = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    assert left == [], f"{case} left {left}"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    cases = {name: write_case(str(root / name), seed) for seed, name in enumerate(["A", "KILLED", "FLAKY"])}
    bad = write_case(str(root / "BAD"), 9)
    for path in glob.glob(os.path.join(bad[0], "*.dcm")):  # the axial series truncated mid pixel data
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    cases["BAD"] = bad
    cases["DUP"] = list(cases["A"])
    manifest = root / "cohort.json"
    manifest.write_text(json.dumps([{"case": k, "stacks": v} for k, v in cases.items()]))
    return root, manifest


def test_cohort_with_corrupt_duplicate_and_killed_cases_then_resume(cohort):
    root, manifest = cohort
    outdir = str(root / "out")
    t = time.perf_counter()
    r = run_batch([str(manifest), "-o", outdir, *FAST], {"MULTIPLANEFUSION_TEST_BATCH_KILL": "KILLED,FLAKY:1"})
    first_s = time.perf_counter() - t
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"multiplanefusion: error: 2 of 5 cases failed (their errors are in {outdir}/batch.csv)"
    assert "Traceback" not in r.stderr
    rows = read_rows(outdir)
    assert list(rows) == ["A", "KILLED", "FLAKY", "BAD", "DUP"]  # manifest order
    status = {k: v["status"] for k, v in rows.items()}
    assert status == {"A": "done", "KILLED": "failed", "FLAKY": "done", "BAD": "failed", "DUP": "duplicate"}
    # Killed mid-case (after its volume was written) on both attempts: reported, nothing left behind.
    assert rows["KILLED"]["attempts"] == "2" and "worker died on all 2 attempts" in rows["KILLED"]["message"]
    assert_nothing_left(outdir, "KILLED")
    assert rows["FLAKY"]["attempts"] == "2"  # killed once, done on the retry
    assert rows["BAD"]["message"].startswith("no usable DICOM image series in ")
    assert "\n" not in rows["BAD"]["message"]
    assert_nothing_left(outdir, "BAD")
    assert rows["DUP"]["message"] == "same stacks as case 'A'; not run twice"
    assert not os.path.exists(os.path.join(outdir, "DUP"))
    for case in ("A", "FLAKY"):
        assert_done(outdir, case)
        row = rows[case]
        assert int(row["triangles"]) > 100 and row["closed"] == "True"
        # Each worker was given half the budget; a case's measured peak stays below it.
        assert 0 < float(row["peak_memory_mb"]) < float(row["memory_limit_mb"])
        assert float(row["estimated_memory_mb"]) > 0 and float(row["wall_s"]) > 0
    assert rows["A"]["worker"].startswith("tcp://127.0.0.1:")
    with open(os.path.join(outdir, "batch.json")) as f:
        table = json.load(f)
    assert (table["done"], table["failed"], table["duplicate"], table["workers"]) == (2, 2, 1, 2)
    assert [c["status"] for c in table["cases"]] == list(status.values())

    # Again, without the killer: only the cases not done run (KILLED now succeeds, BAD fails again).
    stamps = {c: os.stat(os.path.join(outdir, c, "summary.json")).st_mtime_ns for c in ("A", "FLAKY")}
    r = run_batch([str(manifest), "-o", outdir, *FAST])
    assert r.returncode == 1, r.stderr
    rows = read_rows(outdir)
    assert {k: v["status"] for k, v in rows.items()} == {"A": "skipped", "KILLED": "done", "FLAKY": "skipped",
                                                       "BAD": "failed", "DUP": "duplicate"}
    assert stamps == {c: os.stat(os.path.join(outdir, c, "summary.json")).st_mtime_ns for c in stamps}
    assert rows["A"]["triangles"] != "" and rows["KILLED"]["attempts"] == "1"
    assert_done(outdir, "KILLED")
    assert first_s < 150


def test_dicom_tree_interrupted_with_ctrl_c_then_resumed(tmp_path):
    tree = tmp_path / "tree"
    for n in range(3):  # three patients, one study each
        write_case(str(tree / f"patient{n}" / "study"), 20 + n, patient_id=f"P{n:03d}")
    outdir = str(tmp_path / "out")
    # One worker: the cases run one after the other, so when the first is done at least one is still to come
    # (with two workers the other two could both finish before the signal arrives on an idle machine).
    args = [sys.executable, "-m", "MultiPlaneFusionLib.cli", "batch", str(tree), "-o", outdir, *FAST, "--workers", "1"]
    # A terminal's Ctrl-C goes to the whole process group: the batch's workers get it too.
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(glob.glob(os.path.join(outdir, "*", "summary.json"))) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=90)
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("multiplanefusion: error: interrupted: "), last
    rows = read_rows(outdir)
    assert len(rows) == 3 and {r["patient_id"] for r in rows.values()} == {f"P{n:03d}" for n in range(3)}
    done = [c for c, r in rows.items() if r["status"] == "done"]
    assert 1 <= len(done) < 3 and all(r["status"] == "interrupted" for c, r in rows.items() if c not in done)
    left = 3 - len(done)
    assert f"{len(done)} case{'s' if len(done) > 1 else ''} done kept, {left} case{'s' if left > 1 else ''} not" in last
    for case in rows:
        (assert_done if case in done else assert_nothing_left)(outdir, case)
    assert not glob.glob(os.path.join(outdir, "*", ".*partial*"))

    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    rows = read_rows(outdir)
    assert sorted(c for c, row in rows.items() if row["status"] == "skipped") == sorted(done)
    assert sorted(c for c, row in rows.items() if row["status"] == "done") == sorted(set(rows) - set(done))
    for case in rows:
        assert_done(outdir, case)
    assert f"batch: 3 cases: {3 - len(done)} done, {len(done)} done earlier, 0 failed" in r.stdout


def test_batch_on_an_existing_dask_cluster_leaves_it_running(cohort, tmp_path):
    from distributed import Client, LocalCluster

    root, _ = cohort
    manifest = tmp_path / "two.csv"
    manifest.write_text(f"case,stacks\nA,{';'.join(sorted(glob.glob(str(root / 'A' / '*'))))}\n"
                        f"B,{';'.join(sorted(glob.glob(str(root / 'FLAKY' / '*'))))}\n")
    outdir = str(tmp_path / "out")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      resources={"MEMORY": 4 * 1024**3}) as cluster, Client(cluster) as client:
        r = run_batch([str(manifest), "-o", outdir, "--scheduler", cluster.scheduler_address,
                       *[a for a in FAST if a not in ("--workers", "2")]])
        assert r.returncode == 0, r.stderr
        workers = set(client.scheduler_info()["workers"])
        assert len(workers) == 1  # still there: the batch closes only its own client
    rows = read_rows(outdir)
    assert [(c, row["status"], row["worker"] in workers) for c, row in rows.items()] == [("A", "done", True),
                                                                                       ("B", "done", True)]
    with open(os.path.join(outdir, "batch.json")) as f:
        assert json.load(f)["scheduler"] == cluster.scheduler_address


def test_a_case_above_its_workers_memory_share_fails_before_anything_runs(cohort, tmp_path):
    root, _ = cohort
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"case,stacks\nA,{';'.join(sorted(glob.glob(str(root / 'A' / '*'))))}\n")
    outdir = str(tmp_path / "out")
    r = run_batch([str(manifest), "-o", outdir, *FAST, "--memory-limit-gb", "0.02"])
    assert r.returncode == 1
    row = read_rows(outdir)["A"]
    assert row["status"] == "failed" and row["message"].startswith("needs about ")
    assert "above the 0.01 GB of one worker (--memory-limit-gb 0.02 over 2 workers)" in row["message"]
    assert not os.path.exists(os.path.join(outdir, "A"))
