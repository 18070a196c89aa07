"""The reader on every real file in ../shared/data/dicom, and on files written here with known pixels."""

from __future__ import annotations

import importlib.util

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from clinfuse.data.dicom import DicomReadError, decoder_report, read_dicom
from clinfuse.data.studies import DicomHeader, load_volume, scan_dicom, sort_slices
from clinfuse.config import CohortConfig, DicomConfig

from ..conftest import shared_dicom_dir, shared_index

HAS_LIBJPEG = importlib.util.find_spec("libjpeg") is not None

# Files that must be refused, with a fragment of the reason that names the cause.
REFUSED = {
    "fo-dicom/GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm": "unreadable DICOM header",
    "pydicom/no_meta.dcm": "not a DICOM file",
    "pydicom/MR_truncated.dcm": "truncated pixel data (8130 of 8192 bytes)",
    "pydicom/badVR.dcm": "invalid NumberOfFrames: '1A'",
    "pydicom/meta_missing_tsyntax.dcm": "PhotometricInterpretation is missing",
    "pydicom/JPEG-lossy.dcm": "every available decoder failed on JPEG Extended",
}
if not HAS_LIBJPEG:  # 12-bit JPEG Extended needs libjpeg (GPLv3, opt-in extra)
    REFUSED["pydicom/JPGExtended.dcm"] = "pylibjpeg-libjpeg"

INDEX = shared_index()


def _reference(path, row) -> np.ndarray:
    """pydicom's own decode + its modality LUT (+ functional-group rescale, colour LUT, luma, MONOCHROME1)."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    arr = ds.pixel_array
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float64)
    elif ds.get("SamplesPerPixel", 1) == 3:
        rgb = arr.astype(np.float64)
    else:
        rgb = None
    if rgb is not None:
        grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return grey.reshape((-1,) + grey.shape[-2:])
    out = apply_modality_lut(arr, ds).astype(np.float64)
    if "SharedFunctionalGroupsSequence" in ds and "RescaleSlope" not in ds:
        pvt = ds.SharedFunctionalGroupsSequence[0].get("PixelValueTransformationSequence")
        if pvt:
            out = arr * float(pvt[0].RescaleSlope) + float(pvt[0].RescaleIntercept)
    out = out.reshape((-1,) + out.shape[-2:])
    if pi == "MONOCHROME1":
        bits = int(ds.BitsStored)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
        ends = apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds).astype(np.float64)
        out = ends.min() + ends.max() - out
    return out


@pytest.mark.shared
@pytest.mark.parametrize("row", INDEX, ids=[r["file"] for r in INDEX] or None)
def test_every_shared_file_decodes_correctly_or_is_refused_with_reason(row):
    root = shared_dicom_dir()
    path = root / row["file"]
    if row["file"] in REFUSED:
        with pytest.raises(DicomReadError) as e:
            read_dicom(path)
        assert str(path) in str(e.value), "the error names the file"
        assert REFUSED[row["file"]] in e.value.reason
        return
    img = read_dicom(path)
    assert img.pixels.dtype == np.float32
    rows, cols = (int(x) for x in row["rows_x_cols"].split("x"))
    assert img.pixels.shape == (int(row["frames"]), rows, cols)
    np.testing.assert_allclose(img.pixels, _reference(path, row).astype(np.float32), rtol=1e-5, atol=1e-3)


def test_index_lists_forty_files():
    if not INDEX:
        pytest.skip("../shared/data/dicom/index.csv absent")
    assert len(INDEX) == 40


@pytest.mark.shared
def test_monochrome1_twin_is_exact_inverse_of_monochrome2():
    root = shared_dicom_dir()
    mono2 = read_dicom(root / "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    mono1 = read_dicom(root / "torchxrayvision/Fake_MONOHR1.dcm")
    assert mono1.photometric == "MONOCHROME1" and mono2.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(mono1.pixels, 255.0 - mono2.pixels)
    # with a VOI mapping both land in [0, 1] and stay mirror images
    a, b = read_dicom(root / "torchxrayvision/Fake_MONOHR1.dcm", voi="file"), read_dicom(
        root / "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", voi="file")
    assert a.pixels.min() >= 0 and a.pixels.max() <= 1
    np.testing.assert_allclose(a.pixels, 1.0 - b.pixels, atol=1e-6)


@pytest.mark.shared
def test_lossless_codecs_agree_rle_vs_jpeg_ls():
    """Two lossless encodings of one series decode to identical pixels (independent of pydicom's reference)."""
    root = shared_dicom_dir()
    rle = read_dicom(root / "pydicom-data/emri_small_RLE.dcm").pixels
    jls = read_dicom(root / "pydicom-data/emri_small_jpeg_ls_lossless.dcm").pixels
    np.testing.assert_array_equal(rle, jls)


@pytest.mark.shared
def test_native_big_endian_matches_raw_bytes():
    root = shared_dicom_dir()
    path = root / "pydicom/MR_small_bigendian.dcm"
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype=">i2").reshape(ds.Rows, ds.Columns)
    np.testing.assert_array_equal(read_dicom(path).pixels[0], raw.astype(np.float32))


@pytest.mark.shared
def test_acr_nema_file_without_meta_is_read_as_implicit_little_endian():
    img = read_dicom(shared_dicom_dir() / "fo-dicom/CR-MONO1-10-chest")
    assert img.pixels.shape == (1, 440, 440)
    assert any("ACR-NEMA" in n for n in img.notes) and any("Implicit VR Little Endian" in n for n in img.notes)


@pytest.mark.shared
def test_colour_to_one_or_three_channels():
    path = shared_dicom_dir() / "pydicom/examples_ybr_color.dcm"
    grey = read_dicom(path, channels=1).pixels
    rgb = read_dicom(path, channels=3).pixels
    assert grey.shape == (30, 240, 320) and rgb.shape == (30, 240, 320, 3)
    np.testing.assert_allclose(grey, rgb @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-3)


@pytest.mark.shared
def test_ct_series_volume_sorted_by_position_with_spacing():
    root = shared_dicom_dir() / "pydicom/series_pcir_CT2"
    cfg = CohortConfig(dicom=DicomConfig(modalities=["CT"]))
    scan = scan_dicom(root, cfg, progress=False)
    slices = sort_slices(list(reversed(scan.headers)))
    z = [h.position[2] for h in slices]
    assert z == sorted(z)
    vol, spacing = load_volume(slices)
    assert vol.shape == (4, 16, 16)
    assert spacing[0] == pytest.approx(float(np.median(np.diff(z))))
    assert spacing[1:] == pytest.approx(slices[0].spacing)


def test_decoder_report_lists_versions():
    rep = decoder_report()
    assert rep["versions"]["pydicom"]
    assert rep["decodable"]["RLE Lossless"] in (True, False)


# ---------------------------------------------------------------- files written here with known pixels


def _write(path, pixels, *, photometric="MONOCHROME2", slope=1.0, intercept=0.0, bits=12, window=None, frames=None,
           signed=False, ts=ExplicitVRLittleEndian):
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    fm.MediaStorageSOPInstanceUID = "1.2.3.4"
    fm.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.1", "CR"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rescale_and_monochrome1_on_known_pixels(tmp_path):
    stored = np.array([[0, 100], [2000, 4095]], np.uint16)
    img = read_dicom(_write(tmp_path / "a.dcm", stored, slope=2.0, intercept=-1000.0))
    np.testing.assert_array_equal(img.pixels[0], stored * 2.0 - 1000.0)
    inv = read_dicom(_write(tmp_path / "b.dcm", stored, photometric="MONOCHROME1", slope=2.0, intercept=-1000.0))
    # range of modality values is [-1000, 7190]; MONOCHROME1 maps v -> -1000 + 7190 - v
    np.testing.assert_array_equal(inv.pixels[0], (-1000.0 + 7190.0) - (stored * 2.0 - 1000.0))


def test_window_and_file_voi_scale_to_unit_range(tmp_path):
    stored = np.array([[0, 1000], [2000, 4095]], np.uint16)
    p = _write(tmp_path / "w.dcm", stored, window=(1000, 1000))
    w = read_dicom(p, voi="window", window=(1000.0, 1000.0)).pixels[0]
    np.testing.assert_allclose(w, [[0.0, 0.5], [1.0, 1.0]])
    f = read_dicom(p, voi="file").pixels[0]
    assert f.min() >= 0 and f.max() <= 1 and f[0, 0] == 0 and f[1, 1] == 1
    assert 0.45 < f[0, 1] < 0.55


def test_multiframe_shape(tmp_path):
    stored = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    img = read_dicom(_write(tmp_path / "m.dcm", stored, frames=3))
    assert img.pixels.shape == (3, 4, 5)
    np.testing.assert_array_equal(img.pixels, stored.astype(np.float32))


def test_truncated_zero_byte_and_non_dicom_are_refused_with_reason(tmp_path):
    good = _write(tmp_path / "g.dcm", np.zeros((64, 64), np.uint16))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(DicomReadError, match=r"truncated pixel data \(7192 of 8192 bytes\)"):
        read_dicom(cut)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DicomReadError, match=r"empty file \(0 bytes\)"):
        read_dicom(empty)
    text = tmp_path / "notes.dcm"
    text.write_text("hello, not an image")
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_dicom(text)
    with pytest.raises(DicomReadError, match="cannot read file"):
        read_dicom(tmp_path / "missing.dcm")


def test_missing_decoder_names_the_codecs_extra(tmp_path, monkeypatch):
    """When no plugin can decode a compressed syntax, the reason says what to install."""
    import clinfuse.data.dicom as d

    src = shared_index() and (shared_dicom_dir() / "pydicom-data/JLSL_16_15_1_1F.dcm")
    if not src:
        pytest.skip("needs the shared JPEG-LS file")
    monkeypatch.setattr(d, "_decoder_state", lambda ts: (False, ["gdcm - requires python-gdcm"]))
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array",
                        property(lambda self: (_ for _ in ()).throw(RuntimeError("Unable to decode: missing deps"))))
    with pytest.raises(DicomReadError, match=r"no decoder for JPEG-LS Lossless Image Compression: pip install 'clinfuse\[codecs\]'"):
        read_dicom(src)


def test_header_view_from_code_sequence():
    from clinfuse.data.studies import _header_from

    ds = Dataset()
    ds.StudyInstanceUID = "1"
    item = Dataset()
    item.CodeMeaning = "postero-anterior"
    ds.ViewCodeSequence = [item]
    h = _header_from(ds, "x.dcm")
    assert isinstance(h, DicomHeader) and h.view == "PA"
