"""The synthetic generator: planted signal, exact posteriors, layout, identifiers."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest

from clinfuse.data.dicom import read_dicom
from clinfuse.data.synth import FINDINGS, SynthSpec, posterior, synthesize


def _rows(p):
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def test_posterior_is_calibrated_against_sampled_labels(tmp_path):
    synthesize(tmp_path, SynthSpec(studies=3000, seed=5, size=32, missing_image=0, missing_report=0, lateral=0),
               progress=False)
    truth = _rows(tmp_path / "truth.csv")
    p = np.array([float(t["p_both_label"]) for t in truth])
    y = np.array([int(t["y_pneumonia"]) for t in truth])
    # mean label within probability bins matches the posterior (sampling error ~0.03)
    for lo, hi in ((0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.01)):
        m = (p >= lo) & (p < hi)
        if m.sum() > 100:
            assert abs(y[m].mean() - p[m].mean()) < 0.05, (lo, hi)
    from sklearn.metrics import roc_auc_score

    auc = {w: roc_auc_score(y, [float(t[f"p_{w}_label"]) for t in truth]) for w in ("image", "report", "both")}
    assert auc["both"] > max(auc["image"], auc["report"]) + 0.03, auc  # fusion matters


def test_multiclass_posterior_sums_to_one_and_prefers_the_cued_class():
    spec = SynthSpec(task="multiclass", prevalence=0.2)
    p = posterior(spec, np.array([2, 0, 0]), np.array([2, 0, 0]))
    assert p.shape == (4,) and p.sum() == pytest.approx(1.0) and p.argmax() == 1
    assert posterior(spec, None, None) == pytest.approx([0.4, 0.2, 0.2, 0.2])


def test_image_cue_is_visible_and_report_cue_is_textual(tmp_path):
    synthesize(tmp_path, SynthSpec(studies=120, seed=2, size=64, lateral=0, missing_image=0, missing_report=0),
               progress=False)
    truth = {t["StudyInstanceUID"]: t for t in _rows(tmp_path / "truth.csv")}
    reports = {r["StudyInstanceUID"]: r["report"] for r in _rows(tmp_path / "reports.csv")}
    zone = {0: [], 2: []}
    r0, c0 = (int(x * 64) for x in FINDINGS[0].zone)
    for f in (tmp_path / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        cue = int(truth[ds.StudyInstanceUID]["image_cue_pneumonia"])
        if cue in zone:
            px = read_dicom(f, voi="window", window=(2048, 4096)).pixels[0]
            zone[cue].append(px[r0 - 4 : r0 + 4, c0 - 4 : c0 + 4].mean())
    assert np.mean(zone[2]) - np.mean(zone[0]) > 0.15
    for key, t in truth.items():
        stated = any(s in reports[key] for s in FINDINGS[0].stated)
        assert stated == (t["report_cue_pneumonia"] == "2")
        assert "opacity" not in reports[key].lower()  # the image finding is never written


def test_layout_identifiers_and_missingness(tmp_path):
    s = synthesize(tmp_path, SynthSpec(studies=50, seed=0, size=32, missing_image=0.3, missing_report=0.3,
                                       corrupt=4), progress=False)
    truth = _rows(tmp_path / "truth.csv")
    assert len(truth) == 50 == len(_rows(tmp_path / "labels.csv"))
    assert all(t["has_image"] == "1" or t["has_report"] == "1" for t in truth)
    assert 5 < sum(t["has_image"] == "0" for t in truth) < 25
    f = next((tmp_path / "dicom").rglob("MRN*/*/*.dcm"))
    ds = pydicom.dcmread(f)
    assert "^" in str(ds.PatientName) and len(ds.PatientBirthDate) == 8 and ds.AccessionNumber.startswith("ACC")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert [c["kind"] for c in s["corrupt_files"]] == ["zero_byte", "not_dicom", "truncated_pixels", "cut_header"]


def test_bad_spec_rejected(tmp_path):
    with pytest.raises(ValueError, match="prevalence"):
        synthesize(tmp_path, SynthSpec(task="multiclass", prevalence=0.4))
    with pytest.raises(ValueError, match="missing_image"):
        synthesize(tmp_path, SynthSpec(missing_image=1.5))
