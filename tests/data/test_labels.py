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
    assert "unknown class 'maybe' in column 'label' (allowed: 0/1" in reasons
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
    assert "unknown value 'x' in label column 'b'" in t.quarantine[0].reason


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
