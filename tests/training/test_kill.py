"""kill -9 at several points of a training (epochs, checkpoints, model saving): what is left loads or is
refused, never half-read, and the resume (or the rerun, when no checkpoint was written yet) ends with
the very weights of an uninterrupted run. Slow marker: CI runs it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from ..conftest import REPO, synthetic_cohort

pytestmark = pytest.mark.slow


def _cmd(cohort, out, resume=False):
    return [sys.executable, "-m", "clinfuse.cli", "train", "--cohort", str(cohort), "--out", str(out),
            "--config", str(REPO / "configs" / "tiny.yaml"), "--no-mlflow", "--no-progress",
            "--set", "data.image_size=[32,32]", "--set", "train.epochs=4", "--set", "train.patience=0",
            "--set", "train.deterministic=true", "--set", "train.threads=1", "--set", "eval.bootstrap=0",
            *(["--resume"] if resume else [])]


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_training_killed_anywhere_resumes_to_the_same_weights(tmp_path):
    from clinfuse.errors import ClinfuseError
    from clinfuse.inference import Model

    cohort = synthetic_cohort(tmp_path, studies=160, seed=2, size=40)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    t0 = time.time()
    subprocess.run(_cmd(cohort, tmp_path / "ref"), env=env, cwd=REPO, check=True, capture_output=True, timeout=600)
    wall = time.time() - t0
    want = {f: _sha(tmp_path / "ref" / f / "model.safetensors") for f in ("best", "last")}
    outcomes = []
    for frac in (0.35, 0.5, 0.65, 0.8, 0.92):
        out = tmp_path / f"k{frac}"
        p = subprocess.Popen(_cmd(cohort, out), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(frac * wall)
        killed = p.poll() is None
        if killed:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        for f in ("best", "last"):  # what a kill leaves is a whole model or none
            if (out / f).exists() or (out / f".{f}.old").exists():
                try:
                    Model.load(out / f)
                except ClinfuseError as e:
                    raise AssertionError(f"after a kill at {frac:.0%}, {f}/ does not load: {e}") from None
        resume = (out / "state.pt").is_file()
        outcomes.append(("killed" if killed else "finished") + (", resumed" if resume else ", rerun"))
        r = subprocess.run(_cmd(cohort, out, resume=resume), env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
        if resume and "already finished" in (r.stderr + r.stdout):
            pass  # killed after the last checkpoint of a finished training: nothing to resume, said so
        else:
            assert r.returncode == 0, f"after a kill at {frac:.0%}: {r.stderr[-1500:]}"
        for f in ("best", "last"):
            assert _sha(out / f / "model.safetensors") == want[f], f"{f}/ differs after a kill at {frac:.0%}"
        assert not list(out.glob(".*.saving-*")) and not list(out.glob(".*.old"))
    assert any(o.startswith("killed") for o in outcomes), outcomes
