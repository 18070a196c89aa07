"""Structured clinical variables: the synthetic export's second view and variables, and the cohort's
variables table (declared or inferred, every bad value set aside per study with the reason)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from clinfuse.config import CohortConfig, load_config
from clinfuse.data.cohort import build_cohort, format_summary, read_cohort
from clinfuse.data.quarantine import CohortInputError
from clinfuse.data.synth import SynthSpec, posterior, synthesize


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def views_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    synthesize(d, SynthSpec(studies=60, size=32, seed=4, views=2, variables=3), progress=False)
    return d


def test_truth_holds_the_posterior_of_every_subset_and_it_is_recomputable(views_export):
    truth = _rows(views_export / "truth.csv")
    variables = {r["StudyInstanceUID"]: r for r in _rows(views_export / "variables.csv")}
    spec = SynthSpec(studies=60, size=32, seed=4, views=2, variables=3)
    from clinfuse.data.synth import VARIABLES

    for r in truth:
        names = [n for n in ("frontal", "lateral", "report", "variables")]
        assert all(f"p_{n}_label" in r for n in names) and "p_frontal+lateral+report+variables_label" in r
        v = variables[r["StudyInstanceUID"]]
        z = np.array([(float(v[name]) - base) / scale if v[name] else np.nan
                      for name, base, scale, _ in VARIABLES[:3]])
        o, t, lat = (np.array([int(r[c])]) for c in ("image_cue_pneumonia", "report_cue_pneumonia",
                                                      "lateral_cue_pneumonia"))
        got = posterior(spec, o if r["has_frontal"] == "1" else None, t if r["has_report"] == "1" else None,
                        lat if r["has_lateral"] == "1" else None, z)[0]
        assert abs(got - float(r["p_available_label"])) < 1e-5
        assert abs(posterior(spec, None, None, None, z)[0] - float(r["p_variables_label"])) < 1e-5


def test_the_variables_and_the_lateral_view_carry_signal(tmp_path):
    """On a larger export the Bayes AUROC of each new group alone is well above chance, and adding them to
    frontal + report raises it (what the model is measured against)."""
    from sklearn.metrics import roc_auc_score

    synthesize(tmp_path, SynthSpec(studies=3000, size=32, seed=0, views=2, variables=4, missing_image=0,
                                   missing_report=0), progress=False)
    truth = _rows(tmp_path / "truth.csv")
    y = [int(r["y_pneumonia"]) for r in truth]
    auc = {k: roc_auc_score(y, [float(r[f"p_{k}_label"]) for r in truth])
           for k in ("lateral", "variables", "frontal+report", "frontal+lateral+report+variables")}
    assert auc["lateral"] > 0.7 and auc["variables"] > 0.7
    assert auc["frontal+lateral+report+variables"] > auc["frontal+report"] + 0.03


def test_cohort_build_joins_inferred_variables_and_views(tmp_path, views_export):
    d = views_export
    s = build_cohort(d / "dicom", d / "reports.csv", d / "labels.csv", tmp_path / "c",
                     CohortConfig(dicom={"view_policy": "all"}), progress=False, variables=d / "variables.csv")
    rows, info = read_cohort(tmp_path / "c")
    v = info["variables"]
    assert v["inferred"] and v["numeric"] == ["crp", "temperature_c", "wbc"] and v["categorical"] == {"sex": ["F", "M"]}
    assert 0 < v["missing_share"]["wbc"] < 0.5
    # the inferred declaration is the cohort's own configuration, so training reads the same one
    cfg = load_config(tmp_path / "c" / "config.yaml")
    assert sorted(cfg.cohort.variables.numeric) == v["numeric"]
    truth = {r["StudyInstanceUID"]: r for r in _rows(d / "truth.csv")}
    key_of = dict(_rows(tmp_path / "c" / "private" / "key_map.csv")[i].values() for i in range(len(rows)))
    two = [r for r in rows if r["n_images"] == 2]
    assert two and all(r["image_views"][0] in ("PA", "AP") and r["image_views"][1] == "LL" for r in two)
    for r in rows:
        t = truth[key_of[r["study_id"]]]
        assert r["n_images"] == int(t["has_frontal"]) + int(t["has_lateral"])
        assert all(isinstance(x, float) for k, x in r["variables"].items() if k != "sex")
    assert "variables (inferred from the file): numeric crp, temperature_c, wbc" in format_summary(info)
    assert s.n_studies == 60


def _tables(d, labels: str, reports: str, variables: str):
    """labels.csv, reports.csv and variables.csv in `d` with these texts; their paths."""
    paths = (d / "labels.csv", d / "reports.csv", d / "variables.csv")
    for path, text in zip(paths, (labels, reports, variables)):
        path.write_text(text)
    return paths


def test_bad_values_are_set_aside_per_study_and_unknown_columns_named(tmp_path):
    labels, reports, var = _tables(
        tmp_path, "StudyInstanceUID,label\ns1,1\ns2,0\ns3,1\n",
        "StudyInstanceUID,report\ns1,FINDINGS: a\ns2,FINDINGS: b\ns3,FINDINGS: c\n",
        "StudyInstanceUID,age,sex,mrn_note\ns1,abc,F,x\ns2,170,Q,y\ns3,41,M,z\nsX,50,F,w\n")
    cfg = CohortConfig(variables={"numeric": {"age": {"min": 0, "max": 120}}, "categorical": {"sex": ["F", "M"]}})
    build_cohort(None, reports, labels, tmp_path / "c", cfg, progress=False, variables=var)
    rows, info = read_cohort(tmp_path / "c")
    got = {r["report"][-1]: r["variables"] for r in rows}
    assert got == {"a": {"sex": "F"}, "b": {}, "c": {"age": 41.0, "sex": "M"}}
    q = {(r["source"], r["reason"]) for r in _rows(tmp_path / "c" / "quarantine.csv")}
    reasons = " | ".join(sorted(r for _, r in q))
    assert "age: 'abc' is not a finite number; treated as missing" in reasons
    assert "age: 170 out of range [0.0, 120.0]" in reasons
    assert "sex: 'Q' is not one of ['F', 'M']" in reasons
    assert "column 'mrn_note' is not declared in cohort.variables; ignored" in reasons
    assert "no valid label for this StudyInstanceUID; its variables join no study" in reasons
    assert any(src.endswith("variables.csv:row 2") for src, _ in q)
    assert info["variables"]["inferred"] is False


def test_whole_input_problems_are_one_line_errors(tmp_path):
    labels, reports, var = _tables(tmp_path, "StudyInstanceUID,label\ns1,1\n",
                                   "StudyInstanceUID,report\ns1,FINDINGS: a\n", "key,age\ns1,3\n")
    with pytest.raises(CohortInputError, match="key column 'StudyInstanceUID' not found"):
        build_cohort(None, reports, labels, tmp_path / "c", progress=False, variables=var)
    var.write_text("StudyInstanceUID,age\ns1,3\n")
    with pytest.raises(CohortInputError, match=r"declared variable\(s\) \['crp'\] not in the file"):
        build_cohort(None, reports, labels, tmp_path / "c", CohortConfig(variables={"numeric": {"crp": {}}}),
                     progress=False, variables=var)
    free = "\n".join(f"s{i},note number {i}" for i in range(30))
    var.write_text("StudyInstanceUID,comment\n" + free + "\n")
    with pytest.raises(CohortInputError, match="no usable variable column"):
        build_cohort(None, reports, labels, tmp_path / "c", progress=False, variables=var)
    with pytest.raises(CohortInputError, match="variables file not found"):
        build_cohort(None, reports, labels, tmp_path / "c", progress=False, variables=tmp_path / "none.csv")


def test_inference_streams_and_the_fingerprint_is_of_the_bytes_parsed_once(tmp_path):
    """Inferring the kinds reads the file a first time; the fingerprint is fed by the parsing pass alone, so
    an inferred and a declared read of the same file give the same digest. A column of more distinct
    non-numeric values than a category may hold is refused (its values are not kept: a count suffices).
    In a build store the values equal the in-memory table's."""
    import hashlib

    from clinfuse.config import VariablesConfig
    from clinfuse.data.buildstore import BuildStore
    from clinfuse.data.variables import MAX_CATEGORIES, load_variables

    var = tmp_path / "v.csv"
    lines = [f"s{i},{36 + i % 5 / 10},{'FM'[i % 2]},free text {i}" for i in range(3 * MAX_CATEGORIES)]
    var.write_text("StudyInstanceUID,temp,sex,comment\n" + "\n".join(lines) + "\ns0,36.0,F,free text 0\n")
    inferred_digest, declared_digest = hashlib.sha256(), hashlib.sha256()
    t = load_variables(var, "StudyInstanceUID", VariablesConfig(), inferred_digest)
    assert t.inferred and sorted(t.declared.numeric) == ["temp"] and t.declared.categorical == {"sex": ["F", "M"]}
    assert any(f"column 'comment' has more than {MAX_CATEGORIES} distinct values" in q.reason for q in t.quarantine)
    d = load_variables(var, "StudyInstanceUID", t.declared, declared_digest)
    assert inferred_digest.hexdigest() == declared_digest.hexdigest()
    assert t.n_records == d.n_records == 3 * MAX_CATEGORIES + 1 and t.values == d.values
    store = BuildStore(tmp_path / "b.sqlite")
    try:
        s = load_variables(var, "StudyInstanceUID", VariablesConfig(), None, store)
        assert dict(s.values) == t.values and dict(s.sources) == t.sources and s.values["s3"] == {"temp": 36.3,
                                                                                               "sex": "M"}
    finally:
        store.close()


def test_a_study_with_variables_alone_is_kept(tmp_path):
    labels, reports, var = _tables(tmp_path, "StudyInstanceUID,label\ns1,1\ns2,0\n",
                                   "StudyInstanceUID,report\ns1,FINDINGS: a\n", "StudyInstanceUID,age\ns1,3\ns2,4\n")
    s = build_cohort(None, reports, labels, tmp_path / "c", progress=False, variables=var)
    rows, _ = read_cohort(tmp_path / "c")
    assert s.n_studies == 2 and {json.dumps(r["variables"]) for r in rows} == {'{"age": 3.0}', '{"age": 4.0}'}


def test_cli_synth_and_cohort_build_with_variables(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "clinfuse.cli", "synth", "--out", str(tmp_path / "e"), "--studies",
                          "20", "--size", "32", "--views", "2", "--variables", "2", "--no-progress"],
                         capture_output=True, text=True, check=True).stdout
    assert "--variables" in out and "view_policy=all" in out
    r = subprocess.run([sys.executable, "-m", "clinfuse.cli", "cohort", "build", "--dicom", str(tmp_path / "e/dicom"),
                        "--reports", str(tmp_path / "e/reports.csv"), "--labels", str(tmp_path / "e/labels.csv"),
                        "--variables", str(tmp_path / "e/variables.csv"), "--out", str(tmp_path / "c"),
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "variables (inferred from the file): numeric temperature_c, wbc; categorical sex" in r.stdout
