import csv
import hashlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ---- read as a stream, kept on disk (a hospital's reports file is never held whole; issue 15)

_BYTES = [b"a", b"\n", b"\r", b",", b"\xc3", b"\xa9", b"\xe2\x82\xac", b"\xff", b"\x81", b"\xef\xbb\xbf",
          "\u2028".encode(), b"\x0c", b'"']


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(_BYTES), max_size=40), chunk=st.integers(1, 9))
def test_the_streamed_text_is_what_decoding_the_whole_file_gives(tmp_path, monkeypatch, parts, chunk):
    """Text, warning, fingerprint and JSON lines as the whole-file decode gives them, with reads cut at every
    byte offset (characters split between reads, a BOM, bytes that are not UTF-8 or not cp1252)."""
    import clinfuse.data.reports as reports

    monkeypatch.setattr(reports, "_CHUNK", chunk)
    data = b"".join(parts)
    p = tmp_path / "r.csv"
    p.write_bytes(data)
    want, want_warning = decode_bytes(data)
    whole, streamed = hashlib.sha256(b"report\0" + data), hashlib.sha256()
    f, warning = reports.open_text(p, "report", streamed)
    with f:
        assert f.read() == want
    assert warning == want_warning
    assert streamed.hexdigest() == whole.hexdigest()
    f, _ = reports.open_text(p, "report")
    with f:
        assert list(reports._json_lines(f)) == want.splitlines()


def _reports_csv(path, n, words=150):
    rng = np.random.default_rng(0)
    vocab = ["opacity", "effusion", "clear", "lungs", "no", "acute", "the", "right", "left", "base", "é"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "report"])
        for i in range(n):
            w.writerow([f"1.2.{i}", "FINDINGS: " + " ".join(rng.choice(vocab, words)) + "."])
        w.writerow(["1.2.0", "FINDINGS: another text."])  # a conflicting duplicate: the key is set aside


def test_reports_kept_in_a_build_store_are_the_ones_kept_in_memory(tmp_path):
    from clinfuse.data.buildstore import BuildStore

    path = tmp_path / "reports.csv"
    _reports_csv(path, 300, words=20)
    mem = load_reports(path, "StudyInstanceUID", CFG)
    store = BuildStore(tmp_path / "s.sqlite")
    try:
        disk = load_reports(path, "StudyInstanceUID", CFG, store=store)
        assert len(disk.reports) == len(mem.reports) == 299 and "1.2.0" not in disk.reports
        assert list(disk.reports) == sorted(mem.reports)
        assert all(disk.reports[k] == mem.reports[k] for k in mem.reports)
        assert disk.reports.get("9.9") is None and "1.2.7" in disk.reports
        assert [q.reason for q in disk.quarantine] == [q.reason for q in mem.quarantine]
    finally:
        store.close()


def test_a_large_reports_file_is_not_held_in_memory_by_a_build(tmp_path):
    """tracemalloc counts the Python objects made while reading 12 MB of reports: read into a build store,
    the read buffers only (about 4 MB: a 1 MiB read and its decoded text), whatever the file's size; held in
    memory (no store), more than the file."""
    import tracemalloc

    from clinfuse.data.buildstore import BuildStore

    path = tmp_path / "reports.csv"
    _reports_csv(path, 12_000)
    size = path.stat().st_size
    assert size > 10e6
    peaks = {}
    for where in ("store", "memory"):
        store = BuildStore(tmp_path / "s.sqlite") if where == "store" else None
        tracemalloc.start()
        table = load_reports(path, "StudyInstanceUID", CFG, hashlib.sha256(), store=store)
        peaks[where] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(table.reports) == 11_999
        del table
        if store is not None:
            store.close()
    assert peaks["store"] < min(6e6, size / 2), peaks
    assert peaks["memory"] > size, peaks
