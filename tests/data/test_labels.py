import pytest

from clinfuse.config import LabelConfig
from clinfuse.data.labels import load_labels, parse_binary
from clinfuse.data.quarantine import CohortInputError


def _csv(tmp_path, text):
    f = tmp_path / "labels.csv"
    f.write_text(text)
    return f


def test_binary_spellings_and_class_names():
    assert [parse_binary(v) for v in ("1", "TRUE", "yes", "0", "no", "False")] == [1, 1, 1, 0, 0, 0]
    assert parse_binary("Pneumonia", ["normal", "pneumonia"]) == 1
    assert parse_binary("maybe") is None


def test_binary_unknown_missing_and_duplicates(tmp_path):
    f = _csv(tmp_path, "StudyInstanceUID,label\n1,1\n2,0\n3,maybe\n4,\n5,1\n5,1\n6,1\n6,0\n")
    t = load_labels(f, "StudyInstanceUID", LabelConfig())
    assert t.labels == {"1": [1], "2": [0], "5": [1]}
    reasons = " | ".join(q.reason for q in t.quarantine)
    assert "unknown class in column 'label': 'maybe' (allowed: 0/1" in reasons
    assert "missing label" in reasons and "conflicting duplicate" in reasons
    assert t.sources["1"].endswith(":row 2")


def test_multiclass_by_name(tmp_path):
    f = _csv(tmp_path, "AccessionNumber,dx\nA,normal\nB,Effusion\nC,cancer\n")
    cfg = LabelConfig(task="multiclass", columns=["dx"], classes=["normal", "pneumonia", "effusion"])
    t = load_labels(f, "AccessionNumber", cfg)
    assert t.labels == {"A": [0], "B": [2]}
    assert "allowed: normal, pneumonia, effusion" in t.quarantine[0].reason


def test_multilabel_columns(tmp_path):
    f = _csv(tmp_path, "StudyInstanceUID,PatientID,a,b\n1,P1,1,0\n2,P2,0,x\n")
    t = load_labels(f, "StudyInstanceUID", LabelConfig(task="multilabel", columns=["a", "b"]))
    assert t.labels == {"1": [1, 0]} and t.patients == {"1": "P1"}
    assert "unknown value in label column 'b': 'x'" in t.quarantine[0].reason


def test_missing_columns_are_fatal(tmp_path):
    f = _csv(tmp_path, "key,label\n1,1\n")
    with pytest.raises(CohortInputError, match="key column 'StudyInstanceUID' not found"):
        load_labels(f, "StudyInstanceUID", LabelConfig())
    with pytest.raises(CohortInputError, match=r"label column\(s\) \['dx'\] not found"):
        load_labels(f, "key", LabelConfig(columns=["dx"]))


def test_labels_kept_in_a_build_store_are_the_ones_kept_in_memory(tmp_path):
    from clinfuse.data.buildstore import BuildStore

    f = _csv(tmp_path, "StudyInstanceUID,label,PatientID\n1,1,p1\n2,0,p2\n3,maybe,p3\n5,1,p5\n5,1,p9\n6,1,p6\n"
                       "6,0,p6\n7,0,\n")
    cfg = LabelConfig(patient_column="PatientID")
    mem = load_labels(f, "StudyInstanceUID", cfg)
    store = BuildStore(tmp_path / "s.sqlite")
    try:
        disk = load_labels(f, "StudyInstanceUID", cfg, store=store)
        assert dict(disk.labels) == mem.labels == {"1": [1], "2": [0], "5": [1], "7": [0]}
        assert dict(disk.sources) == mem.sources and "6" in disk.sources and "6" not in disk.labels
        assert dict(disk.patients) == mem.patients == {"1": "p1", "2": "p2", "5": "p5", "6": "p6"}
        assert [q.reason for q in disk.quarantine] == [q.reason for q in mem.quarantine]
    finally:
        store.close()


def test_a_bad_label_value_stays_out_of_the_cohort_summary(tmp_path):
    """A label column holding something else (a patient's name, a pasted note) is set aside row by row:
    quarantine.csv (which stays with the cohort) names the value, cut to 40 characters, while
    cohort.json's reason counts (logged to MLflow) and the printed summary hold the reason's kind only."""
    import json

    from clinfuse.data.cohort import build_cohort, format_summary

    rows = ["StudyInstanceUID,label"] + [f"s{i},{'DOE^JOHN' if i % 3 == 0 else i % 2}" for i in range(12)]
    rows.append("s12," + "x" * 5000)
    labels = _csv(tmp_path, "\n".join(rows) + "\n")
    reports = tmp_path / "reports.csv"
    reports.write_text("StudyInstanceUID,report\n" + "".join(f"s{i},FINDINGS: clear\n" for i in range(13)))
    s = build_cohort(None, reports, labels, tmp_path / "c", progress=False)
    quarantine = (tmp_path / "c" / "quarantine.csv").read_text()
    assert "unknown class in column 'label': 'DOE^JOHN'" in quarantine and "'" + "x" * 40 + "'" in quarantine
    assert "x" * 41 not in quarantine
    info = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert info["quarantine_reasons"]["label: unknown class in column 'label'"] == 5
    for text in (json.dumps(info), format_summary(s.info)):
        assert "DOE" not in text and "xxxx" not in text
