"""Compressed transfer syntaxes load, through pydicom's decoders or, without them, through GDCM."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from MultiPlaneFusionLib.reading import read_stacks


def gdcm_transcode(src, dest, syntax):
    """JPEG Lossless has no pydicom encoder: transcode with GDCM (python-gdcm, a test dependency)."""
    gdcm = pytest.importorskip("gdcm", reason="python-gdcm is needed to write JPEG Lossless test files")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dest))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


def compressed_copy(src_folder, dest, syntax, n=4):
    """Re-encode the first n slices of a real series with another transfer syntax."""
    dest.mkdir()
    files = sorted(p for p in src_folder.iterdir() if p.name != "DIRFILE")[:n]
    for p in files:
        if syntax == JPEGLosslessSV1:
            gdcm_transcode(p, dest / p.name, syntax)
            continue
        ds = pydicom.dcmread(p)
        try:
            ds.compress(syntax)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            pytest.skip(f"no encoder for {syntax.name} here: {e}")
        ds.save_as(dest / p.name)
    return dest


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1])
def test_compressed_series_match_uncompressed(real_series, tmp_path, syntax):
    src = real_series("philips_axial_5mm")
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in sorted(q for q in src.iterdir() if q.name != "DIRFILE")[:4]:
        (plain / p.name).write_bytes(p.read_bytes())
    comp = compressed_copy(src, tmp_path / "comp", syntax)
    (a,) = read_stacks([plain])
    (b,) = read_stacks([comp])
    assert pydicom.dcmread(next(comp.iterdir())).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_allclose(a.slice_origins_mm, b.slice_origins_mm)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLosslessSV1])
def test_gdcm_fallback_when_pydicom_cannot_decode(real_series, tmp_path, monkeypatch, syntax):
    src = real_series("philips_axial_5mm")
    comp = compressed_copy(src, tmp_path / "comp", syntax)
    (expected,) = read_stacks([comp])

    def no_decoder(self):
        raise RuntimeError("no pixel data handler available (simulating Slicer without pylibjpeg)")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    (b,) = read_stacks([comp])
    np.testing.assert_array_equal(expected.pixels, b.pixels)
