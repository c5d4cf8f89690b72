"""Shared fixtures: the real scanner series of ../shared/data, extracted on demand.

Each archive is extracted into its own folder of the session's temporary directory (two archives hold a
folder of the same name, S2010). Tests that need the data skip with an explicit reason when it is absent.
"""

import pytest
from support.shared_data import extract_archive, shared_data_dir

SERIES = {
    "philips_axial_1mm": "STD BRAIN 1MM (reference, 1 mm axial)",
    "philips_axial_5mm": "STD BRAIN 5MM (5 mm axial)",
    "philips_tilt_minus18": "STEREOTAXIS gantry tilt -18.5 deg",
    "philips_tilt_plus16": "STEREOTAXIS gantry tilt +16.5 deg",
    "ge_head_tilt_gaps": "GE head, tilt +18.5 deg, irregular gaps",
}


@pytest.fixture(scope="session")
def real_series(tmp_path_factory):
    """A function name -> extracted DICOM series folder (skips the test when the data is absent)."""
    root = shared_data_dir()
    cache = {}

    def get(name):
        if root is None:
            pytest.skip("real data absent: ../shared/data/dcm_qa_ct not found (set MPF_SHARED_DATA to its parent)")
        archive = root / f"{name}.tar.gz"
        if not archive.is_file():
            pytest.skip(f"real data absent: {archive} not found")
        if name not in cache:
            cache[name] = extract_archive(archive, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def real_stack(real_series):
    """A function name -> the Stack read from that series (read once per session)."""
    from MultiPlaneFusionLib.reading import read_stacks

    cache = {}

    def get(name):
        if name not in cache:
            (cache[name],) = read_stacks([real_series(name)])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def reference_grid(real_series):
    """The grid of the 1 mm Philips series (512 x 512 x 140 at 0.45 x 0.45 x 1 mm)."""
    from MultiPlaneFusionLib.reading import read_grid_source

    return read_grid_source(real_series("philips_axial_1mm"))
