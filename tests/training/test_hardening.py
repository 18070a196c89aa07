"""Training that cannot go well stops clearly: a non-finite loss fails the run, a finished run is not
resumed, several trainings may start at once on a new embedded store."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from clinfuse.pipeline import train_and_audit
from clinfuse.training import trainer as tr
from clinfuse.training.trainer import TrainingError

from ..conftest import REPO, synthetic_cohort, tiny_config


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("harden")
    return synthetic_cohort(d, studies=60, seed=4, size=32, lateral=0)


def _cfg(uri, **train):
    return tiny_config(train={"epochs": 1, "batch_size": 16, **train}, eval={"bootstrap": 0},
                       tracking={"tracking_uri": uri, "experiment": "harden", "register_as": "harden"})


def test_a_non_finite_loss_stops_training_and_fails_the_run(cohort, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    real = tr.build_loss

    class Poisoned(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, logits, y):
            return self.fn(logits, y) * float("nan")

    def poisoned(*a, **k):
        return Poisoned(real(*a, **k))

    monkeypatch.setattr(tr, "build_loss", poisoned)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(TrainingError, match="not finite"):
        train_and_audit(cohort, _cfg(uri), tmp_path / "run", progress=False, log=lambda m: None)
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("harden").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "run" / "best").exists()


def test_resume_of_a_finished_run_says_so_and_changes_nothing(cohort, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    train_and_audit(cohort, _cfg(uri), tmp_path / "run", progress=False, log=lambda m: None)
    before = (tmp_path / "run" / "best" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already finished"):
        train_and_audit(cohort, _cfg(uri), tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    assert (tmp_path / "run" / "best" / "model.safetensors").read_bytes() == before
    assert len(MlflowClient(uri, registry_uri=uri).search_model_versions("name='harden'")) == 1


def test_trainings_started_at_once_on_a_new_store_all_start(tmp_path):
    """3 processes open one new SQLite store at the same moment (it used to lose 2 of 3)."""
    code = (
        "import sys\n"
        "from clinfuse.tracking.mlflow_tracker import MlflowTracker\n"
        f"t = MlflowTracker('sqlite:///{tmp_path / 'new.db'}', 'race', system_metrics=False)\n"
        "t.log_metrics({'x': 1.0}, step=0); t.close(); print(t.run_id)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-800:] for _, e in outs]
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'new.db'}")
    runs = c.search_runs([c.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 3 and {o.strip() for o, _ in outs} == {r.info.run_id for r in runs}


def test_a_damaged_checkpoint_is_one_line(cohort, tmp_path):
    cfg = tiny_config(train={"epochs": 2, "batch_size": 16}, tracking={"enabled": False})
    r = tr.train(cohort, cfg, tmp_path / "run", max_steps=1, progress=False)
    assert r.interrupted
    st = tmp_path / "run" / "state.pt"
    good = st.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x10  # one bit inside the tensors: torch.load would read it silently
    st.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="does not match its checksum"):
        tr.train(cohort, cfg, tmp_path / "run", resume=True, progress=False)
    st.write_bytes(good[: len(good) // 2])
    (tmp_path / "run" / "state.json").unlink()  # a checkpoint from before checksums, truncated
    with pytest.raises(TrainingError, match="cannot be read"):
        tr.train(cohort, cfg, tmp_path / "run", resume=True, progress=False)


def test_the_states_a_kill_can_leave_are_recovered(cohort, tmp_path):
    """The windows between renames, set up by hand: a checkpoint whose state.json already names its
    successor, and a model folder moved aside whose replacement never arrived."""
    import json
    import os

    from clinfuse.inference import Model
    from clinfuse.models.model import recover_folder

    cfg = tiny_config(train={"epochs": 2, "batch_size": 16}, tracking={"enabled": False})
    run = tmp_path / "run"
    assert tr.train(cohort, cfg, run, max_steps=1, progress=False).interrupted
    sums = json.loads((run / "state.json").read_text())
    # killed after state.json was replaced, before state.pt was: the old state.pt is accepted
    (run / "state.json").write_text(json.dumps({"sha256": "0" * 64, "previous": sums["sha256"]}))
    assert tr.train(cohort, cfg, run, resume=True, max_steps=2, progress=False).global_step == 2
    run = tmp_path / "whole"
    tr.train(cohort, tiny_config(train={"epochs": 1, "batch_size": 16}, tracking={"enabled": False}), run,
             progress=False)
    # killed between moving last/ aside and renaming the new one in: the old one comes back
    os.replace(run / "last", run / ".last.old")
    (run / ".last.saving-999").mkdir()
    assert not (run / "last").exists()
    m = Model.load(run / "last")
    assert m.dir == run / "last" and not (run / ".last.old").exists() and not (run / ".last.saving-999").exists()
    # killed after the new one was renamed in, before the old one was removed: the new one stays
    (run / ".last.old").mkdir()
    recover_folder(run / "last")
    assert (run / "last" / "model.json").is_file() and not (run / ".last.old").exists()
    # a folder's other entries survive a save (an evaluation written into it, say)
    (run / "last" / "eval-test").mkdir()
    (run / "last" / "eval-test" / "metrics.json").write_text("{}")
    m.save(run / "last")
    assert (run / "last" / "eval-test" / "metrics.json").is_file() and Model.load(run / "last")
