"""The same run twice gives the same model, and `clinfuse reproduce` proves it (or names what differs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from clinfuse.cli import main
from clinfuse.errors import ClinfuseError
from clinfuse.pipeline import reproduce

from .conftest import REPO, synthetic_cohort


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny run trained by `clinfuse train` in another process with one torch thread."""
    d = tmp_path_factory.mktemp("repro")
    synthetic_cohort(d, studies=90, seed=6, size=32, lateral=0)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "clinfuse.cli", "train", "--cohort", str(d / "c"), "--out", str(d / "run"),
           "--config", str(REPO / "configs/tiny.yaml"), "--tracking-uri", uri, "--no-progress",
           "--set", "train.epochs=2", "--set", "data.image_size=[32,32]", "--set", "eval.bootstrap=0",
           "--set", "tracking.register_as=repro"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": "1"}  # torch's default thread count in that process: 1
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = json.loads((d / "run" / "mlflow_run.json").read_text())["run_id"]
    return d, uri, run_id


def test_the_run_records_what_decides_its_result(logged):
    d, uri, run_id = logged
    run = MlflowClient(uri).get_run(run_id)
    p, t = run.data.params, run.data.tags
    assert p["torch_threads"] == "1" and p["deterministic"] == "True" and p["train.seed"] == "0"
    assert p["cohort_fingerprint"] and t["mlflow.source.git.commit"] and t["git.dirty"] in ("True", "False")
    assert len(t["clinfuse.weights_sha256"]) == 64 and t["version.torch"]


def test_reproduce_gives_identical_weights_with_another_thread_count_here(logged, tmp_path, capsys):
    d, uri, run_id = logged
    rc = main(["reproduce", run_id, "--cohort", str(d / "c"), "--out", str(tmp_path / "again"),
               "--tracking-uri", uri, "--force", "--no-progress"])  # --force: the working tree may be dirty
    out = capsys.readouterr().out
    assert rc == 0 and "weights identical: yes" in out and "test_auroc" in out
    c = MlflowClient(uri)
    new = [r for r in c.search_runs([c.get_run(run_id).info.experiment_id])
           if r.data.tags.get("clinfuse.reproduces") == run_id]
    assert len(new) == 1 and new[0].data.tags["clinfuse.reproduce.weights_identical"] == "True"
    assert new[0].data.metrics["test_auroc"] == c.get_run(run_id).data.metrics["test_auroc"]


def test_a_changed_cohort_is_refused_with_the_differing_counts(logged, tmp_path):
    d, uri, run_id = logged
    other = synthetic_cohort(tmp_path, studies=80, seed=6, size=32, lateral=0)
    with pytest.raises(ClinfuseError, match=r"not the one the run was trained on .*studies 90 -> 80"):
        reproduce(run_id, other, tmp_path / "x", tracking_uri=uri, progress=False, log=lambda m: None)


def test_a_changed_config_value_is_named(logged, tmp_path):
    d, uri, run_id = logged
    lines = []
    r = reproduce(run_id, d / "c", tmp_path / "y", tracking_uri=uri, force=True, overrides=["train.epochs=1"],
                  progress=False, log=lines.append)
    assert r["config_changes"] == ["train.epochs: 2 -> 1"] and not r["weights_identical"]
    assert any("config differs from the logged run: train.epochs: 2 -> 1" in line for line in lines)
