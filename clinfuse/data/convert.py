"""Wrap ordinary image files (PNG, JPEG) into DICOM so that they enter through the cohort builder.

Public datasets (NIH ChestX-ray, Open-I) ship PNGs; a hospital ships DICOM. Converting the PNGs into
Secondary Capture DICOM files, with the study's metadata in the proper tags, lets a study run through
exactly the path a hospital export takes (``build_cohort``: scan, group, view selection, quarantine,
splits by patient). UIDs are derived from the given keys, so a rerun writes identical files.

Example:
    >>> image_to_dicom("00001280_004.png", "dicom/00001280_004.dcm", patient_id="1280",
    ...                study_key="00001280_004", accession="00001280_004", view="PA", sex="F", age=36)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ClinfuseError

__all__ = ["image_to_dicom", "ConversionError"]

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class ConversionError(ClinfuseError):
    """An image file cannot be converted (unreadable, not grey or RGB, empty)."""


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["clinfuse-convert", *parts])


def image_to_dicom(src: str | Path, dst: str | Path, *, patient_id: str, study_key: str, accession: str | None = None,
                   view: str | None = None, sex: str | None = None, age: int | None = None, modality: str = "DX",
                   study_description: str = "XR CHEST", series_key: str | None = None) -> Path:
    """Write one image file as a DICOM Secondary Capture (MONOCHROME2, 8 or 16 bit, uncompressed).

    Args:
        src: PNG or JPEG file (grey or RGB; RGB is converted to luminance).
        dst: DICOM file to write (folders created).
        patient_id: PatientID (the cohort builder pseudonymises it and splits by it).
        study_key: the study's identity; StudyInstanceUID is derived from it.
        accession: AccessionNumber (the key reports and labels can join on).
        view: ViewPosition (e.g. PA, AP, LL).
        sex: PatientSex (M, F, O).
        age: PatientAge in years.
        modality: Modality tag (DX or CR for radiographs, so that the default modality filter keeps it).
        series_key: identity of the series (default: the study key).

    Raises:
        ConversionError: the file cannot be read as an image.
    """
    from PIL import Image, UnidentifiedImageError
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    src, dst = Path(src), Path(dst)
    try:
        with Image.open(src) as im:
            im.load()
            if im.mode in ("RGB", "RGBA", "P", "LA"):
                im = im.convert("L")
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise ConversionError(f"{src}: not a readable image ({e})") from e
    if arr.ndim != 2 or arr.size == 0:
        raise ConversionError(f"{src}: expected a 2D grey or RGB image, got shape {arr.shape}")
    bits = 16 if arr.dtype.itemsize > 1 else 8
    arr = arr.astype(np.uint16 if bits == 16 else np.uint8)

    study_uid = _uid("study", study_key)
    sop_uid = _uid("sop", study_key, src.name)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid("series", series_key or study_key)
    ds.AccessionNumber = accession or ""
    ds.PatientID = patient_id
    ds.PatientName = ""
    if sex:
        ds.PatientSex = sex
    if age is not None:
        ds.PatientAge = f"{int(age):03d}Y"
    ds.Modality = modality
    ds.ConversionType = "WSD"  # workstation: converted from a file, not acquired
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = study_description
    if view:
        ds.ViewPosition = view
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.PixelData = arr.tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst
