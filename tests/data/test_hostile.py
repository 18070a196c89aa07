"""Hostile inputs (the hardening issue): every one is set aside or refused with the file and the reason,
and the rest of the build goes on."""

from __future__ import annotations

import csv
import json
import os

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from clinfuse.config import ConfigError, config_from_dict, load_config
from clinfuse.data.cohort import build_cohort, read_cohort
from clinfuse.data.quarantine import CohortInputError
from clinfuse.data.reports import load_reports
from clinfuse.data.synth import SynthSpec, synthesize

from ..conftest import REPO


def _mutate(f, **values):
    """Set header values, invalid ones too: a string is written as the element's raw bytes (pydicom
    itself refuses to write 'abc' as a DS)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(f)
    for k, v in values.items():
        if isinstance(v, str):
            t = Tag(tag_for_keyword(k))
            raw = (v + " " * (len(v) % 2)).encode()
            ds._dict[t] = RawDataElement(t, dictionary_VR(t), len(raw), raw, 0, False, True)
        else:
            setattr(ds, k, v)
    ds.save_as(f)


@pytest.fixture(scope="module")
def hostile_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    synthesize(d / "e", SynthSpec(studies=40, seed=9, size=40, lateral=0, missing_image=0), progress=False)
    files = sorted((d / "e" / "dicom").rglob("*.dcm"))
    bad = {}
    edits = [("RescaleSlope", "abc"), ("WindowCenter", "abc"), ("WindowWidth", "0"), ("PixelSpacing", ["0.5"]),
             ("RescaleSlope", "1e39")]
    for i, (k, v) in enumerate(edits):
        with _quiet():
            _mutate(files[i], **{k: v})
        bad[str(files[i])] = f"{k}={v}"
    ds = pydicom.dcmread(files[5])
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"  # not a transfer syntax
    ds.save_as(files[5], enforce_file_format=False)
    bad[str(files[5])] = "unknown transfer syntax"
    ds = pydicom.dcmread(files[6])
    ds.VOILUTSequence = Sequence([Dataset()])
    ds.save_as(files[6])
    bad[str(files[6])] = "empty VOI LUT item"
    fifo = d / "e" / "dicom" / "pipe.dcm"
    os.mkfifo(fifo)
    bad[str(fifo)] = "FIFO"
    study_dir = files[7].parent
    (d / "elsewhere").mkdir()
    os.replace(study_dir, d / "elsewhere" / study_dir.name)
    os.symlink(d / "elsewhere" / study_dir.name, study_dir)
    bad[str(study_dir)] = "symlinked folder"
    return d, bad


class _quiet:
    def __enter__(self):
        import warnings

        self.w = warnings.catch_warnings()
        self.w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        return self.w.__exit__(*a)


def test_hostile_files_are_set_aside_with_reasons_and_the_build_goes_on(hostile_export, tmp_path):
    d, bad = hostile_export
    cfg = load_config(REPO / "configs" / "tiny.yaml")  # voi: file, so the window values are used
    s = build_cohort(d / "e/dicom", d / "e/reports.csv", d / "e/labels.csv", tmp_path / "c", cfg, progress=False)
    with open(tmp_path / "c" / "quarantine.csv", newline="") as f:
        q = {r["source"]: r["reason"] for r in csv.DictReader(f)}
    missing = [f"{what} ({src})" for src, what in bad.items() if src not in q]
    assert not missing, f"not set aside: {missing}; quarantine: {q}"
    assert all(q[src] for src in bad)
    assert "symbolic link" in q[[s for s, w in bad.items() if w == "symlinked folder"][0]]
    assert "not a regular file" in q[[s for s, w in bad.items() if w == "FIFO"][0]]
    assert "non-finite" in q[[s for s, w in bad.items() if w == "RescaleSlope=1e39"][0]]
    rows, info = read_cohort(tmp_path / "c")
    assert s.n_studies == len(rows) > 25  # the other studies are all there
    # a study whose only image was set aside keeps its report, and says why in the quarantine
    used = {p for r in rows for p in r["image_paths"]}
    assert not used & set(bad)


def test_oversized_files_are_refused_unread(hostile_export, tmp_path):
    d, _ = hostile_export
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["cohort.dicom.max_file_mb=0.001"])
    with pytest.raises(CohortInputError, match="no DICOM found"):
        build_cohort(d / "e/dicom", None, d / "e/labels.csv", tmp_path / "c", cfg, progress=False)


def test_report_files_of_every_bad_shape(tmp_path):
    cfg = load_config(None).cohort.reports
    big = tmp_path / "big.csv"
    with open(big, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "report"])
        w.writerow(["1.2.3", "FINDINGS: " + "clear " * 900_000])  # 5 MB in one cell
        w.writerow(["1.2.4", "FINDINGS: small effusion."])
    t = load_reports(big, "StudyInstanceUID", cfg)
    assert set(t.reports) == {"1.2.3", "1.2.4"}
    jl = tmp_path / "r.jsonl"
    jl.write_text("null\n[1, 2]\n" + json.dumps({"StudyInstanceUID": "9", "report": 5}) + "\n"
                  + json.dumps({"StudyInstanceUID": "7", "report": "FINDINGS: clear."}) + "\n")
    t = load_reports(jl, "StudyInstanceUID", cfg)
    assert set(t.reports) == {"7"} and len(t.quarantine) == 3
    assert any("null" in q.reason for q in t.quarantine) and any("list" in q.reason for q in t.quarantine)
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "1.2.3.txt").write_text("FINDINGS: clear.")
    (folder / "odd.txt").mkdir()
    os.symlink(tmp_path / "nowhere", folder / "gone.txt")
    t = load_reports(folder, "StudyInstanceUID", cfg)
    assert set(t.reports) == {"1.2.3"}
    reasons = {os.path.basename(q.source): q.reason for q in t.quarantine}
    assert "folder" in reasons["odd.txt"] and "dangling link" in reasons["gone.txt"]


def test_an_all_empty_label_column_says_so(tmp_path, small_export):
    labels = tmp_path / "labels.csv"
    with open(small_export / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(labels, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "label": ""} for r in rows)
    with pytest.raises(CohortInputError, match=rf"none of its {len(rows)} label rows is usable \({len(rows)}x missing "
                       "label in column 'label'\)"):
        build_cohort(small_export / "dicom", None, labels, tmp_path / "c", progress=False)


def test_the_loaders_write_what_they_set_aside_in_file_order(tmp_path):
    """Labels, reports and variables each give the build's quarantine file their bad rows as they read them
    (none held until the end): labels first, then reports, then variables, each in row order."""
    from clinfuse.config import CohortConfig

    labels, reports, variables = tmp_path / "l.csv", tmp_path / "r.csv", tmp_path / "v.csv"
    labels.write_text("StudyInstanceUID,label\n" + "".join(f"s{i},{'?' if i % 4 == 0 else i % 2}\n" for i in range(40)))
    reports.write_text("StudyInstanceUID,report\n" + "".join(f"s{i},{'' if i % 5 == 0 else 'FINDINGS: ok'}\n"
                                                          for i in range(40)))
    variables.write_text("StudyInstanceUID,age\n" + "".join(f"s{i},{'x' if i % 6 == 0 else 50}\n" for i in range(40)))
    s = build_cohort(None, reports, labels, tmp_path / "c", CohortConfig(variables={"numeric": {"age": {}}}),
                     progress=False, variables=variables)
    with open(tmp_path / "c" / "quarantine.csv", newline="") as f:
        q = list(csv.DictReader(f))
    first = [(r["kind"], int(r["source"].rsplit("row ", 1)[1])) for r in q[:25]]  # the loaders' entries
    assert first == ([("label", i + 2) for i in range(0, 40, 4)] + [("report", i + 2) for i in range(0, 40, 5)]
                     + [("variable", i + 2) for i in range(0, 40, 6)])
    assert all(r["reason"] != "" for r in q) and len(q) > 25  # then the join's own entries
    assert s.n_quarantined == len(q)


@pytest.mark.parametrize("size", [[0, 0], [-32, 32], [32], [5000, 5000]])
def test_image_sizes_that_cannot_work_are_refused_by_the_config(size):
    with pytest.raises(ConfigError, match="image_size"):
        config_from_dict({"data": {"image_size": size}})


def test_an_unwritable_out_is_one_line(tmp_path, small_export):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("x")
    with pytest.raises(CohortInputError, match="cannot write the cohort folder"):
        build_cohort(small_export / "dicom", None, small_export / "labels.csv", ro / "file" / "c", progress=False)


def test_a_cohort_edited_or_left_half_written_is_refused(small_export, tmp_path):
    build_cohort(small_export / "dicom", small_export / "reports.csv", small_export / "labels.csv", tmp_path / "c",
                 progress=False)
    read_cohort(tmp_path / "c")
    f = tmp_path / "c" / "cohort.csv"
    f.write_text(f.read_text().replace(",0\n", ",1\n", 1))  # one label changed behind the build's back
    with pytest.raises(CohortInputError, match="does not match cohort.json"):
        read_cohort(tmp_path / "c")
    (tmp_path / "c" / "cohort.json").unlink()  # what a rebuild killed while writing leaves
    with pytest.raises(CohortInputError, match="did not finish"):
        read_cohort(tmp_path / "c")


def _rle_file() -> bytes:
    """A synthetic 128x128 16-bit image, RLE Lossless (pydicom's own encoder)."""
    import io

    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # a fixed UID, so that every run of the panic test mutates the same bytes (generate_uid() varies in
    # length, which moved them); every UID length from 20 to 64 passes it, checked once
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", "1.2.826.0.1.3680043.8.498.1", "CR"
    ds.Rows = ds.Columns = 128
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    img = (np.random.default_rng(0).integers(0, 4096, (128, 128)) // 64 * 64).astype(np.uint16)
    ds.PixelData = img.tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_decoder_that_panics_is_a_read_error_not_a_crash():
    """Found by the fuzzer (tests/data/fuzz_dicom.py): one byte changed inside an RLE segment makes
    pylibjpeg-rle's Rust decoder panic, and pyo3 raises PanicException, a BaseException that
    `except Exception` lets through; it stopped a whole cohort build. Every such mutation must now be
    a DicomReadError with a reason (or a readable image)."""
    import io

    from clinfuse.data.dicom import DicomReadError, read_dicom

    data = _rle_file()
    start = data.find(b"\xe0\x7f\x10\x00")  # Pixel Data
    panics = errors = 0
    for off in range(start + 40, len(data), 7):
        for delta in (-1, 1):
            m = bytearray(data)
            m[off] = (m[off] + delta) % 256
            try:
                pydicom.dcmread(io.BytesIO(bytes(m))).pixel_array  # noqa: B018 - the raw decoder, unguarded
            except BaseException as e:  # noqa: BLE001
                panics += type(e).__name__ == "PanicException"
            try:
                read_dicom("mutated.dcm", data=bytes(m))
            except DicomReadError as e:
                errors += 1
                assert "mutated.dcm" in str(e)
        if panics >= 3:
            break
    assert errors >= 1, "no mutation was refused: the test no longer exercises the decoder's failures"


def test_odd_entries_in_a_reports_folder_do_not_stop_the_build_or_change_the_fingerprint(tmp_path):
    """A folder or dangling link named *.txt is set aside by the reports loader and the build goes on: the
    fingerprint is fed the bytes each loader parsed (read once), so it equals the clean folder's. The
    fingerprint of a reports file is the same digest as before the loaders fed it (a known value)."""
    import hashlib

    labels = tmp_path / "labels.csv"
    labels.write_text("StudyInstanceUID,label\n1.2.3,1\n1.2.4,0\n")
    fps = []
    for name, odd in (("clean", False), ("odd", True)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "1.2.3.txt").write_text("FINDINGS: small effusion.")
        (folder / "1.2.4.txt").write_text("FINDINGS: clear.")
        if odd:
            (folder / "odd.txt").mkdir()
            os.symlink(tmp_path / "nowhere", folder / "gone.txt")
        build_cohort(None, folder, labels, tmp_path / f"c-{name}", progress=False)
        fps.append(json.loads((tmp_path / f"c-{name}" / "cohort.json").read_text())["fingerprint"]["sha256"])
    assert fps[0] == fps[1]
    q = {os.path.basename(r["source"]) for r in csv.DictReader(open(tmp_path / "c-odd" / "quarantine.csv"))}
    assert {"odd.txt", "gone.txt"} <= q
    # a single reports file: labels then reports, each tagged, as the fingerprint was computed before
    reports = tmp_path / "reports.csv"
    reports.write_text("StudyInstanceUID,report\n1.2.3,FINDINGS: small effusion.\n1.2.4,FINDINGS: clear.\n")
    build_cohort(None, reports, labels, tmp_path / "c-file", progress=False)
    want = hashlib.sha256(b"labels\0" + labels.read_bytes() + b"report\0" + reports.read_bytes()).hexdigest()
    info = json.loads((tmp_path / "c-file" / "cohort.json").read_text())
    assert info["fingerprint"]["sha256"] == want


def test_a_labels_file_of_bad_rows_is_not_held_in_memory(tmp_path):
    """30,000 bad label rows: their quarantine entries go to quarantine.csv as they are read. Held in a list
    until the end (as before) they took about 10 MiB of traced memory (330 bytes each); now the whole build
    peaks near 1.5 MiB."""
    import tracemalloc

    (tmp_path / "l.csv").write_text("StudyInstanceUID,label\n" + "".join(
        f"s{i},{'?' if i >= 20 else i % 2}\n" for i in range(30000)))
    (tmp_path / "r.csv").write_text("StudyInstanceUID,report\n" + "".join(f"s{i},FINDINGS: ok\n" for i in range(20)))
    tracemalloc.start()
    try:
        s = build_cohort(None, tmp_path / "r.csv", tmp_path / "l.csv", tmp_path / "c", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.n_studies == 20 and s.n_quarantined == 29980
    assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MiB traced"
