"""FuseOptions refuses a setting out of range when made, with an InputError naming the setting."""

import pytest

from MultiPlaneFusionLib.errors import InputError
from MultiPlaneFusionLib.pipeline import FuseOptions


@pytest.mark.parametrize("bad, name", [
    ({"reference": -1}, "reference"),
    ({"background": float("nan")}, "background"),
    ({"background": float("inf")}, "background"),
])
def test_fuse_options_refuse_a_bad_reference_or_background(bad, name):
    with pytest.raises(InputError, match=name):
        FuseOptions(**bad)


def test_fuse_options_accept_the_edges_of_reference_and_background():
    assert FuseOptions(reference=0, background=None).reference == 0
    assert FuseOptions(reference=3, background=-1024.0).background == -1024.0
