import json

import pytest

from clinfuse.config import ReportConfig
from clinfuse.data.quarantine import CohortInputError
from clinfuse.data.reports import clean_text, decode_bytes, load_reports, model_text, split_sections

CFG = ReportConfig()


def test_sections_case_insensitive_with_preamble_as_findings():
    s = split_sections("Lungs are clear. Indication: cough.  impression: normal chest.", CFG.sections)
    assert s == {"FINDINGS": "Lungs are clear.", "INDICATION": "cough.", "IMPRESSION": "normal chest."}


def test_empty_sections_are_dropped_and_repeated_ones_joined():
    s = split_sections("FINDINGS: FINDINGS: small effusion. IMPRESSION: COMPARISON: none.", CFG.sections)
    assert s == {"FINDINGS": "small effusion.", "COMPARISON": "none."}


def test_model_text_reads_chosen_sections_in_order():
    s = {"IMPRESSION": "no acute disease.", "INDICATION": "fever.", "COMPARISON": "none."}
    assert model_text(s, ["INDICATION", "IMPRESSION"]) == "INDICATION: fever. IMPRESSION: no acute disease."
    assert model_text(s, ["FINDINGS"]) == ""


def test_deid_tokens_normalised():
    text = clean_text("Seen by XXXXXX on [**2019-01-02**] at ___ with <NAME>.", CFG)
    assert text == "Seen by XXXX on XXXX at XXXX with XXXX."


def test_non_utf8_bytes_decoded_with_stated_fallback():
    text, warn = decode_bytes("Opacité à droite".encode("cp1252"))
    assert text == "Opacité à droite"
    assert "not valid utf-8" in warn and "cp1252" in warn
    assert decode_bytes("plain".encode())[1] is None
    assert decode_bytes(b"\xef\xbb\xbfBOM text")[0] == "BOM text"


def test_csv_duplicates_empty_and_encoding(tmp_path):
    f = tmp_path / "reports.csv"
    rows = [
        "StudyInstanceUID,report",
        "1.1,FINDINGS: clear lungs.",
        "1.1,FINDINGS: clear lungs.",  # identical duplicate: merged
        "1.2,FINDINGS: effusion.",
        "1.2,FINDINGS: no effusion.",  # conflicting: both set aside
        "1.3,",  # empty
        "1.4,COMPARISON: none.",  # nothing in the sections read
        ",FINDINGS: orphan",  # empty key
        "1.5,FINDINGS: opacit\xe9.",
    ]
    f.write_bytes("\n".join(rows).encode("cp1252"))
    t = load_reports(f, "StudyInstanceUID", CFG)
    assert set(t.reports) == {"1.1", "1.5"}
    assert t.reports["1.5"].text == "FINDINGS: opacité."
    reasons = [q.reason for q in t.quarantine]
    assert any("conflicting duplicate" in r for r in reasons)
    assert "empty report" in reasons
    assert any("no text in the sections read" in r for r in reasons)
    assert any("empty key" in r for r in reasons)
    assert all(str(f) in q.source for q in t.quarantine)
    assert t.warnings and "cp1252" in t.warnings[0]
    assert t.n_records == 8


def test_jsonl_and_folder_sources(tmp_path):
    j = tmp_path / "r.jsonl"
    j.write_text(json.dumps({"AccessionNumber": "A1", "report": "IMPRESSION: normal."}) + "\n{broken\n")
    t = load_reports(j, "AccessionNumber", CFG)
    assert t.reports["A1"].text == "IMPRESSION: normal."
    assert "invalid JSON" in t.quarantine[0].reason
    d = tmp_path / "txt"
    d.mkdir()
    (d / "A2.txt").write_text("FINDINGS: small nodule.")
    (d / "A3.txt").write_bytes(b"FINDINGS: d\xe9j\xe0 vu.")
    t = load_reports(d, "AccessionNumber", CFG)
    assert t.reports["A2"].text == "FINDINGS: small nodule."
    assert t.reports["A3"].text == "FINDINGS: déjà vu." and len(t.warnings) == 1


def test_missing_column_or_source_is_fatal(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("id,text\n1,x\n")
    with pytest.raises(CohortInputError, match="column 'StudyInstanceUID' not found.*--reports-key"):
        load_reports(f, "StudyInstanceUID", CFG)
    with pytest.raises(CohortInputError, match="not found"):
        load_reports(tmp_path / "none.csv", "StudyInstanceUID", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortInputError, match="no .txt report files"):
        load_reports(tmp_path / "empty", "StudyInstanceUID", CFG)
