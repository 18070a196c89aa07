"""PNG/JPEG -> DICOM Secondary Capture: pixels survive, tags are where the cohort builder looks."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from PIL import Image

from clinfuse.data.cohort import build_cohort, read_cohort
from clinfuse.data.convert import ConversionError, image_to_dicom
from clinfuse.data.dicom import read_dicom


def test_png_round_trips_through_the_reader_with_its_tags(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    out = image_to_dicom(tmp_path / "a.png", tmp_path / "d/a.dcm", patient_id="77", study_key="st1", accession="A1",
                         view="AP", sex="F", age=7)
    ds = pydicom.dcmread(out)
    assert (ds.PatientID, ds.AccessionNumber, ds.ViewPosition, ds.PatientSex, ds.PatientAge) == ("77", "A1", "AP", "F", "007Y")
    assert ds.Modality == "DX" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    np.testing.assert_array_equal(ds.pixel_array, grey)
    img = read_dicom(out)
    np.testing.assert_allclose(np.asarray(img.pixels).squeeze(), grey.astype(np.float32))
    # RGB becomes luminance; a rerun writes the same UIDs
    again = pydicom.dcmread(image_to_dicom(tmp_path / "rgb.png", tmp_path / "d/b.dcm", patient_id="77", study_key="st1"))
    np.testing.assert_array_equal(again.pixel_array, grey)
    assert again.StudyInstanceUID == ds.StudyInstanceUID
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConversionError, match="bad.png"):
        image_to_dicom(tmp_path / "bad.png", tmp_path / "d/bad.dcm", patient_id="1", study_key="x")


def test_converted_files_build_a_cohort_split_by_patient(tmp_path):
    rng = np.random.default_rng(1)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["AccessionNumber", "label"])
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            image_to_dicom(tmp_path / f"{i}.png", tmp_path / f"dicom/{i}.dcm", patient_id=f"P{i // 3}",
                           study_key=f"S{i}", accession=f"ACC{i}", view="PA")
            w.writerow([f"ACC{i}", i % 2])
    from clinfuse.config import CohortConfig

    build_cohort(tmp_path / "dicom", None, tmp_path / "labels.csv", tmp_path / "c",
                 CohortConfig(key="AccessionNumber"), progress=False)
    rows, info = read_cohort(tmp_path / "c")
    assert len(rows) == 24 and all(r["image_present"] for r in rows)
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert len(by_patient) == 8 and all(len(s) == 1 for s in by_patient.values())
