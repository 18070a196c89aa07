"""kill -9 at several points of a cohort rebuild: the folder left behind is refused or complete, never
read as valid with mixed contents, and a rerun ends identical to an uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from clinfuse.data.cohort import read_cohort
from clinfuse.data.quarantine import CohortInputError

from ..conftest import REPO

pytestmark = pytest.mark.slow


def _build(exp, out, env):
    return [sys.executable, "-m", "clinfuse.cli", "cohort", "build", "--dicom", str(exp / "dicom"), "--reports",
            str(exp / "reports.csv"), "--labels", str(exp / "labels.csv"), "--out", str(out), "--no-progress"]


def test_a_rebuild_killed_anywhere_is_refused_or_complete_and_reruns_identical(tmp_path):
    from clinfuse.data.synth import SynthSpec, synthesize

    exp = tmp_path / "e"
    synthesize(exp, SynthSpec(studies=400, seed=3, size=96, lateral=0.2), progress=False)
    env = {**os.environ, "CLINFUSE_SALT": "fixed-salt-for-this-test"}
    ref = tmp_path / "ref"
    subprocess.run(_build(exp, ref, env), env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    want = (ref / "cohort.csv").read_bytes()
    # the export changes (new labels), so a half-written rebuild would mix old and new
    labels = (exp / "labels.csv").read_text().splitlines()
    flipped = [labels[0]] + [line[:-1] + ("1" if line.endswith("0") else "0") for line in labels[1:]]
    states = []
    for delay in (1.0, 1.6, 2.2, 2.8, 3.4, 4.0):
        out = tmp_path / f"c{delay}"
        (exp / "labels.csv").write_text("\n".join(flipped) + "\n")
        subprocess.run(_build(exp, out, env), env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
        old = (out / "cohort.csv").read_bytes()
        assert old != want
        (exp / "labels.csv").write_text("\n".join(labels) + "\n")
        p = subprocess.Popen(_build(exp, out, env), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        try:
            read_cohort(out)
        except CohortInputError as e:
            states.append("refused")
            assert "did not finish" in str(e) or "does not match" in str(e), e
        else:  # what reads as a cohort is one whole build: the old one or the new one, never a mix
            states.append("complete")
            assert (out / "cohort.csv").read_bytes() in (old, want)
        subprocess.run(_build(exp, out, env), env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
        assert (out / "cohort.csv").read_bytes() == want, f"the rerun after a kill at {delay} s differs"
    assert states, states
