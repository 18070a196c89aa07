"""The model object: loading by every reference, one preprocessing path, per-study status, explain."""

from __future__ import annotations

import csv
import json

import numpy as np
import pydicom
import pytest
import torch

from clinfuse.data.cohort import read_cohort
from clinfuse.errors import ClinfuseError, ModelLoadError
from clinfuse.inference import Model, Study
from clinfuse.pipeline import train_and_audit

from ..conftest import synthetic_cohort, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    synthetic_cohort(d, studies=120, seed=5, size=40, lateral=0.3)
    train_and_audit(d / "c", tiny_config(train={"epochs": 2, "batch_size": 16}, eval={"bootstrap": 0},
                                         tracking={"enabled": False}), d / "run", progress=False, log=lambda m: None)
    return d, Model.load(d / "run")


def _raw_reports(d) -> dict[str, str]:
    with open(d / "c-export" / "reports.csv", newline="") as f:
        return {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(f)}


def _original_keys(d) -> dict[str, str]:
    with open(d / "c" / "private" / "key_map.csv", newline="") as f:
        return {r["study_id"]: r["StudyInstanceUID"] for r in csv.DictReader(f)}


def test_load_by_folder_run_folder_and_refusals(trained, tmp_path):
    d, model = trained
    assert model.dir == d / "run" / "best" and model.task == "binary" and model.output_names == ["positive"]
    assert model.temperature > 0 and len(model.thresholds) == 1 and model.operating_point["fitted_on"] == "val"
    assert model.input.image_size == (32, 32) and model.input.channels == 1 and model.tokenizer is not None
    same = Model.load(d / "run" / "best")
    assert same.thresholds == model.thresholds
    with pytest.raises(ModelLoadError, match="not a clinfuse model folder"):
        Model.load(tmp_path)
    with pytest.raises(ModelLoadError, match="not an MLflow URI"):
        Model.load(tmp_path / "nothing-here")
    saved = model.save(tmp_path / "copy")
    again = Model.load(saved)
    assert again.thresholds == model.thresholds and again.temperature == model.temperature
    x = model.preprocess(Study(report="FINDINGS: clear lungs."))
    torch.testing.assert_close(again.network(x["image"], x["image_present"], x["input_ids"], x["attention_mask"],
                                             x["text_present"])["logits"],
                               model.network(x["image"], x["image_present"], x["input_ids"], x["attention_mask"],
                                             x["text_present"])["logits"])


def test_preprocess_gives_the_validation_datasets_tensors(trained):
    """A study given as its DICOM files (path, bytes or dataset) and its raw report becomes exactly the
    tensors of the validation dataset built from the cohort."""
    d, model = trained
    rows, _ = read_cohort(d / "c")
    val = [r for r in rows if r["split"] == "val" and r["image_present"] and r["report_present"]][:4]
    ds = model.dataset(val)
    raw = _raw_reports(d)
    keys = _original_keys(d)
    checked = 0
    for i, r in enumerate(val):
        report = raw[keys[r["study_id"]]]
        files = r["image_paths"]
        for images in (files, [open(f, "rb").read() for f in files], [pydicom.dcmread(f) for f in files]):
            x = model.preprocess(Study(images, report, r["study_id"]))
            item = ds[i]
            for k in ("image", "input_ids", "attention_mask"):
                assert torch.equal(x[k][0], item[k]), (k, r["study_id"])
            assert bool(x["image_present"][0]) and bool(x["text_present"][0])
            checked += 1
    assert checked == 12


def test_predict_gives_a_status_per_study_and_goes_on(trained, tmp_path):
    d, model = trained
    rows, _ = read_cohort(d / "c")
    good = next(r for r in rows if r["image_present"])["image_paths"][0]
    nan_file = tmp_path / "nan.dcm"
    ds = pydicom.dcmread(good)
    ds.RescaleSlope, ds.RescaleIntercept = "1e39", "0"  # overflows float32: infinite pixels after rescale
    ds.save_as(nan_file)
    rgb = tmp_path / "rgb.dcm"
    ds = pydicom.dcmread(good)
    px = ds.pixel_array.astype(np.uint8)
    ds.PixelData = np.repeat(px[..., None], 3, axis=-1).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.save_as(rgb)
    studies = [Study([good], "FINDINGS: opacity.", "ok-both"), Study([b"not a dicom file at all" * 10], None, "junk"),
               Study([nan_file], None, "non-finite"), Study([], "FINDINGS: clear.", "report-only"),
               Study([open(good, "rb").read()[:2000]], None, "truncated"), Study([rgb], None, "rgb"),
               Study([good], "x" * 1_000_001, "huge-report"), Study([good], None, "image-only")]
    preds = model.predict(studies, batch_size=3)
    by = {p.study_id: p for p in preds}
    assert [p.study_id for p in preds] == [s.study_id for s in studies]
    assert by["ok-both"].ok and by["report-only"].ok and by["image-only"].ok
    assert by["ok-both"].p_without["image"] is not None and by["image-only"].p_without["image"] is None
    assert by["report-only"].used == {"image": False, "report": True}
    assert "non-finite" in by["non-finite"].reason and by["non-finite"].status == "error"
    assert "PhotometricInterpretation RGB" in by["rgb"].reason
    assert "1,000,001 characters" in by["huge-report"].reason
    assert by["junk"].status == by["truncated"].status == "error" and by["junk"].reason and by["truncated"].reason
    frame = preds.to_frame()
    assert list(frame["status"]) == ["ok", "error", "error", "ok", "error", "error", "error", "ok"]
    p = by["ok-both"]
    assert p.decisions["positive"] == (p.probabilities["positive"] >= model.thresholds[0])
    assert 0 <= p.probabilities["positive"] <= 1 and abs(sum(p.modality_weights.values()) - 1) < 1e-5
    # the same study alone gives the same numbers as inside a batch
    alone = model.predict([Study([good], "FINDINGS: opacity.", "ok-both")])[0]
    assert alone.probabilities["positive"] == pytest.approx(p.probabilities["positive"], abs=1e-6)


def test_explain_returns_an_object_that_renders_and_saves(trained, tmp_path):
    d, model = trained
    rows, _ = read_cohort(d / "c")
    r = next(r for r in rows if r["image_present"])
    e = model.explain(Study(r["image_paths"], "FINDINGS: opacity in the right lower lobe.", "s1"), method="gradcam")
    data = json.loads(e.to_json())
    assert data["study_id"] == "s1" and data["image"]["method"] == "gradcam" and data["model"]["dir"]
    assert "data:image/png;base64," in e.html()
    files = e.save(tmp_path / "s1")
    assert {"explanation.json", "explanation.html", "overlay.png", "image_attribution.npy"} <= set(files)
    with pytest.raises(ClinfuseError, match="not an output"):
        model.explain(Study(report="FINDINGS: clear."), target="nonsense")


def test_predict_cli_on_one_study_given_as_files(trained, tmp_path, capsys):
    from clinfuse.cli import main

    d, model = trained
    rows, _ = read_cohort(d / "c")
    r = next(r for r in rows if r["image_present"])
    (tmp_path / "report.txt").write_text("FINDINGS: opacity in the right lower lobe.")
    rc = main(["predict", "--model", str(d / "run"), "--dicom", *r["image_paths"], "--report",
               str(tmp_path / "report.txt"), "--out", str(tmp_path / "p.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "positive: p = " in out and "operating point" in out
    with open(tmp_path / "p.csv", newline="") as f:
        row = next(csv.DictReader(f))
    want = model.predict([Study(r["image_paths"], "FINDINGS: opacity in the right lower lobe.")])[0]
    assert row["status"] == "ok" and float(row["p_positive"]) == pytest.approx(want.probabilities["positive"], abs=1e-5)
    (tmp_path / "bad.dcm").write_bytes(b"not dicom" * 50)
    assert main(["predict", "--model", str(d / "run"), "--dicom", str(tmp_path / "bad.dcm"), "--out", "-"]) == 1
    assert "bad.dcm" in capsys.readouterr().err


def test_predict_and_explain_reads_once_and_agrees_with_predict_then_explain(trained, tmp_path, monkeypatch):
    from clinfuse.inference import model as model_mod

    d, model = trained
    rows, _ = read_cohort(d / "c")
    r = next(r for r in rows if r["image_present"])
    study = Study(r["image_paths"], "FINDINGS: opacity in the right lower lobe.", "s1")
    pred = model.predict([study])[0]
    exp = model.explain(study, method="gradcam")
    calls = []
    real = model_mod.image_item
    monkeypatch.setattr(model_mod, "image_item", lambda *a, **k: calls.append(1) or real(*a, **k))
    p2, e2 = model.predict_and_explain(study, method="gradcam")
    assert p2.probabilities["positive"] == pytest.approx(pred.probabilities["positive"], abs=1e-6)
    assert e2["probabilities"]["positive"] == pytest.approx(exp["probabilities"]["positive"], abs=1e-6)
    assert np.allclose(e2.image_map, exp.image_map, atol=1e-6)
    assert [w for w, _ in e2["report"]["words"]] == [w for w, _ in exp["report"]["words"]]
    assert len(calls) == 1  # the files are read once for both (predict then explain: twice)
    p3, e3 = model.predict_and_explain(Study([b"not a dicom file at all" * 10], None, "junk"))
    assert p3.status == "error" and p3.reason and e3 is None
    assert model.predict_and_explain(study, explain=False)[1] is None


def test_explain_item_hands_the_batch_to_the_attributions_on_the_model_device(trained, monkeypatch):
    """A batch from preprocess lies on the CPU; on a GPU model the attributions need it beside the network
    (no GPU here: the wiring is checked with the meta device, where nothing is computed)."""
    import clinfuse.explain as ex

    d, model = trained
    rows, _ = read_cohort(d / "c")
    r = next(r for r in rows if r["image_present"])
    batch = model.preprocess(Study(r["image_paths"], "FINDINGS: opacity.", "s1"))
    seen = {}
    monkeypatch.setattr(ex, "build_explanation", lambda net, b, **kw: seen.update(b))
    monkeypatch.setattr(model, "device", torch.device("meta"))
    model.explain_item(batch)
    tensors = {k: v for k, v in seen.items() if torch.is_tensor(v)}
    assert {"image", "input_ids", "attention_mask"} <= set(tensors)
    assert all(v.device.type == "meta" for v in tensors.values())
