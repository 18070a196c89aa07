"""A whole-study model end to end: synth with two views and variables -> cohort -> train -> the model
object's predict and explain with several DICOM files and a dict of variables (issue #13)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from clinfuse.inference import Model, Study
from clinfuse.pipeline import train_and_audit

from ..conftest import tiny_config

ALL_VIEWS = {"cohort": {"dicom": {"voi": "file", "view_policy": "all"}}}


@pytest.fixture(scope="module")
def study_model(tmp_path_factory):
    from clinfuse.data.cohort import build_cohort
    from clinfuse.data.synth import SynthSpec, synthesize

    d = tmp_path_factory.mktemp("study-model")
    exp = d / "export"
    synthesize(exp, SynthSpec(studies=100, seed=11, size=40, views=2, variables=3), progress=False)
    cfg = tiny_config(train={"epochs": 2, "batch_size": 16}, eval={"bootstrap": 0}, tracking={"enabled": False},
                      cohort=ALL_VIEWS["cohort"])
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "image": cfg.model.image.model_copy(update={"max_images": 2})})})
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", d / "c", config=cfg, progress=False,
                 variables=exp / "variables.csv")
    train_and_audit(d / "c", cfg, d / "run", progress=False, log=lambda m: None)
    return d, exp, Model.load(d / "run")


def _study_files(exp: Path) -> dict[str, list[str]]:
    import pydicom

    out: dict[str, list[str]] = {}
    for p in sorted((exp / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.setdefault(ds.StudyInstanceUID, []).append(str(p))
    return out


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["StudyInstanceUID"]: r for r in csv.DictReader(f)}


def test_trained_study_model_is_format_2_and_predicts_from_files_and_variables(study_model):
    d, exp, model = study_model
    meta = json.loads((model.dir / "model.json").read_text())
    assert meta["format"] == "clinfuse-model/2" and set(meta["variables"]["numeric"]) >= {"temperature_c", "wbc", "crp"}
    assert model.groups == ("image", "report", "variables") and model.network.layout.n_images == 2
    files = {k: v for k, v in _study_files(exp).items() if len(v) == 2}
    reports, variables = _rows(exp / "reports.csv"), _rows(exp / "variables.csv")
    key = next(k for k in files if k in reports and all(variables[k][n] for n in ("temperature_c", "wbc", "crp")))
    values = {n: float(variables[key][n]) for n in ("temperature_c", "wbc", "crp")} | {"sex": variables[key]["sex"]}
    full, no_vars, one_view = model.predict([
        Study(files[key], reports[key]["report"], "full", values),
        Study(files[key], reports[key]["report"], "no-variables"),
        {"images": files[key][:1], "report": reports[key]["report"], "variables": values, "study_id": "one-view"}])
    assert full.ok and full.used == {"image": True, "report": True, "variables": True}
    assert len(full.image_weights) == 2 and all(w > 0 for w in full.image_weights)
    assert set(full.p_without) == {"image", "report", "variables"} and all(full.p_without.values())
    assert abs(sum(full.modality_weights.values()) - 1) < 1e-5
    # hiding the variables inside the full prediction is the prediction without them
    assert abs(full.p_without["variables"]["positive"] - no_vars.probabilities["positive"]) < 1e-5
    assert no_vars.used["variables"] is False and no_vars.p_without["variables"] is None
    assert one_view.ok and one_view.image_weights[1] == 0.0
    frame = model.predict([Study(files[key], None, "x", values)]).to_frame()
    assert {"w_variables", "p_positive_without_variables"} <= set(frame.columns)
    bad = model.predict([Study(files[key], None, "bad", {"height_cm": 180})])[0]
    assert bad.status == "error" and "height_cm" in bad.reason


def test_explanation_maps_every_image_and_scores_every_variable(study_model, tmp_path):
    d, exp, model = study_model
    files = {k: v for k, v in _study_files(exp).items() if len(v) == 2}
    reports, variables = _rows(exp / "reports.csv"), _rows(exp / "variables.csv")
    key = next(k for k in files if k in reports and variables[k]["crp"] and not variables[k]["wbc"])
    values = {"crp": float(variables[key]["crp"]), "wbc": None, "sex": variables[key]["sex"]}
    e = model.explain(Study(files[key], reports[key]["report"], "s1", values), method="gradcam", steps=8)
    views = [i["view"] for i in e["images"]]
    assert [i["slot"] for i in e["images"]] == [0, 1] and views[0] in ("PA", "AP") and views[1] == "lateral"
    assert all(i["faithfulness"] is not None and "better_than_random" in i["faithfulness"] for i in e["images"])
    items = {i["name"]: i for i in e["variables"]["items"]}
    assert items["wbc"]["value"] is None and items["wbc"]["score"] is None  # missing: no score
    assert items["crp"]["score"] is not None and items["crp"]["value"] == pytest.approx(values["crp"], rel=1e-5)
    m = e["modalities"]
    assert set(m["shapley"]) == {"image", "report", "variables"} and m["present"]["variables"]
    # exact Shapley values add up to v(all) - v(none)
    sh = e["modalities"]["shapley"]
    p_all = e["probabilities"][e["explained_output"]]
    ig = model.explain(Study(files[key], reports[key]["report"], "s1", values), method="ig", steps=8)
    assert ig["image"]["method"] == "integrated_gradients" and len(ig["images"]) == 2
    files_written = e.save(tmp_path / "s1")
    assert {"overlay_0.png", "overlay_1.png", "image_attribution_0.npy", "image_attribution_1.npy"} <= set(files_written)
    d = tmp_path / "s1"
    assert (d / "overlay.png").read_bytes() == (d / f"overlay_{e['images'][0]['slot']}.png").read_bytes()  # drawn once
    page = (d / "explanation.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Structured variables" in page and "crp" in page
    assert sum(sh.values()) == pytest.approx(p_all - _p_none(model, files[key]), abs=1e-4)


def _p_none(model, files):
    """v(empty set): the model's probability with nothing shown."""
    import torch

    x = model.preprocess(Study(files, None, "n"))
    x["image_present"] = torch.zeros_like(x["image_present"])
    return float(model.probabilities(model.forward_batch(x)["logits"])[0, 0])


def test_served_pyfunc_takes_several_dicom_files_and_variables_json(study_model):
    """The pyfunc behind `mlflow models serve`: base64 DICOM files and a JSON object of variables per
    row give Model.predict's numbers; a bad variables cell is that study's error, the others go on."""
    import base64
    from types import SimpleNamespace

    import pandas as pd

    from clinfuse.serving import ClinfusePyfunc, model_signature

    d, exp, model = study_model
    files = {k: v for k, v in _study_files(exp).items() if len(v) == 2}
    key = next(iter(files))
    b64 = [base64.b64encode(Path(f).read_bytes()).decode() for f in files[key]]
    served = ClinfusePyfunc()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(model.dir)}))
    got = served.predict(None, pd.DataFrame({"study_id": ["a", "b", "c"], "dicom": [b64, b64, b64],
                                             "report": [None, None, None],
                                             "variables": ['{"crp": 80, "sex": "F"}', None, '{"crp": "x"}']}))
    want = model.predict([Study(files[key], None, "a", {"crp": 80, "sex": "F"}), Study(files[key], None, "b")])
    assert got.loc[0, "p_positive"] == pytest.approx(want[0].probabilities["positive"], abs=1e-6)
    assert got.loc[1, "p_positive"] == pytest.approx(want[1].probabilities["positive"], abs=1e-6)
    assert got.loc[0, "w_variables"] > 0 and got.loc[1, "w_variables"] == 0
    assert list(got["status"]) == ["ok", "ok", "error"] and "crp='x' (not a finite number)" in got.loc[2, "reason"]
    sig = model_signature(model.output_names, model.groups)
    assert "variables" in sig.inputs.input_names() and "w_variables" in sig.outputs.input_names()


def test_evaluation_scores_the_variables_hidden(study_model, tmp_path):
    from clinfuse.evaluation.evaluate import evaluate, format_table

    d, exp, model = study_model
    res = evaluate(model, d / "c", "test", tmp_path / "eval", plots=False)
    hidden = res["hidden"]
    assert hidden["variables hidden"]["n"] == hidden["variables shown (same studies)"]["n"] > 0
    assert len(res["mean_modality_weights"]["both"]) == 3
    assert "variables hidden" in format_table(res)


def test_cli_predict_and_explain_take_variables(study_model, tmp_path, capsys):
    from clinfuse.cli import main

    d, exp, model = study_model
    files = next(v for v in _study_files(exp).values() if len(v) == 2)
    assert main(["predict", "--model", str(model.dir), "--dicom", *files, "--variables", '{"crp": 60, "sex": "M"}',
                 "--out", "-"]) == 0
    out = capsys.readouterr().out
    assert "variables" in out and "modality weights" in out
    (tmp_path / "v.json").write_text('{"crp": 60}')
    assert main(["explain", "--model", str(model.dir), "--dicom", *files, "--variables", str(tmp_path / "v.json"),
                 "--out", str(tmp_path / "e"), "--no-mlflow", "--no-progress", "--method", "gradcam", "--steps", "4"]) == 0
    e = json.loads(next((tmp_path / "e").rglob("explanation.json")).read_text())
    assert len(e["images"]) == 2 and e["modalities"]["present"]["variables"]
    assert main(["predict", "--model", str(model.dir), "--dicom", *files, "--variables", "[1, 2]", "--out", "-"]) == 2
    assert "a JSON object" in capsys.readouterr().err


def test_a_file_that_keeps_the_decoder_busy_costs_only_itself_within_the_deadline(study_model, tmp_path):
    """Model.predict decodes each chosen image first in a reading process with the cohort build's deadline
    (#15): a hostile lateral view is set aside by name and the study is predicted from its frontal view;
    a study whose only image is hostile gets an error; neither holds up the batch."""
    import shutil
    import time

    from ..data.test_workers import _slow_jpegls

    d, exp, model = study_model
    files = next(v for v in _study_files(exp).values() if len(v) == 2)
    frontal, lateral = (shutil.copy(f, tmp_path / f"{i}.dcm") for i, f in enumerate(files))
    _slow_jpegls(Path(lateral))
    model.config.cohort.dicom.max_seconds_per_file = 1
    try:
        t = time.monotonic()
        two, only, fine = model.predict([Study([frontal, lateral], None, "two"), Study([lateral], None, "only"),
                                         Study([frontal], None, "fine")])
        assert time.monotonic() - t < 30
    finally:
        model.config.cohort.dicom.max_seconds_per_file = 60
    assert two.ok and two.reason.startswith(f"set aside: {lateral}: decoding took longer than 1 s")
    assert two.probabilities == pytest.approx(fine.probabilities)  # predicted from the frontal view alone
    assert only.status == "error" and "longer than 1 s (cohort.dicom.max_seconds_per_file)" in only.reason
    assert fine.ok and fine.reason == ""
