"""Identifiers typed into report text in evasive forms never reach the model, MLflow or an artifact."""

from __future__ import annotations

import csv
import json

import pydicom

from clinfuse.data.cohort import build_cohort, read_cohort
from clinfuse.data.synth import SynthSpec, synthesize
from clinfuse.pipeline import explain_and_log, train_and_audit
from clinfuse.tracking.phi import PhiGuard

from ..conftest import tiny_config


def _evasive_reports(exp) -> int:
    """Append to each report its own patient's MRN digits, accession digits, birth date as dd.mm.yyyy and
    name in 'Given Family' order (and twice, so that the tiny vocabulary would keep them)."""
    heads = {}
    for f in (exp / "dicom").rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the broken files of the export
            continue
        heads[str(ds.StudyInstanceUID)] = ds
    with open(exp / "reports.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = 0
    for r in rows:
        ds = heads.get(r["StudyInstanceUID"])
        if ds is None or not r["report"]:
            continue
        mrn = "".join(c for c in str(ds.PatientID) if c.isdigit())
        acc = "".join(c for c in str(ds.AccessionNumber) if c.isdigit())
        b = str(ds.PatientBirthDate)
        family, given = (str(ds.PatientName).split("^") + [""])[:2]
        extra = f" Patient {given.title()} {family.title()}, mrn {mrn}, acc. {acc}, born {b[6:]}.{b[4:6]}.{b[:4]}."
        r["report"] += extra + extra
        n += 1
    with open(exp / "reports.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return n


def test_evasive_identifiers_never_leave_the_cohort(tmp_path):
    exp = tmp_path / "e"
    synthesize(exp, SynthSpec(studies=90, seed=17, size=40, lateral=0), progress=False)
    assert _evasive_reports(exp) > 50
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", tmp_path / "c", progress=False)
    ids = json.loads((tmp_path / "c/private/identifiers.json").read_text())
    guard = PhiGuard(ids)
    rows, info = read_cohort(tmp_path / "c")
    assert info["counts"]["identifiers_redacted_in_reports"] >= 4 * 50
    assert all(guard.find(r["report"]) is None for r in rows), "an identifier stayed in a report's model text"
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cfg = tiny_config(train={"epochs": 2, "batch_size": 16}, eval={"bootstrap": 0},
                      tracking={"tracking_uri": uri, "experiment": "evasive", "register_as": "evasive"})
    run = train_and_audit(tmp_path / "c", cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert run.model["version"]
    explain_and_log(str(tmp_path / "run"), tmp_path / "x", cohort_dir=tmp_path / "c", limit=10, progress=False,
                    log=lambda m: None)
    files = [f for d in (tmp_path / "store", tmp_path / "x", tmp_path / "run" / "best") for f in d.rglob("*")
             if f.is_file()]
    assert len(files) > 30
    from clinfuse.phi import _screenable_text

    for f in files:  # what the guard reads of each file: all of a text, the headers and text chunks of binaries
        kind = guard.find(_screenable_text(f))
        assert kind is None, f"identifier of kind {kind} in {f.relative_to(tmp_path)}"


def test_a_guard_built_in_chunks_redacts_exactly_what_one_guard_does(tmp_path, monkeypatch):
    """A hospital's identifier list is screened in chunks of bounded memory; the chunks together must find
    every identifier one whole guard finds, and replace it the same way."""
    import clinfuse.data.cohort as cohort

    exp = tmp_path / "e"
    synthesize(exp, SynthSpec(studies=40, seed=5, size=32, lateral=0), progress=False)
    assert _evasive_reports(exp) > 20
    monkeypatch.setenv("CLINFUSE_SALT", "fixed")
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", tmp_path / "whole", progress=False)
    monkeypatch.setattr(cohort, "_GUARD_BUDGET", 40)  # a few names or dates per chunk: dozens of chunks
    chunks = []
    real = cohort.BuildStore.identifiers
    monkeypatch.setattr(cohort.BuildStore, "identifiers",
                        lambda self, budget: (chunks.append(c) or c for c in real(self, budget)))
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", tmp_path / "chunked", progress=False)
    assert len(chunks) > 10
    whole, chunked = (read_cohort(tmp_path / d) for d in ("whole", "chunked"))
    assert [r["report"] for r in chunked[0]] == [r["report"] for r in whole[0]]
    n = whole[1]["counts"]["identifiers_redacted_in_reports"]
    assert chunked[1]["counts"]["identifiers_redacted_in_reports"] == n >= 4 * 20
    assert (tmp_path / "whole/cohort.csv").read_bytes() == (tmp_path / "chunked/cohort.csv").read_bytes()
