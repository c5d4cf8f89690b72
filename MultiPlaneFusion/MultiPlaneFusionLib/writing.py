"""Writing outputs without ever leaving a half-written file: write to a temporary name, then rename."""

import contextlib
import os
import tempfile

import SimpleITK as sitk

from .errors import OutputError


def _check_target(path):
    """Raise OutputError when ``path`` is a folder or its folder is missing or read-only by permission;
    returns the absolute folder."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise OutputError(f"output path '{path}' is a folder, expected a file name")
    if not os.path.isdir(folder):
        raise OutputError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder '{folder}' is not writable")
    return folder


def check_writable(path):
    """Raise OutputError now (before long work) when ``path`` cannot be created."""
    folder = _check_target(path)
    # os.access says yes to root everywhere (and to read-only mounts, /proc, full quotas): create and remove a
    # probe file, so that the failure comes now and not after the reconstruction.
    try:
        fd, probe = tempfile.mkstemp(prefix=".mpf-probe.", dir=folder)
    except OSError as e:
        raise OutputError(f"output folder '{folder}' is not writable: {e.strerror or e}") from None
    os.close(fd)
    _remove(probe)


def make_folder(folder, what="output folder"):
    """Create ``folder`` (and its parents) if needed; True when this call created it, so that a failed run
    can remove what it made. Raises OutputError naming ``what`` when it cannot be created."""
    folder = os.fspath(folder)
    if os.path.isdir(folder):
        return False
    try:
        os.makedirs(folder)
    except OSError as e:
        raise OutputError(f"cannot create {what} '{folder}': {e.strerror or e}") from None
    return True


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path`` (same extension); rename it to ``path`` on success.

    On any exception the temporary file is removed and nothing appears at ``path``. Writers that pick
    the format from the extension keep working because the temporary name ends with the same one.
    """
    path = os.path.abspath(os.fspath(path))
    _check_target(path)  # the temporary file below is the probe check_writable would create
    folder, name = os.path.split(path)
    base, ext = _split_ext(name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".partial{ext}", dir=folder)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from None
    os.close(fd)
    try:
        yield tmp
        if not os.path.exists(tmp) or os.path.getsize(tmp) == 0:
            raise OutputError(f"writing '{path}' produced no data")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


def _umask():
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _split_ext(name):
    for double in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(double):
            return name[: -len(double)], name[-len(double):]
    base, ext = os.path.splitext(name)
    return base, ext


def _remove(p):
    with contextlib.suppress(OSError):
        os.remove(p)


VOLUME_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def _check_volume_format(path):
    lower = os.fspath(path).lower()
    if lower.endswith((".nhdr", ".mhd")):
        raise OutputError(f"'{path}': detached-header formats are not supported, use .nrrd, .nii.gz or .mha")
    if not lower.endswith(VOLUME_EXTENSIONS):
        raise OutputError(f"unsupported volume format '{path}': use .nrrd, .nii, .nii.gz or .mha")


def check_volume_path(path):
    """Raise OutputError unless ``path`` names a writable single-file volume format."""
    _check_volume_format(path)
    check_writable(path)


def write_image(image, path, compress=True):
    """Write a SimpleITK image (format from the extension: .nrrd, .nii(.gz), .mha) atomically."""
    _check_volume_format(path)  # atomic_path checks the folder
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, tmp, useCompression=compress)
        except RuntimeError as e:
            raise OutputError(f"cannot write '{path}': {str(e).strip().splitlines()[-1]}") from None
