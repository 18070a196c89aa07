"""`clinfuse demo`: the whole path on a small export; a failing stage is named."""

from __future__ import annotations

import json

import pytest

from clinfuse.cli import main
from clinfuse.config import dump_config

from .conftest import tiny_config


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(dump_config(tiny_config(train={"epochs": 2, "batch_size": 16}, eval={"bootstrap": 20},
                                           tracking={"system_metrics": False})))
    rc = main(["demo", "--out", str(tmp_path / "d"), "--config", str(cfg), "--studies", "100", "--explain", "2",
               "--no-progress"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err[-3000:]
    for i in range(1, 6):
        assert f"== [{i}/5]" in out
    assert "% of Bayes" in out and "all (modalities as present)" in out
    assert "open the MLflow UI:  clinfuse ui --tracking-uri sqlite:///" in out
    d = tmp_path / "d"
    assert len([p for p in (d / "explanations").iterdir() if p.is_dir()]) == 2
    bayes = json.loads((d / "run/bayes.json").read_text())
    assert 0.5 < bayes[0]["bayes_auroc"] <= 1.0
    from mlflow import MlflowClient

    run = json.loads((d / "run/mlflow_run.json").read_text())
    r = MlflowClient(tracking_uri=run["tracking_uri"]).get_run(run["run_id"])
    assert "test_bayes_auroc" in r.data.metrics and r.info.status == "FINISHED"


def test_a_failing_stage_is_named(tmp_path, capsys, monkeypatch):
    import clinfuse.data.cohort as cohort

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cohort, "build_cohort", broken)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(dump_config(tiny_config()))
    rc = main(["demo", "--out", str(tmp_path / "d"), "--config", str(cfg), "--studies", "20", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "stage 2/5 (cohort build): disk full" in err
