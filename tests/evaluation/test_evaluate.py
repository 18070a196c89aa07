"""evaluate/calibrate on a trained tiny model: stored operating points, no re-fitting on test, plots."""

from __future__ import annotations

import json

import pytest

from clinfuse.cli import main
from clinfuse.data.cohort import read_cohort
from clinfuse.evaluation import evaluate as ev
from clinfuse.pipeline import train_and_audit

from ..conftest import synthetic_cohort, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    synthetic_cohort(d, studies=150, seed=21, size=40, lateral=0)
    train_and_audit(d / "c", tiny_config(train={"epochs": 3, "batch_size": 16}, eval={"bootstrap": 50},
                                         tracking={"enabled": False}), d / "run", progress=False, log=lambda m: None)
    return d


def test_training_stores_calibration_fitted_on_validation(trained):
    meta = json.loads((trained / "run/best/model.json").read_text())
    rows, _ = read_cohort(trained / "c")
    assert meta["operating_point"]["fitted_on"] == "val"
    assert meta["operating_point"]["n_val"] == sum(r["split"] == "val" for r in rows)
    assert meta["temperature"] > 0 and len(meta["thresholds"]) == 1 and 0 <= meta["thresholds"][0] <= 1


def test_evaluate_uses_stored_thresholds_and_never_fits_on_test(trained, tmp_path, monkeypatch):
    f = trained / "run/best/model.json"
    meta = json.loads(f.read_text())
    meta["thresholds"], meta["temperature"] = [0.4242], 1.5
    f.write_text(json.dumps(meta))

    def boom(*a, **k):
        raise AssertionError("evaluate must not fit a threshold or a temperature")

    monkeypatch.setattr(ev, "choose_threshold", boom)
    monkeypatch.setattr(ev, "fit_temperature", boom)
    r = ev.evaluate(trained / "run/best", trained / "c", "test", tmp_path / "out")
    rep = r["overall"]["per_output"]["positive"]
    assert rep["threshold"] == 0.4242 and r["temperature"] == 1.5
    assert rep["tp"] + rep["fn"] == rep["positives"] and rep["tp"] + rep["tn"] + rep["fp"] + rep["fn"] == r["n"]
    assert set(r["by_pattern"]) <= {"both", "image_only", "report_only"} and r["by_pattern"]
    assert set(r["hidden"]) == {"none (both shown)", "image hidden (report only)", "report hidden (image only)"}
    assert len(rep["auroc_ci95"]) == 2
    assert sorted(r["plots"]) == ["by_pattern.png", "confusion.png", "reliability.png", "roc_pr.png"]
    for p in r["plots"]:
        assert (tmp_path / "out/plots" / p).stat().st_size > 5000
    saved = json.loads((tmp_path / "out/metrics.json").read_text())
    assert saved["overall"]["per_output"]["positive"]["threshold"] == 0.4242


def test_calibrate_sees_only_validation_studies(trained, monkeypatch):
    seen = []
    real = ev.choose_threshold
    monkeypatch.setattr(ev, "choose_threshold", lambda y, p, *a: seen.append(len(y)) or real(y, p, *a))
    rows, _ = read_cohort(trained / "c")
    ev.calibrate(trained / "run/best", trained / "c")
    assert seen == [sum(r["split"] == "val" for r in rows)]


def test_evaluate_cli(trained, tmp_path, capsys):
    rc = main(["evaluate", "--model", str(trained / "run/best"), "--cohort", str(trained / "c"),
               "--out", str(tmp_path / "o"), "--bootstrap", "20"])
    out = capsys.readouterr().out
    assert rc == 0 and "AUROC" in out and "as present: both" in out and "image hidden" in out
    assert (tmp_path / "o/metrics.json").is_file()
    assert main(["evaluate", "--model", str(tmp_path), "--cohort", str(trained / "c")]) == 2
    # the run folder that `clinfuse train --out` wrote is a model reference too (its best/ is taken)
    assert main(["evaluate", "--model", str(trained / "run"), "--cohort", str(trained / "c"),
                 "--out", str(tmp_path / "o2"), "--bootstrap", "0"]) == 0
    assert json.loads((tmp_path / "o2/metrics.json").read_text())["n"] == r_n(trained)


def r_n(trained) -> int:
    rows, _ = read_cohort(trained / "c")
    return sum(r["split"] == "test" for r in rows)
