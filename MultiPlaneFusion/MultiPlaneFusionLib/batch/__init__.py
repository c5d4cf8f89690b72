"""``multiplanefusion batch``: many cases (a manifest or a DICOM tree) run on Dask, resumable.

Everything here except :mod:`.engine` is plain Python with the library's own dependencies; the engine
imports Dask (``pip install multiplanefusion[batch]``) and only the ``batch`` command imports it, so the
library and the Slicer module never do.
"""

from ..argtypes import int_at_least
from .cases import Case, discover_cases, find_duplicates, load_cases, read_csv_manifest, read_json_manifest
from .record import completed_summary, input_fingerprint, options_fingerprint

__all__ = [
    "Case",
    "add_arguments",
    "completed_summary",
    "discover_cases",
    "find_duplicates",
    "input_fingerprint",
    "load_cases",
    "options_fingerprint",
    "read_csv_manifest",
    "read_json_manifest",
]


def add_arguments(p):
    """The batch command's own arguments (the fuse and model options are those of ``run``); call it after
    the fusion arguments were added: it rewords --memory-limit-gb and --transforms-out for a batch."""
    p.add_argument("input", metavar="INPUT",
                   help="manifest (.csv with columns case and stacks, the stack paths separated by ';'; or .json, "
                        "a list of {\"case\": ID, \"stacks\": [PATH, ...]}) or a DICOM folder tree (one case per "
                        "PatientID + StudyInstanceUID)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="output folder: OUTDIR/<case>/ per case, OUTDIR/batch.csv and batch.json")
    p.add_argument("--model-format", choices=("stl", "obj", "ply", "vtp"), default="stl")
    g = p.add_argument_group("batch").add_mutually_exclusive_group()
    g.add_argument("--workers", type=int_at_least(1), metavar="N",
                   help="worker processes of the local Dask cluster (default: from the cores and the cases' "
                        "memory estimates)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://host:8786, instead of a local one")
    for action in p._actions:
        if "--memory-limit-gb" in action.option_strings:
            action.help = ("memory the whole batch may use on this machine, shared by the workers (default: 90%% "
                           "of the memory available); with --scheduler, the limit of each case")
        if "--transforms-out" in action.option_strings:
            action.help = "write each stack's rigid transform (ITK .tfm) into the folder NAME inside each case's folder"
            action.metavar = "NAME"
    return p
