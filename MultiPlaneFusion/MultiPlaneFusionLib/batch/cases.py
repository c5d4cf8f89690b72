"""The cases of a batch: read from a manifest (CSV or JSON) or found in a DICOM folder tree.

A case is an ID (the name of its output folder) and the stack paths ``run`` would be given. Pure Python
(no Dask): the CLI checks a manifest before it starts a cluster.
"""

import csv
import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..errors import InputError

# Files the batch writes at the top of OUTDIR: a case may not be called that.
RESERVED_NAMES = ("batch.csv", "batch.json")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Case:
    """One case: ``case`` (ID, a folder name), ``stacks`` (absolute paths) and where it came from
    (``origin``: "manifest.csv line 3", "DICOM tree"); ``patient_id``/``study_uid`` for a DICOM tree;
    ``problem``: why the case cannot run although it was listed (it is reported failed, the others go on);
    ``headers``: the DICOM headers read by the discovery, reused for the memory estimate."""

    case: str
    stacks: List[str]
    origin: str = ""
    patient_id: str = ""
    study_uid: str = ""
    problem: Optional[str] = None
    headers: Optional[list] = field(default=None, repr=False, compare=False)


def load_cases(path):
    """The cases of ``path``: a ``.csv`` or ``.json`` manifest, or a DICOM folder tree.

    Raises InputError (one line) for a manifest that cannot be used at all; a case listed twice with
    the same stacks is kept once, with different stacks it is an error (both would write one folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return discover_cases(path)
    if not os.path.exists(path):
        raise InputError(f"batch input '{path}' does not exist")
    lower = path.lower()
    if lower.endswith(".csv"):
        return read_csv_manifest(path)
    if lower.endswith(".json"):
        return read_json_manifest(path)
    raise InputError(f"batch input '{path}' is neither a .csv or .json manifest nor a DICOM folder tree")


def check_case_id(case, where):
    """Raise InputError unless ``case`` can be a folder name of its own under OUTDIR."""
    if not case or case != case.strip():
        raise InputError(f"{where}: the case ID '{case}' is empty or has leading/trailing spaces")
    if case in (".", "..") or case.startswith(".") or "/" in case or "\\" in case or "\0" in case:
        raise InputError(f"{where}: the case ID '{case}' must be a plain folder name (no '/', '\\', leading '.')")
    if case.lower() in RESERVED_NAMES:
        raise InputError(f"{where}: the case ID '{case}' is reserved for the batch summary")


def _resolve(path, base):
    path = os.path.expanduser(str(path).strip())
    if not os.path.isabs(path):
        path = os.path.join(base, path)
    return os.path.normpath(os.path.abspath(path))


def _collect(entries, manifest):
    """Cases from ``(case, [paths], where)`` entries: IDs checked, repeats merged or refused."""
    base = os.path.dirname(os.path.abspath(manifest))
    cases, first = [], {}
    for case, paths, where in entries:
        case = str(case)
        check_case_id(case, where)
        stacks = [_resolve(p, base) for p in paths if str(p).strip()]
        if not stacks:
            raise InputError(f"{where}: case '{case}' lists no stacks")
        key = case.lower()  # two IDs differing in case only are one folder on macOS and Windows
        if key in first:
            earlier = first[key]
            if earlier.case == case and earlier.stacks == stacks:
                continue  # the same line twice: one case
            raise InputError(f"{where}: case '{case}' is listed again with other stacks ({earlier.origin}); "
                             "case IDs name the output folders and must be unique")
        first[key] = Case(case=case, stacks=stacks, origin=where)
        cases.append(first[key])
    if not cases:
        raise InputError(f"manifest '{manifest}' lists no cases")
    return cases


def read_csv_manifest(path):
    """Cases of a CSV manifest with columns ``case`` and ``stacks`` (paths separated by ``;``, relative
    ones from the manifest's folder); other columns are ignored, blank lines skipped."""
    name = os.path.basename(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read manifest '{path}': {getattr(e, 'strerror', None) or e}") from None
    if rows and not {"case", "stacks"} <= set(columns):
        raise InputError(f"manifest '{path}' needs the columns 'case' and 'stacks' (found: {', '.join(columns)})")
    entries = []
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        row = {str(k).strip().lower(): (v or "") for k, v in row.items() if k is not None}
        if not any(str(v).strip() for v in row.values()):
            continue
        entries.append((row["case"].strip(), row["stacks"].split(";"), f"{name} line {n}"))
    return _collect(entries, path)


def read_json_manifest(path):
    """Cases of a JSON manifest: a list of ``{"case": ID, "stacks": [PATH, ...]}``."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise InputError(f"cannot read manifest '{path}': {e.strerror or e}") from None
    except ValueError as e:
        raise InputError(f"manifest '{path}' is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise InputError(f"manifest '{path}' must hold a list of {{\"case\": ID, \"stacks\": [PATH, ...]}}")
    entries = []
    for n, item in enumerate(data):
        where = f"{name} item {n}"
        if not isinstance(item, dict) or "case" not in item or "stacks" not in item:
            raise InputError(f"{where}: expected {{\"case\": ID, \"stacks\": [PATH, ...]}}")
        stacks = item["stacks"]
        if isinstance(stacks, str) or not isinstance(stacks, list) or not all(isinstance(p, str) for p in stacks):
            raise InputError(f"{where}: 'stacks' must be a list of paths")
        entries.append((item["case"], stacks, where))
    return _collect(entries, path)


# ------------------------------------------------------------------------------------------ DICOM tree
def case_id_for(patient_id, study_uid):
    """A folder name for a study: the PatientID made safe, and a short hash of the StudyInstanceUID
    (the full UID is recorded in the case's row)."""
    patient = _UNSAFE.sub("_", patient_id).strip("._") or "anonymous"
    return f"{patient[:48]}_{hashlib.sha1(study_uid.encode()).hexdigest()[:8]}"


def discover_cases(root):
    """One case per PatientID + StudyInstanceUID found under ``root``; a case's stacks are the folders
    holding its series files (what ``run`` would be given).

    A folder read recursively must not pick up another study: a folder holding (directly or in its
    sub-folders) files of two studies makes those cases fail with a message, the others go on."""
    from ..reading import scan_folder

    groups, _skipped = scan_folder(root)
    studies = defaultdict(list)  # (patient, study) -> [group]
    for group in groups:
        ds = group[0][1]
        studies[(str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""))].append(group)
    if not studies:
        raise InputError(f"no DICOM image series found under '{root}'")
    root = os.path.abspath(root)
    below = defaultdict(set)  # folder -> studies with files in it or under it
    for key, study_groups in studies.items():
        for group in study_groups:
            for path, _ in group:
                folder = os.path.dirname(os.path.abspath(path))
                while True:
                    below[folder].add(key)
                    if folder == root or len(folder) <= len(root):
                        break
                    folder = os.path.dirname(folder)
    cases, used = [], {}
    for key in sorted(studies):
        patient, study = key
        folders = sorted({os.path.dirname(os.path.abspath(p)) for g in studies[key] for p, _ in g})
        case = Case(case=case_id_for(patient, study), stacks=folders, origin="DICOM tree", patient_id=patient,
                    study_uid=study, headers=studies[key])
        if case.case.lower() in used:  # a hash collision of two studies of one patient: keep both apart
            case.case = f"{case.case}_{len(used)}"
        used[case.case.lower()] = case
        mixed = [f for f in folders if len(below[f]) > 1]
        if mixed:
            others = len(below[mixed[0]]) - 1
            case.problem = (f"folder '{mixed[0]}' also holds series of {others} other stud"
                            f"{'y' if others == 1 else 'ies'}: give this study's series folders in a manifest")
        cases.append(case)
    return cases


def find_duplicates(cases) -> List[Tuple[int, int]]:
    """``(index, index of the first case with the same stacks)`` for cases listing exactly the stacks of
    an earlier case (the same study under two IDs): they are reported and not run twice."""
    seen, out = {}, []
    for n, case in enumerate(cases):
        key = tuple(sorted(os.path.realpath(p) for p in case.stacks))
        if key in seen:
            out.append((n, seen[key]))
        else:
            seen[key] = n
    return out
