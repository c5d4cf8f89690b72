"""Tests of the Slicer module on Slicer's real libraries (slicer-core): skipped where they are absent.

The main environment has no ``slicer`` package, so these tests are skipped there with the reason; CI runs
them in their own virtual environment (``.ci/slicer-core``), because slicer-core pins its own VTK.
"""

import pytest
from slicer_harness import SKIP_REASON, SlicerCoreApp, slicer_core_available


@pytest.fixture(scope="session")
def slicer_app(tmp_path_factory):
    if not slicer_core_available():
        pytest.skip(SKIP_REASON)
    app = SlicerCoreApp(str(tmp_path_factory.mktemp("slicer-temp")))
    app.install()
    return app


@pytest.fixture(scope="session")
def mpf(slicer_app):
    """The MultiPlaneFusion module (MultiPlaneFusion.py), imported as Slicer imports it."""
    return slicer_app.module()


@pytest.fixture
def slicer(slicer_app, mpf):
    """The real ``slicer`` package with a cleared scene."""
    slicer_app.scene.Clear(0)
    return slicer_app.slicer
