"""The SR, the heatmap Secondary Capture and the FHIR report of one study, without a server."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections import defaultdict

import numpy as np
import pydicom
import pytest

from .conftest import export_files


def _studies(d):
    by = defaultdict(list)
    for f in export_files(d):
        try:
            ds = pydicom.dcmread(f)
            by[str(ds.StudyInstanceUID)].append((f, ds))
        except Exception:  # noqa: BLE001 - the export's broken files on purpose
            pass
    return by


def _reports(d):
    with open(d / "c-export" / "reports.csv", newline="") as f:
        return {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(f)}


def _sr_items(sr) -> dict:
    """Concept meaning -> list of values (text, number, code meaning, referenced SOP UID), flattened."""
    out = defaultdict(list)

    def walk(seq):
        for it in seq or []:
            name = it.ConceptNameCodeSequence[0].CodeMeaning
            vt = it.ValueType
            if vt == "TEXT":
                out[name].append(str(it.TextValue))
            elif vt == "NUM":
                out[name].append(float(it.MeasuredValueSequence[0].NumericValue))
            elif vt == "CODE":
                out[name].append(str(it.ConceptCodeSequence[0].CodeMeaning))
            elif vt == "IMAGE":
                out[name].append(str(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            walk(getattr(it, "ContentSequence", None))

    walk(sr.ContentSequence)
    return out


def _roundtrip(ds):
    """Write, read back with pydicom and highdicom, recording every warning."""
    import highdicom as hd

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
        if back.Modality == "SR":
            hd.sr.ComprehensiveSR.from_dataset(back)
        else:
            hd.Image.from_dataset(back, copy=False)
            back.pixel_array  # noqa: B018 - decodes
    return back, [str(x.message) for x in w]


def test_sr_sc_fhir_of_one_study_hold_the_prediction(pacs_model):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    from clinfuse.inference import Study
    from clinfuse.pacs.results import DISCLAIMER, ModelIdentity
    from clinfuse.pacs.run import predict_study

    d, model = pacs_model
    reports = _reports(d)
    uid, items = next((u, v) for u, v in sorted(_studies(d).items()) if u in reports)
    datasets = [ds for _, ds in items]
    res, new, fhir = predict_study(model, ModelIdentity(model), datasets, reports[uid], "pacs-test")
    assert res.status == "ok" and res.used == {"image": True, "report": True}
    ref = model.predict([Study([f for f, _ in items], reports[uid])])[0]
    sc, sr = new
    assert sc.Modality == "OT" and sr.Modality == "SR"
    # the SR: every output's probability, decision, operating point and p_without, as Model.predict gives them
    sr, warns = _roundtrip(sr)
    assert warns == []
    v = _sr_items(sr)
    name = model.output_names[0]
    assert v["Output name"] == [name]
    assert v["Calibrated probability"][0] == pytest.approx(ref.probabilities[name], abs=1e-6)
    assert v["Operating point threshold"][0] == pytest.approx(model.thresholds[0], abs=1e-6)
    assert v["Decision at the operating point"] == ["Positive" if ref.decisions[name] else "Negative"]
    assert v["Probability without the image"][0] == pytest.approx(ref.p_without["image"][name], abs=1e-6)
    assert v["Probability without the report"][0] == pytest.approx(ref.p_without["report"][name], abs=1e-6)
    assert v["Attention weight of the image"][0] == pytest.approx(ref.modality_weights["image"], abs=1e-6)
    assert v["Modalities used"] == ["image, report"]
    assert v["Comment"] == [DISCLAIMER]
    assert v["Model version"] == ["unregistered"] and v["Model name"] == ["best"]
    assert v["Image map faithfulness"][0].split(" (")[0] in ("better than random", "NOT better than random")
    assert v["Heatmap overlay"] == [str(sc.SOPInstanceUID)]
    src = next(ds for ds in datasets if str(ds.SOPInstanceUID) == v["Source image"][0])
    # the patient's own identifiers and study: it files into this patient's study
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        assert str(getattr(sr, kw)) == str(getattr(src, kw))
    # the SC: the source's size, its study, and a reference to the source image
    sc, warns = _roundtrip(sc)
    assert warns == []
    assert (sc.Rows, sc.Columns) == (src.Rows, src.Columns) and sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    px = sc.pixel_array
    assert px.shape == (src.Rows, src.Columns, 3) and px.dtype == np.uint8 and px.std() > 0
    # FHIR: validates, one Observation per output with the same numbers
    report = DiagnosticReport.model_validate(json.loads(json.dumps(fhir)))
    obs = report.contained
    assert len(obs) == len(model.output_names) == len(report.result)
    assert float(obs[0].valueQuantity.value) == pytest.approx(ref.probabilities[name], abs=1e-6)
    assert obs[0].interpretation[0].coding[0].code == ("POS" if ref.decisions[name] else "NEG")
    assert report.subject.identifier.value == str(src.PatientID)
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
    assert "not a diagnosis" in report.conclusion


def test_study_without_report_and_an_instance_that_does_not_decode(pacs_model):
    from clinfuse.inference import Study
    from clinfuse.pacs.results import ModelIdentity
    from clinfuse.pacs.run import predict_study

    d, model = pacs_model
    uid, items = next((u, [(f, ds) for f, ds in v if ds.get("ViewPosition") in ("PA", "AP")])
                      for u, v in sorted(_studies(d).items()) if any(ds.get("ViewPosition") in ("PA", "AP") for _, ds in v))
    good = items[0][1]
    broken = pydicom.dcmread(items[0][0])
    broken.SOPInstanceUID = pydicom.uid.generate_uid()
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]  # truncated pixel data
    res, new, fhir = predict_study(model, ModelIdentity(model), [broken, good], None, "pacs-x")
    assert res.status == "ok" and res.used == {"image": True, "report": False}
    assert len(res.problems) == 1 and "instance 1 of 2" in res.problems[0]
    ref = model.predict([Study([items[0][0]], None)])[0]
    name = model.output_names[0]
    assert res.probabilities[name] == pytest.approx(ref.probabilities[name], abs=1e-6)
    v = _sr_items(new[-1])
    assert v["Modalities used"] == ["image"] and len(v["Input not read"]) == 1
    assert "Probability without the image" not in v  # p_without needs both modalities
    # nothing readable at all: an SR that says so, with no outputs
    res, new, fhir = predict_study(model, ModelIdentity(model), [broken], None, "pacs-y")
    assert res.status == "error"
    v = _sr_items(new[-1])
    assert "Calibrated probability" not in v and any("no result" in t for t in v["Input not read"])
    assert not fhir.get("contained")
    assert "No result" in fhir["conclusion"]


def test_an_instance_that_keeps_the_decoder_busy_is_set_aside_at_the_deadline(pacs_model, tmp_path):
    """The PACS loop decodes each instance first in a reading process (#15): a hostile instance (a JPEG-LS
    frame header claiming 20000 x 20000 pixels) costs its deadline and its own reason, not the loop."""
    import time

    from clinfuse.pacs.results import ModelIdentity
    from clinfuse.pacs.run import predict_study

    from ..data.test_workers import _slow_jpegls

    d, model = pacs_model
    uid, items = next((u, [(f, ds) for f, ds in v if ds.get("ViewPosition") in ("PA", "AP")])
                      for u, v in sorted(_studies(d).items()) if any(ds.get("ViewPosition") in ("PA", "AP") for _, ds in v))
    hostile = tmp_path / "hostile.dcm"
    pydicom.dcmread(items[0][0]).save_as(hostile)
    _slow_jpegls(hostile)
    model.config.cohort.dicom.max_seconds_per_file = 1
    try:
        t = time.monotonic()
        res, new, _ = predict_study(model, ModelIdentity(model), [pydicom.dcmread(hostile), items[0][1]], None, "pacs-h")
        assert time.monotonic() - t < 30
    finally:
        model.config.cohort.dicom.max_seconds_per_file = 60
    assert res.status == "ok" and res.used["image"]
    assert len(res.problems) == 1 and "instance 1 of 2" in res.problems[0] and "longer than 1 s" in res.problems[0]
    assert len(_sr_items(new[-1])["Input not read"]) == 1


def test_a_report_stored_as_sr_in_the_study_is_read(pacs_model):
    """With no reports file, a text SR of the study (not clinfuse's own) is the report the model reads."""
    from pydicom.dataset import Dataset

    from clinfuse.inference import Study
    from clinfuse.pacs.results import ModelIdentity
    from clinfuse.pacs.run import predict_study

    d, model = pacs_model
    reports = _reports(d)
    uid, items = next((u, v) for u, v in sorted(_studies(d).items())
                      if u in reports and any(ds.get("ViewPosition") in ("PA", "AP") for _, ds in v))
    sr = Dataset()
    sr.Modality, sr.StudyInstanceUID, sr.Manufacturer = "SR", uid, "RIS"
    item = Dataset()
    item.ValueType, item.TextValue = "TEXT", reports[uid]
    sr.ContentSequence = [item]
    datasets = [ds for _, ds in items] + [sr]
    res, _, _ = predict_study(model, ModelIdentity(model), datasets, None, "pacs-sr", explain=False)
    ref = model.predict([Study([f for f, _ in items], reports[uid])])[0]
    name = model.output_names[0]
    assert res.used["report"] and res.probabilities[name] == pytest.approx(ref.probabilities[name], abs=1e-6)


def test_model_identity_names_a_registered_model():
    from types import SimpleNamespace

    from clinfuse.pacs.results import ModelIdentity

    m = SimpleNamespace(uri="models:/chest-fusion/7", version="7", dir=None, run_id="abc", output_names=["x"],
                        thresholds=[0.3])
    i = ModelIdentity(m)
    assert (i.name, i.version, i.uri) == ("chest-fusion", "7", "models:/chest-fusion/7")
    m = SimpleNamespace(uri="models:/chest-fusion@champion", version="3", dir=None, run_id=None, output_names=["x"],
                        thresholds=[0.3])
    assert ModelIdentity(m).name == "chest-fusion"
