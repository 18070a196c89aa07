"""Cohort building: joins, quarantine (nothing else lost), patient-level splits, fingerprint, no identifiers."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from clinfuse.config import Config, config_from_dict
from clinfuse.data.cohort import assign_splits, build_cohort, read_cohort
from clinfuse.data.quarantine import CohortInputError
from clinfuse.data.synth import SynthSpec, synthesize


def _build(export, out, cfg=None, **kw):
    return build_cohort(export / "dicom", export / "reports.csv", export / "labels.csv", out, cfg or Config(),
                        progress=False, **kw)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_splits_are_patient_level_stratified_and_seeded():
    rng = np.random.default_rng(0)
    patient_of, strata = {}, {}
    for i in range(2000):
        s = f"s{i}"
        patient_of[s] = f"p{rng.integers(0, 700)}"
        strata[s] = str(int(rng.random() < 0.1))
    frac = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = assign_splits(patient_of, strata, frac, seed=1)
    split_of_patient = {}
    for s, p in patient_of.items():
        assert split_of_patient.setdefault(p, a[s]) == a[s], "a patient is in two splits"
    for name, f in frac.items():
        part = [s for s in a if a[s] == name]
        assert abs(len(part) / len(a) - f) < 0.05
        assert abs(np.mean([strata[s] == "1" for s in part]) - np.mean([v == "1" for v in strata.values()])) < 0.04
    assert a == assign_splits(patient_of, strata, frac, seed=1)
    assert a != assign_splits(patient_of, strata, frac, seed=2)


def test_the_build_stores_split_is_the_in_memory_split(tmp_path):
    """A build assigns splits from its store's tables (nothing per study in memory): the same splits as
    assign_splits on dicts, and both the same as shuffling each stratum's sorted patients themselves
    (what assign_splits did before it shuffled an index array)."""
    from collections import Counter

    from clinfuse.data.buildstore import BuildStore
    from clinfuse.data.cohort import _assign_stored

    rng = np.random.default_rng(3)
    patient_of, strata = {}, {}
    for i in range(1500):  # several studies per patient, strata of unequal frequency and a tie (b, c)
        patient_of[f"s{i}"] = f"P{rng.integers(0, 400)}\u00e9" if i % 7 else f"__study__{i}"
        strata[f"s{i}"] = str(rng.choice(["a", "b", "c", "d"], p=[0.6, 0.15, 0.15, 0.1]))
    frac = {"train": 0.7, "val": 0.15, "test": 0.15}
    for seed in (0, 5):
        got = assign_splits(patient_of, strata, frac, seed)
        # the former algorithm, as an oracle
        freq = Counter(strata.values())
        by_patient = {}
        for s, p in patient_of.items():
            by_patient.setdefault(p, []).append(s)
        pst = {p: min((strata[s] for s in ss), key=lambda x: (freq[x], x)) for p, ss in by_patient.items()}
        r, want = np.random.default_rng(seed), {}
        for st in sorted(set(pst.values())):
            ps = sorted(p for p in pst if pst[p] == st)
            r.shuffle(ps)
            n = len(ps)
            exact = [f * n for f in frac.values()]
            counts = [int(np.floor(x)) for x in exact]
            for i in sorted(range(3), key=lambda i: -(exact[i] - counts[i]))[: n - sum(counts)]:
                counts[i] += 1
            start = 0
            for name, c in zip(frac, counts):
                for p in ps[start:start + c]:
                    for s in by_patient[p]:
                        want[s] = name
                start += c
        assert got == want
        store = BuildStore(tmp_path / f"b{seed}.sqlite")
        for s in patient_of:
            store.add_row(s, {"study_id": s, "patient_id": "x" + patient_of[s], "report": ""}, patient_of[s],
                          strata[s])
        _assign_stored(store, frac, seed)
        assert {k: row["split"] for k, row, _ in store.rows()} == got
        n_patients, by_split = store.patient_counts()
        assert n_patients == len(by_patient)
        assert by_split == dict(Counter(got[ss[0]] for ss in by_patient.values()))
        store.close()


def test_build_from_synthetic_export(small_export, tmp_path):
    s = _build(small_export, tmp_path / "c")
    rows, info = read_cohort(tmp_path / "c")
    truth = _rows(small_export / "truth.csv")
    assert len(rows) == s.n_studies == 60 == info["counts"]["studies"]
    assert sum(r["image_present"] for r in rows) == sum(int(t["has_image"]) for t in truth)
    assert sum(r["report_present"] for r in rows) == sum(int(t["has_report"]) for t in truth)
    assert info["missingness"]["report_only"] == sum(1 for r in rows if not r["image_present"])
    # frontal views only: lateral images are never selected
    import pydicom

    for r in rows:
        for p in r["image_paths"]:
            assert pydicom.dcmread(p, stop_before_pixels=True).ViewPosition in ("PA", "AP")
    # studies of one patient (report-only ones joined by the labels' PatientID) share a split
    by_patient = {}
    for r in rows:
        assert by_patient.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert info["counts"]["studies_without_patient_id"] == 0
    # labels carried through
    key_map = {k: v for k, v in (line.split(",") for line in (tmp_path / "c/private/key_map.csv").read_text().split()[1:])}
    y = {t["StudyInstanceUID"]: int(t["y_pneumonia"]) for t in truth}
    assert all(r["label"] == y[key_map[r["study_id"]]] for r in rows)
    _assert_recount_matches_build(rows, info)


def _assert_recount_matches_build(rows: list[dict], info: dict) -> None:
    """`recount` (derived cohorts) on the build's own rows gives the build's counts; a dropped row changes them."""
    import copy

    from clinfuse.data.cohort import recount

    again = copy.deepcopy(info)
    again["splits"] = again["missingness"] = None
    recount(again, rows)
    for k in ("splits", "missingness", "counts"):
        assert again[k] == info[k], k
    fewer = copy.deepcopy(info)
    recount(fewer, rows[1:])
    assert fewer["counts"]["studies"] == info["counts"]["studies"] - 1
    assert fewer["splits"][rows[0]["split"]]["studies"] == info["splits"][rows[0]["split"]]["studies"] - 1


def test_no_identifier_in_cohort_json_or_csv_fields(small_export, tmp_path):
    _build(small_export, tmp_path / "c")
    ids = json.loads((tmp_path / "c/private/identifiers.json").read_text())
    secrets = {v for values in ids.values() for v in values if len(v) >= 6}
    assert any("^" in v for v in secrets) and ids["birth_date"] and ids["accession"]
    blob = (tmp_path / "c/cohort.json").read_text()
    csv_fields = "\n".join(
        ",".join(v for k, v in r.items() if k != "image_paths") for r in _rows(tmp_path / "c/cohort.csv"))
    for s in secrets:
        assert s not in blob and s not in csv_fields


def test_quarantine_names_everything_and_loses_nothing_else(small_export, tmp_path):
    exp = tmp_path / "export"
    shutil.copytree(small_export, exp)
    bad = exp / "dicom" / "junk"
    bad.mkdir()
    (bad / "zero.dcm").write_bytes(b"")
    (bad / "notes.dcm").write_text("not an image")
    good = sorted((exp / "dicom").rglob("*.dcm"))
    import pydicom

    frontal = next(p for p in good if pydicom.dcmread(p, stop_before_pixels=True).get("ViewPosition") in ("PA", "AP"))
    frontal.write_bytes(frontal.read_bytes()[:-500])  # truncated pixel data in a real study
    labels = _rows(exp / "labels.csv")
    dropped = labels.pop(5)  # a study with no label
    labels.append({"StudyInstanceUID": "9.9.9", "PatientID": "X", "label": "1"})  # label with nothing to join
    labels.append({**labels[0], "label": str(1 - int(labels[0]["label"]))})  # conflicting duplicate
    with open(exp / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(labels[0]))
        w.writeheader()
        w.writerows(labels)
    reports = _rows(exp / "reports.csv")
    reports.append({"StudyInstanceUID": reports[1]["StudyInstanceUID"], "report": "FINDINGS: different text."})
    with open(exp / "reports.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["StudyInstanceUID", "report"])
        w.writeheader()
        w.writerows(reports)

    s = _build(exp, tmp_path / "c")
    q = _rows(tmp_path / "c/quarantine.csv")
    reasons = {(r["kind"], r["reason"].split(" (")[0].split(":")[0]) for r in q}
    assert ("dicom", "empty file") in reasons
    assert ("dicom", "not a DICOM file") in reasons
    assert ("dicom", "truncated pixel data") in reasons
    assert ("label", "conflicting duplicate label for this key") in reasons
    assert ("label", "no image and no report for this StudyInstanceUID") in reasons
    assert ("report", "conflicting duplicate report for this key") in reasons
    assert any(r["source"] == str(frontal) for r in q)
    # every labelled study other than the two set aside is still in the cohort
    assert s.n_studies == 60 - 2, [r for r in q]
    rows, info = read_cohort(tmp_path / "c")
    assert info["counts"]["quarantined"] == len(q)
    assert dropped["StudyInstanceUID"] not in (tmp_path / "c/private/key_map.csv").read_text()


def test_fingerprint_changes_with_any_input_and_only_then(small_export, tmp_path):
    exp = tmp_path / "export"
    shutil.copytree(small_export, exp)
    fp = lambda d: json.loads((d / "cohort.json").read_text())["fingerprint"]["sha256"]  # noqa: E731
    _build(exp, tmp_path / "a")
    _build(exp, tmp_path / "b")
    assert fp(tmp_path / "a") == fp(tmp_path / "b")
    f = sorted((exp / "dicom").rglob("*.dcm"))[0]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1  # one pixel bit
    f.write_bytes(bytes(data))
    _build(exp, tmp_path / "c")
    assert fp(tmp_path / "c") != fp(tmp_path / "a")
    (exp / "labels.csv").write_text((exp / "labels.csv").read_text().replace(",0\n", ",1\n", 1))
    _build(exp, tmp_path / "d")
    assert fp(tmp_path / "d") not in (fp(tmp_path / "a"), fp(tmp_path / "c"))


def test_pseudonyms_stable_with_salt_and_splits_independent_of_it(small_export, tmp_path, monkeypatch):
    monkeypatch.setenv("CLINFUSE_SALT", "one")
    _build(small_export, tmp_path / "a")
    _build(small_export, tmp_path / "b")
    monkeypatch.setenv("CLINFUSE_SALT", "two")
    _build(small_export, tmp_path / "c")
    a, b, c = (read_cohort(tmp_path / x)[0] for x in "abc")
    assert [r["study_id"] for r in a] == [r["study_id"] for r in b]
    assert {r["study_id"] for r in a}.isdisjoint({r["study_id"] for r in c})
    assert sorted(r["split"] for r in a) == sorted(r["split"] for r in c)


def test_accession_key_multilabel_and_image_only(tmp_path):
    exp = tmp_path / "e"
    synthesize(exp, SynthSpec(studies=30, seed=1, size=40, task="multilabel", key="AccessionNumber"), progress=False)
    cfg = config_from_dict({"cohort": {"key": "AccessionNumber",
                                       "labels": {"task": "multilabel", "columns": ["pneumonia", "effusion", "nodule"]}}})
    s = build_cohort(exp / "dicom", None, exp / "labels.csv", tmp_path / "c", cfg, progress=False)
    rows, info = read_cohort(tmp_path / "c")
    assert info["task"] == "multilabel" and set(info["splits"]["train"]["prevalence"]) == {"pneumonia", "effusion", "nodule"}
    assert all(r["report_present"] is False for r in rows)
    n_img = sum(1 for line in _rows(exp / "truth.csv") if line["has_image"] == "1")
    assert s.n_studies == n_img  # labelled studies with no image and no report are set aside
    _assert_recount_matches_build(rows, info)


def test_wholly_unusable_inputs_stop_at_once(small_export, tmp_path):
    with pytest.raises(CohortInputError, match="no DICOM found"):
        build_cohort(tmp_path, None, small_export / "labels.csv", tmp_path / "c", progress=False)
    with pytest.raises(CohortInputError, match="DICOM folder not found"):
        build_cohort(tmp_path / "nope", None, small_export / "labels.csv", tmp_path / "c", progress=False)
    cfg = config_from_dict({"cohort": {"key": "AccessionNumber"}})
    with pytest.raises(CohortInputError, match="key column 'AccessionNumber' not found"):
        _build(small_export, tmp_path / "c", cfg)
    with pytest.raises(CohortInputError, match="not a cohort folder"):
        read_cohort(tmp_path)


def test_the_build_scratch_store_is_removed_after_a_build_and_after_a_failed_one(small_export, tmp_path):
    _build(small_export, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c/private").iterdir()) == ["identifiers.json", "key_map.csv", "salt"]
    labels = tmp_path / "labels.csv"  # labels that join no study: the build stops after the scan
    header = (small_export / "labels.csv").read_text().splitlines()[0]
    labels.write_text(header + "\n" + ",".join(["9.9.9"] + ["1"] * header.count(",")) + "\n")
    with pytest.raises(CohortInputError, match="no study could be joined"):
        build_cohort(small_export / "dicom", None, labels, tmp_path / "d", progress=False)
    assert not list((tmp_path / "d/private").glob(".build.*"))
    assert not (tmp_path / "d/quarantine.csv").exists()


@pytest.mark.shared
def test_ct_series_becomes_one_3d_study(tmp_path):
    from ..conftest import shared_dicom_dir

    src = shared_dicom_dir() / "pydicom" / "series_pcir_CT2"
    import pydicom

    uid = pydicom.dcmread(next(src.iterdir()), stop_before_pixels=True).StudyInstanceUID
    (tmp_path / "labels.csv").write_text(f"StudyInstanceUID,label\n{uid},1\n")
    cfg = config_from_dict({"cohort": {"dicom": {"modalities": ["CT"]}, "split": {"train": 1.0, "val": 0.0, "test": 0.0}}})
    build_cohort(src, None, tmp_path / "labels.csv", tmp_path / "c", cfg, progress=False)
    rows, info = read_cohort(tmp_path / "c")
    assert len(rows) == 1 and rows[0]["kind"] == "3d" and rows[0]["n_images"] == 4 and rows[0]["modality"] == "CT"
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in rows[0]["image_paths"]]
    assert z == sorted(z)


@pytest.mark.shared
def test_shared_dicom_folder_builds_with_every_bad_file_named(tmp_path):
    """The 40 real files as an 'export': nothing crashes; each unusable file is in quarantine.csv."""
    from ..conftest import shared_dicom_dir

    src = shared_dicom_dir()
    import pydicom

    uids = set()
    for p in src.rglob("*"):
        if p.is_file() and p.name != "index.csv":
            try:
                uids.add(pydicom.dcmread(p, stop_before_pixels=True, force=True).StudyInstanceUID)
            except Exception:  # noqa: BLE001 - broken on purpose
                pass
    (tmp_path / "labels.csv").write_text("StudyInstanceUID,label\n" + "".join(f"{u},1\n" for u in sorted(uids)))
    cfg = config_from_dict({"cohort": {"dicom": {"modalities": ["CR", "DX", "CT", "MR"]}}})
    s = build_cohort(src, None, tmp_path / "labels.csv", tmp_path / "c", cfg, progress=False)
    q = _rows(tmp_path / "c/quarantine.csv")
    sources = {r["source"] for r in q}
    assert str(src / "pydicom/MR_truncated.dcm") in sources
    assert str(src / "pydicom/no_meta.dcm") in sources
    assert s.n_studies >= 10
    assert all(r["reason"] for r in q)


def test_a_file_name_that_is_not_utf8_is_read_and_its_path_kept(tmp_path):
    """PACS exports from older systems carry Latin-1 file names; the build must neither crash on nor lose
    them, and the path written to cohort.csv must open the same file again."""
    import os

    import pydicom

    from clinfuse.data.dicom import read_dicom

    exp = tmp_path / "e"
    synthesize(exp, SynthSpec(studies=12, seed=1, size=32, lateral=0), progress=False)
    f = next(p for p in sorted((exp / "dicom").rglob("*.dcm")) if _readable(p))
    uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
    renamed = os.fsencode(f.parent) + b"/r\xe9sultat-\xff.dcm"
    os.rename(os.fsencode(f), renamed)
    _build(exp, tmp_path / "c")
    rows, _ = read_cohort(tmp_path / "c")
    key_map = dict(line.split(",") for line in (tmp_path / "c/private/key_map.csv").read_text().split()[1:])
    row = next(r for r in rows if key_map[r["study_id"]] == uid)
    assert os.path.realpath(renamed) in [os.fsencode(p) for p in row["image_paths"]]
    assert read_dicom(os.fsdecode(os.path.realpath(renamed))).pixels.size > 0


def _readable(path) -> bool:
    import pydicom

    try:
        pydicom.dcmread(path).pixel_array
        return True
    except Exception:  # noqa: BLE001 - the export's broken files
        return False


def test_a_pseudonym_collision_stops_the_build_with_the_fix(tmp_path, monkeypatch):
    """Pseudonyms are 12 hex digits of a salted hash: two studies (or patients) may, by rare chance, get the
    same one, which would merge them downstream. The build checks and says how to draw a new salt."""
    import hashlib
    import hmac

    from clinfuse.data import cohort as cohort_mod

    labels, reports = tmp_path / "l.csv", tmp_path / "r.csv"
    labels.write_text("StudyInstanceUID,label,PatientID\n" + "".join(f"s{i},{i % 2},P{i}\n" for i in range(40)))
    reports.write_text("StudyInstanceUID,report\n" + "".join(f"s{i},FINDINGS: ok\n" for i in range(40)))
    cfg = config_from_dict({"cohort": {"labels": {"patient_column": "PatientID"}}}).cohort
    monkeypatch.delenv("CLINFUSE_SALT", raising=False)
    build_cohort(None, reports, labels, tmp_path / "ok", cfg, progress=False)  # 12 digits: no collision
    monkeypatch.setattr(cohort_mod, "_pseudonym", lambda salt, prefix, value: prefix + hmac.new(
        salt, f"{prefix}{value}".encode(), hashlib.sha256).hexdigest()[:1])  # 16 values for 40 studies
    with pytest.raises(CohortInputError, match=r"pseudonym\(s\) stand for more than one study or patient.*"
                                               r"delete .*private/salt to draw a new salt"):
        build_cohort(None, reports, labels, tmp_path / "c", cfg, progress=False)
    assert not (tmp_path / "c" / "cohort.csv").exists() and not (tmp_path / "c" / "cohort.json").exists()
    monkeypatch.setenv("CLINFUSE_SALT", "x")
    with pytest.raises(CohortInputError, match="set another CLINFUSE_SALT"):
        build_cohort(None, reports, labels, tmp_path / "c", cfg, progress=False)
    monkeypatch.undo()
    full = cohort_mod._pseudonym
    monkeypatch.setattr(cohort_mod, "_pseudonym", lambda salt, prefix, value: full(salt, prefix, value)[
        : 3 if prefix == "p-" else None])  # patients alone collide
    with pytest.raises(CohortInputError, match=r"\d+ pseudonym\(s\) stand for more than one"):
        build_cohort(None, reports, labels, tmp_path / "c", cfg, progress=False)


def test_a_killed_builds_leftovers_are_removed_by_the_next_build(tmp_path):
    """A build killed hard leaves its scratch store (identifiers) in private/ and its temporary outputs
    under names with its pid; the next build of the folder deletes those of processes no longer running
    and keeps those of a live one."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    labels, reports = tmp_path / "l.csv", tmp_path / "r.csv"
    labels.write_text("StudyInstanceUID,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(10)))
    reports.write_text("StudyInstanceUID,report\n" + "".join(f"s{i},FINDINGS: ok\n" for i in range(10)))
    out = tmp_path / "c"
    (out / "private").mkdir(parents=True)
    stale = [out / "private" / f".build.{dead}.sqlite", out / f".cohort.csv.{dead}.tmp",
             out / f".quarantine.csv.{dead}.tmp"]
    live = out / "private" / f".build.{os.getppid()}.sqlite"  # the test runner's parent: alive
    for f in [*stale, live]:
        f.write_text("left behind")
    build_cohort(None, reports, labels, out, progress=False)
    assert not any(f.exists() for f in stale) and live.exists()
    assert sorted(p.name for p in (out / "private").iterdir()) == [live.name, "identifiers.json", "key_map.csv",
                                                                     "salt"]


def test_a_modality_set_aside_is_named_in_quarantine_csv_not_in_cohort_json(tmp_path):
    """The reason kind that cohort.json counts carries no header value: a file whose Modality holds
    something odd (here a name) is set aside with that value in quarantine.csv only."""
    import pydicom

    exp = tmp_path / "e"
    synthesize(exp, SynthSpec(studies=12, seed=3, size=32, lateral=0), progress=False)
    odd = sorted((exp / "dicom").rglob("*.dcm"))[:2]
    for p in odd:
        ds = pydicom.dcmread(p)
        ds.Modality = "ZORBLAXQUINN"
        ds.save_as(p)
    s = _build(exp, tmp_path / "c")
    q = [r for r in _rows(tmp_path / "c/quarantine.csv") if "ZORBLAXQUINN" in r["reason"]]
    assert sorted(r["source"] for r in q) == sorted(map(str, odd))
    assert "modality not in cohort.dicom.modalities" in q[0]["reason"]
    text = (tmp_path / "c/cohort.json").read_text()
    assert "ZORBLAXQUINN" not in text.upper()
    assert s.info["quarantine_reasons"][f"dicom: modality not in cohort.dicom.modalities {['CR', 'DX']}"] == 2
