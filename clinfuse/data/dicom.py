"""Reading one DICOM file into pixels with a documented orientation and scale.

Orientation: ``pixels`` has shape ``(frames, rows, cols)`` (``(frames, rows, cols, 3)`` with
``channels=3``); row 0 is the first stored row (the top of the image as displayed), column 0 the
first stored column. This is pydicom's and PIL's order. MONAI's ``LoadImage`` returns 2D images
transposed relative to it; clinfuse never uses ``LoadImage`` for DICOM.

Scale: float32 after the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence, per frame
for enhanced multi-frame objects), so CT is in Hounsfield units. MONOCHROME1 is inverted so that a
higher value is always brighter on display. With ``voi='file'`` (the file's VOI LUT or window) or
``voi='window'`` (a given window) the result is scaled to ``[0, 1]``.

Every failure is a :class:`DicomReadError` whose message names the file and the cause.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import ClinfuseError

__all__ = ["DicomImage", "DicomReadError", "read_dicom", "check_dicom", "dcmread_robust", "decoder_report", "to_channels"]

# Transfer syntaxes that need a decoder beyond numpy; the hint says what to install.
_CODEC_HINT = "pip install 'clinfuse[codecs]'"


def decoder_failure(e: BaseException) -> bool:
    """Whether an exception is a decoder's failure on bad data: any ``Exception``, and the panic of a
    decoder written in Rust (pylibjpeg-rle), which pyo3 raises as ``PanicException``, a subclass of
    BaseException that ``except Exception`` lets through (found by fuzzing: an RLE frame cut short)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


class DicomReadError(ClinfuseError):
    """A DICOM file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class DicomImage:
    """Decoded pixels and the header facts needed downstream.

    Attributes:
        pixels: float32, ``(frames, rows, cols)`` or ``(frames, rows, cols, 3)``; see module doc.
        photometric: PhotometricInterpretation as stored.
        modality: Modality tag ('' when absent).
        spacing: (row spacing, column spacing) in mm, or None.
        transfer_syntax: the transfer syntax used to decode.
        notes: non-fatal facts (e.g. a missing transfer syntax that was assumed).
    """

    pixels: np.ndarray
    photometric: str
    modality: str
    spacing: tuple[float, float] | None
    transfer_syntax: str
    notes: list[str] = field(default_factory=list)


def dcmread_robust(
    path: str | Path, *, stop_before_pixels: bool = False, data: bytes | None = None
) -> tuple[Dataset, list[str]]:
    """Read a dataset, accepting files with no preamble or file meta (ACR-NEMA style).

    When the file meta lacks a Transfer Syntax UID, the encoding pydicom detected while parsing
    (implicit/explicit VR, byte order) is written into it and a note is returned.

    Args:
        path: the file (named in errors).
        stop_before_pixels: read the header only.
        data: the file's bytes when already in memory (avoids a second read).

    Raises:
        DicomReadError: empty, not DICOM, or the header cannot be parsed.
    """
    notes: list[str] = []
    try:
        if data is None:
            data = Path(path).read_bytes()
    except OSError as e:
        raise DicomReadError(path, f"cannot read file: {e.strerror or e}") from None
    if len(data) == 0:
        raise DicomReadError(path, "empty file (0 bytes)")
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
            if not stop_before_pixels:
                # Force element parsing now so that a garbled header fails here, not during decoding.
                for _ in ds.iterall():
                    pass
    except InvalidDicomError as e:
        raise DicomReadError(path, f"not a DICOM file ({e})") from None
    except Exception as e:  # pydicom raises many kinds on garbage; all mean "unreadable header"
        raise DicomReadError(path, f"unreadable DICOM header: {_first_line(e)}") from None
    if has_preamble and not any(t.group != 0x0002 for t in ds.keys()):
        raise DicomReadError(path, f"DICOM header cut short: the file ends after {len(data)} bytes with no dataset")
    if len(ds) == 0 or (not has_preamble and not _looks_like_dicom(ds)):
        raise DicomReadError(
            path, "not a DICOM file: no DICM preamble and no recognisable DICOM tags at the start "
            "(not DICOM, or a damaged/misaligned file)"
        )
    if not has_preamble:
        notes.append("no preamble/file meta (ACR-NEMA style)")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = _detected_encoding(ds)
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if meta is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        notes.append(f"no Transfer Syntax UID; assumed {ts.name} as parsed")
    return ds, notes


def _looks_like_dicom(ds: Dataset) -> bool:
    # force=True will "parse" any bytes; a real dataset has group 0008 or 0010/0020/0028 elements.
    return any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in ds.keys())


def _detected_encoding(ds: Dataset) -> tuple[bool, bool]:
    enc = getattr(ds, "original_encoding", None)
    if enc and enc[0] is not None:
        return bool(enc[0]), bool(enc[1])
    return True, True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _decode_failure_reason(ds: Dataset, err: BaseException) -> str:
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    name = ts.name if ts else "unknown transfer syntax"
    msg = str(err)
    low = msg.lower()
    if "less than expected" in low or "truncated" in low or "not enough" in low:
        m = re.search(r"\((\d+) vs (\d+) bytes\)", msg)
        got = f" ({m.group(1)} of {m.group(2)} bytes)" if m else ""
        return f"truncated pixel data{got}"
    if "invalid literal" in low or "could not convert" in low:
        return f"invalid header value needed for decoding ({_first_line(err)})"
    available, missing = _decoder_state(ts)
    if ts.is_compressed and not available:
        return f"no decoder for {name}: {_CODEC_HINT}"
    if ts.is_compressed:
        detail = " ".join(msg.split())[:300]
        extra = ""
        if missing:
            extra = f"; decoders not installed that may handle it: {'; '.join(missing)}"
            if any("libjpeg" in m for m in missing):
                extra += " (pylibjpeg-libjpeg is GPLv3: pip install 'clinfuse[codecs-gpl]')"
        return f"every available decoder failed on {name}: {detail}{extra}"
    return f"pixel data could not be decoded ({name}): {_first_line(err)}"


def _decoder_state(ts: UID) -> tuple[bool, list[str]]:
    """(any decoder available for `ts`, descriptions of plugins missing dependencies)."""
    from pydicom.pixels import get_decoder

    try:
        dec = get_decoder(ts)
    except Exception:  # noqa: BLE001 - pydicom has no decoder class for this syntax
        return False, []
    missing = [str(m) for m in (getattr(dec, "missing_dependencies", None) or [])]
    return bool(dec.is_available), missing


def decoder_report() -> dict[str, object]:
    """Versions of pydicom and of each optional decoder package, and which compressed syntaxes decode."""
    import importlib.metadata as md

    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    versions: dict[str, str | None] = {}
    for pkg in ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pylibjpeg-libjpeg",
                "python-gdcm", "pillow", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    syntaxes = {}
    for uid in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless,
                JPEG2000, RLELossless):
        try:
            syntaxes[uid.name] = bool(get_decoder(uid).is_available)
        except Exception:  # noqa: BLE001 - no decoder class for this syntax at all
            syntaxes[uid.name] = False
    syntaxes[DeflatedExplicitVRLittleEndian.name] = True
    return {"versions": versions, "decodable": syntaxes}


# --------------------------------------------------------------------------- pixel pipeline


def _frames_params(ds: Dataset, n_frames: int) -> list[Dataset]:
    """One dataset per frame holding the tags the LUT functions read (enhanced multi-frame aware)."""
    shared = None
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        shared = ds.SharedFunctionalGroupsSequence[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if shared is None and per_frame is None:
        return [ds] * n_frames  # every frame reads the file's own tags: no copies
    out = []
    for i in range(n_frames):
        view = Dataset()
        view.file_meta = ds.file_meta  # LUT data are read with the file's byte order
        for kw in ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
                   "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
                   "PixelRepresentation", "BitsStored", "BitsAllocated", "PhotometricInterpretation"):
            if kw in ds:
                setattr(view, kw, ds[kw].value)
        for group in (shared, per_frame[i] if per_frame is not None and i < len(per_frame) else None):
            if group is None:
                continue
            for seq_kw, kws in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
                                ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
                if seq_kw in group and len(group[seq_kw].value):
                    item = group[seq_kw].value[0]
                    for kw in kws:
                        if kw in item:
                            setattr(view, kw, item[kw].value)
        out.append(view)
    return out


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Grey ``(F, R, C)`` or colour ``(F, R, C, 3)`` to the requested number of channels."""
    if pixels.ndim == 4 and channels == 1:
        # ITU-R BT.601 luma, the same weights as YBR_FULL's Y.
        return (pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114).astype(np.float32)
    if pixels.ndim == 3 and channels == 3:
        return np.repeat(pixels[..., None], 3, axis=-1)
    return pixels


def read_dicom(
    path: str | Path,
    *,
    voi: Literal["none", "file", "window"] = "none",
    window: tuple[float, float] | None = None,
    channels: Literal[1, 3] = 1,
    data: bytes | None = None,
    dataset: tuple[Dataset, list[str]] | None = None,
) -> DicomImage:
    """Read one DICOM file into float32 pixels (see the module doc for orientation and scale).

    Any failure is a :class:`DicomReadError` naming the file: a header value that pydicom cannot
    convert (a RescaleSlope of 'abc', a WindowWidth of 0, a one-value PixelSpacing, an empty VOI LUT)
    included, so that one bad file never stops a batch.

    Args:
        path: the file.
        voi: 'none' keeps modality units; 'file' applies the file's VOI LUT/window; 'window' applies
            ``window=(center, width)``. Both of the latter scale to [0, 1].
        window: (center, width) for ``voi='window'``.
        channels: 1 converts colour to luminance; 3 repeats grey images.
        data: the file's bytes if already read.
        dataset: the file already parsed by :func:`dcmread_robust` (its dataset and notes), read once
            for the header and the pixels.

    Raises:
        DicomReadError: with the file and the reason (truncated pixel data, no decoder, ...).

    Example:
        >>> img = read_dicom("chest.dcm", voi="file")
        >>> img.pixels.shape   # (1, rows, cols)
    """
    return _read_guarded(path, voi, window, channels, data, dataset, extremes=False)


def check_dicom(
    path: str | Path,
    *,
    voi: Literal["none", "file", "window"] = "none",
    window: tuple[float, float] | None = None,
    channels: Literal[1, 3] = 1,
    dataset: tuple[Dataset, list[str]] | None = None,
) -> None:
    """Whether :func:`read_dicom` would succeed, at a fraction of its cost: the pixels are decoded in full
    (every decoder failure shows), then the modality and VOI transforms run on each frame's extreme
    stored values only. Those transforms are monotonic (linear rescale, windowing, MONOCHROME1
    inversion) or table look-ups (LUT sequences, whose entries are finite), so a non-finite value
    anywhere in the result shows at an extreme; header values that cannot be converted fail the same way.

    Raises:
        DicomReadError: as :func:`read_dicom` would.
    """
    _read_guarded(path, voi, window, channels, None, dataset, extremes=True)


def _read_guarded(path, voi, window, channels, data, dataset, extremes: bool) -> DicomImage:
    """:func:`_read_dicom` with every failure a :class:`DicomReadError` naming the file."""
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite results are refused
            ds, notes = dataset if dataset is not None else dcmread_robust(path, data=data)
            return _read_dicom(path, voi, window, channels, ds, list(notes), extremes=extremes)
    except DicomReadError:
        raise
    except BaseException as e:  # noqa: BLE001 - pydicom's own errors on a bad header value, named with the file
        if not decoder_failure(e):
            raise
        raise DicomReadError(path, f"cannot interpret the pixels: {type(e).__name__}: {_first_line(e)}") from None


def _read_dicom(path, voi, window, channels, ds: Dataset, notes: list[str], extremes: bool) -> DicomImage:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomReadError(path, "no pixel data (not an image object)")
    ts = str(ds.file_meta.TransferSyntaxUID)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise DicomReadError(path, "PhotometricInterpretation is missing; cannot interpret the pixels")
    n_frames = _n_frames(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array  # YBR is converted to RGB by pydicom
    except BaseException as e:  # decoder plugins raise RuntimeError/ValueError/NotImplementedError, or panic
        if not decoder_failure(e):
            raise
        raise DicomReadError(path, _decode_failure_reason(ds, e)) from None

    samples = int(ds.get("SamplesPerPixel", 1))
    arr = np.asarray(raw)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        samples = 3
    # Normalise to (F, R, C[, 3]).
    if n_frames == 1:
        arr = arr[None]
    if samples == 3 and arr.ndim != 4 or samples == 1 and arr.ndim != 3:
        raise DicomReadError(path, f"unexpected pixel array shape {arr.shape} for {n_frames} frame(s)")
    if extremes:  # check_dicom: each frame's (per-channel) minimum and maximum stand for the frame
        arr = np.stack([arr.min(axis=(1, 2)), arr.max(axis=(1, 2))], axis=1)[:, None]

    if samples == 1:
        params = _frames_params(ds, n_frames)
        frames = []
        for i in range(n_frames):
            p = params[i]
            f = _modality(arr[i], p, apply_modality_lut)
            if voi != "none":
                f = _apply_voi(f, p, ds, voi, window, apply_voi_lut, apply_windowing)
            frames.append(f)
        out = frames[0][None] if n_frames == 1 else np.stack(frames)
        if photometric == "MONOCHROME1":
            if voi == "none":
                lo, hi = _modality_range(ds, params[0], apply_modality_lut)
                out = (lo + hi) - out
            else:
                out = 1.0 - out
    else:
        out = arr.astype(np.float32)
        if voi != "none":
            out = out / 255.0 if int(ds.get("BitsStored", 8)) <= 8 else out / float(out.max() or 1)
    if not np.isfinite(out).all():
        raise DicomReadError(path, "non-finite pixel values (NaN or infinity) after the modality and VOI "
                             "transforms; check RescaleSlope, RescaleIntercept and the window of the file")
    out = to_channels(out, channels)
    spacing = None
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps is not None and len(ps) == 2:
        spacing = (float(ps[0]), float(ps[1]))
    return DicomImage(out, photometric, str(ds.get("Modality", "")), spacing, UID(ts).name, notes)


def _modality(a: np.ndarray, p: Dataset, apply_modality_lut) -> np.ndarray:
    """The Modality LUT to float32, as pydicom's ``apply_modality_lut`` (float64, then rounded once), with one
    copy where the result is exact in float32: the common slope 1 / intercept 0 of radiographs, integer
    rescales of CT (the array is integers below 2**24 in magnitude, so no rounding)."""
    if "ModalityLUTSequence" in p or a.dtype.kind not in "iu":
        return apply_modality_lut(a, p).astype(np.float32)
    slope = float(p.RescaleSlope) if "RescaleSlope" in p and p.RescaleSlope not in (None, "") else 1.0
    inter = float(p.RescaleIntercept) if "RescaleIntercept" in p and p.RescaleIntercept not in (None, "") else 0.0
    bound = float(np.abs(a).max(initial=0)) * abs(slope) + abs(inter)
    if slope.is_integer() and inter.is_integer() and bound < 2**24:
        out = a.astype(np.float32)
        if slope != 1.0:
            out *= np.float32(slope)
        if inter != 0.0:
            out += np.float32(inter)
        return out
    return (a * slope + inter).astype(np.float32)  # numpy promotes to float64 first


def _n_frames(ds: Dataset, path) -> int:
    raw = ds.get("NumberOfFrames", 1)
    try:
        n = int(raw) if raw not in (None, "") else 1
    except (TypeError, ValueError):
        raise DicomReadError(path, f"invalid NumberOfFrames: {raw!r}") from None
    if n < 1:
        raise DicomReadError(path, f"invalid NumberOfFrames: {raw!r}")
    return n


def _modality_range(ds: Dataset, params: Dataset, apply_modality_lut) -> tuple[float, float]:
    lo, hi = _stored_range(ds)
    ends = apply_modality_lut(np.array([lo, hi], dtype=np.int64), params).astype(np.float64)
    return float(ends.min()), float(ends.max())


def _apply_voi(f, p, ds, voi, window, apply_voi_lut, apply_windowing) -> np.ndarray:
    """VOI mapping scaled to [0, 1]."""
    if voi == "window":
        if window is None:
            raise ValueError("voi='window' needs window=(center, width)")
        c, w = window
        lo, hi = c - w / 2.0, c + w / 2.0
        return np.clip((f - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    has_voi = "VOILUTSequence" in p or ("WindowCenter" in p and "WindowWidth" in p)
    if has_voi:
        mapped = apply_voi_lut(f, p, prefer_lut=True).astype(np.float32)
        if "VOILUTSequence" in p:
            item = p.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2])
            lo, hi = 0.0, float(2**bits - 1)
        else:
            lo, hi = _stored_output_range(ds, f)
        return np.clip((mapped - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    # No VOI in the file: min-max of the frame.
    lo, hi = float(f.min()), float(f.max())
    return ((f - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _stored_output_range(ds: Dataset, f: np.ndarray) -> tuple[float, float]:
    # pydicom's apply_windowing maps into the range of the stored values (after rescale when present).
    lo, hi = _stored_range(ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        a, b = lo * slope + inter, hi * slope + inter
        return min(a, b), max(a, b)
    return lo, hi
