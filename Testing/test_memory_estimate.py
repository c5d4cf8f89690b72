"""The memory estimate printed before a run covers the peak the run then reaches (measured in a fresh
process), and the default limit follows the machine's available memory."""

import json
import os
import subprocess
import sys

import pytest
from test_cli import write_volume

from MultiPlaneFusionLib import memory
from MultiPlaneFusionLib.errors import MemoryLimitError


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in kB and /proc/self/statm: Linux")
def test_estimate_covers_measured_peak(tmp_path):
    a = write_volume(tmp_path / "a.nrrd", size=(64, 64, 16), spacing=(1.0, 1.0, 4.0))
    b = write_volume(tmp_path / "b.nrrd", size=(64, 16, 64), spacing=(1.0, 4.0, 1.0))
    js = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "MultiPlaneFusionLib.cli", "fuse", str(a), str(b), "-o",
                        str(tmp_path / "f.nrrd"), "--spacing", "0.5", "--no-register", "--quiet", "--json", str(js)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    s = json.loads(js.read_text())
    estimate, peak = s["estimated_peak_memory_mb"], s["peak_memory_mb"]
    assert s["grid"]["n_voxels"] >= 2_000_000
    print(f"estimate {estimate:.0f} MB, measured peak {peak:.0f} MB")
    assert 0.9 * peak <= estimate <= 1.3 * peak, (estimate, peak)


def test_default_limit_is_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * 1024**3)
    assert memory.default_limit_gb() == pytest.approx(8 * memory.AVAILABLE_MARGIN)
    memory.check_limit(7 * 1024**3, None)
    with pytest.raises(MemoryLimitError, match="available"):
        memory.check_limit(7.5 * 1024**3, None)
    memory.check_limit(7.5 * 1024**3, 10.0)  # an explicit limit overrides
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert memory.default_limit_gb() == 16.0


def test_available_bytes_is_plausible():
    n = memory.available_bytes()
    assert n is None or 64 * 1024**2 < n <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory.current_rss_bytes() > 10 * 1024**2
