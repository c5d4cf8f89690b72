"""Where the real scanner series are, and extracting one archive of them.

The shared data (``$MPF_SHARED_DATA``, else ``../shared/data`` next to the checkout) holds
``dcm_qa_ct/<name>.tar.gz`` archives, one DICOM series each. Tests extract into their session's temporary
folder, benchmarks into a cache; nothing is ever copied into the repository.
"""

import os
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir():
    """The dcm_qa_ct folder of the shared data, or None when absent."""
    for c in (os.environ.get("MPF_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if c and (Path(c) / "dcm_qa_ct").is_dir():
            return Path(c) / "dcm_qa_ct"
    return None


def extract_archive(archive, dest):
    """Extract ``archive`` into the folder ``dest`` (created) and return the one series folder it holds.

    Each archive needs its own ``dest``: two archives hold a folder of the same name."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(dest)
    (series,) = [p for p in dest.iterdir() if p.is_dir()]
    return series
