"""The reading processes of the cohort build: every file bounded in time and memory, a crash costs one
file, both cores used (clinfuse.data.workers)."""

from __future__ import annotations

import time

import pydicom
import pytest

from clinfuse.config import CohortConfig
from clinfuse.data.cohort import build_cohort
from clinfuse.data.dicom import DicomReadError, check_dicom, read_dicom
from clinfuse.data.workers import BoundedPool, Failed

T = "tests.data.pool_targets:"


def run(pool: BoundedPool, tasks, seconds=None) -> dict:
    out = dict(pool.map(tasks, seconds))
    assert sorted(out) == list(range(len(tasks)))
    return out


def test_every_task_comes_back_and_a_failure_costs_only_its_own():
    pool = BoundedPool(T + "echo", workers=2)
    try:
        assert run(pool, [(i,) for i in range(50)]) == {i: i for i in range(50)}
    finally:
        pool.close()
    pool = BoundedPool(T + "fail", workers=2)
    try:
        out = run(pool, [("bad value 'abc'",), ("second",)])
        assert out[0] == Failed("ValueError: bad value 'abc'") and out[1] == Failed("ValueError: second")
    finally:
        pool.close()


def test_a_task_past_its_deadline_is_killed_and_the_rest_go_on():
    pool = BoundedPool(T + "sleep", workers=2)
    try:
        t = time.monotonic()
        out = run(pool, [(30,), (0,), (0,), (0,)], seconds=1.0)
        assert time.monotonic() - t < 10
        assert isinstance(out[0], Failed) and "longer than 1 s" in out[0].reason
        assert [out[i] for i in (1, 2, 3)] == ["woke"] * 3
        assert run(pool, [(0,)], seconds=1.0) == {0: "woke"}  # the pool still serves
    finally:
        pool.close()


def test_a_worker_that_crashes_costs_one_task_and_is_replaced():
    pool = BoundedPool(T + "segfault", workers=1)
    try:
        out = run(pool, [(), ()])
        assert all(isinstance(r, Failed) and "died (killed by SIGSEGV)" in r.reason for r in out.values())
    finally:
        pool.close()


def test_a_worker_that_needs_too_much_memory_fails_its_task_only():
    pool = BoundedPool(T + "hog", workers=1, memory_mb=600)
    try:
        out = run(pool, [(2000,), (10,)])
        assert isinstance(out[0], Failed) and "600 MB" in out[0].reason
        assert out[1] == 10 * 2**20
    finally:
        pool.close()


def test_two_workers_share_the_work():
    pool = BoundedPool(T + "pid_after", workers=2)
    try:
        pids = set(run(pool, [(0.3,)] * 4).values())
        assert len(pids) == 2
    finally:
        pool.close()


def test_tasks_are_taken_as_workers_free_up_not_all_at_once():
    taken = []

    def tasks():
        for i in range(40):
            taken.append(i)
            yield (i,)

    pool = BoundedPool(T + "echo", workers=2)
    try:
        it = pool.map(tasks())
        first = next(it)
        assert len(taken) <= 2 + 1, f"{len(taken)} of 40 tasks taken before the first result"
        out = dict([first, *it])
        assert out == {i: i for i in range(40)} and len(taken) == 40
    finally:
        pool.close()


def test_abandoning_a_map_stops_its_busy_workers():
    pool = BoundedPool(T + "sleep", workers=2)
    it = pool.map([(0,), (60,), (60,)])
    next(it)
    busy = [w for w in pool._idle]  # nothing idle while the map runs
    it.close()  # what Ctrl-C or an exception in the caller does
    assert busy == [] and all(w.task is None for w in pool._idle)
    pool.close()


# --------------------------------------------------------------------------- the cohort build


def _slow_jpegls(path, side: int = 20000) -> None:
    """A JPEG-LS file whose frame header claims side x side pixels: the decoder works for seconds (and
    allocates side**2 * 2 bytes) before failing. Fuzzing found such a file; this one is made by hand."""
    from pydicom.uid import JPEGLSLossless

    ds = pydicom.dcmread(path)
    ds.compress(JPEGLSLossless)
    ds.save_as(path)
    data = bytearray(path.read_bytes())
    sof = data.find(b"\xff\xf7")  # JPEG-LS start of frame: length(2) precision(1) rows(2) cols(2)
    data[sof + 5: sof + 9] = side.to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))


@pytest.fixture()
def slow_export(tmp_path):
    from clinfuse.data.synth import SynthSpec, synthesize

    synthesize(tmp_path, SynthSpec(studies=8, size=64, seed=3, lateral=0, missing_image=0), progress=False)
    victim = sorted((tmp_path / "dicom").rglob("*.dcm"))[0]
    _slow_jpegls(victim)
    return tmp_path, victim


def _build(export, out, **dicom):
    d, _ = export
    return build_cohort(d / "dicom", d / "reports.csv", d / "labels.csv", out, CohortConfig(dicom=dicom),
                        progress=False)


def _quarantined(out) -> dict[str, str]:
    import csv

    with open(out / "quarantine.csv", newline="") as f:
        return {r["source"]: r["reason"] for r in csv.DictReader(f)}


def test_a_file_that_keeps_the_decoder_busy_is_set_aside_at_the_deadline(slow_export, tmp_path):
    t = time.monotonic()
    s = _build(slow_export, tmp_path / "c", max_seconds_per_file=1)
    assert time.monotonic() - t < 30
    q = _quarantined(tmp_path / "c")
    assert "longer than 1 s (cohort.dicom.max_seconds_per_file)" in q[str(slow_export[1])]
    assert s.n_studies == 8 and s.info["counts"]["images"] == 7  # its study kept its report; nothing else lost


def test_a_file_whose_decoding_needs_too_much_memory_is_set_aside(slow_export, tmp_path):
    s = _build(slow_export, tmp_path / "c", max_worker_mb=600)  # the decoder asks for 20000**2 * 2 bytes
    reason = _quarantined(tmp_path / "c")[str(slow_export[1])]
    assert "died" in reason or "memory" in reason, reason
    assert s.info["counts"]["images"] == 7


def test_check_dicom_agrees_with_read_dicom_on_bad_header_values(tmp_path):
    """The build's cheap check (transforms on each frame's extremes) and the full read give the same verdict
    and reason, on every header edit the hostile tester used (test_properties covers random mutations)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from clinfuse.data.synth import SynthSpec, synthesize

    synthesize(tmp_path, SynthSpec(studies=2, size=32, seed=1, lateral=0, missing_image=0, monochrome1=0.5),
               progress=False)
    src = sorted((tmp_path / "dicom").rglob("*.dcm"))[0]
    edits = [("RescaleSlope", b"abc "), ("RescaleSlope", b"nan "), ("RescaleSlope", b"1e39"),
             ("RescaleIntercept", b"-1024.37"), ("RescaleSlope", b"0.0123"), ("WindowCenter", b"abc "),
             ("WindowWidth", b"0 "), ("WindowCenter", b"inf "), (None, None)]
    n = 0
    for kw, raw in edits:
        ds = pydicom.dcmread(src)
        if kw:
            tag = Tag(kw)
            ds[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)
            if kw.startswith("Window") and "WindowWidth" not in ds:
                ds.WindowCenter, ds.WindowWidth = 2000, 4000
        f = tmp_path / f"edit{n}.dcm"
        n += 1
        ds.save_as(f)
        for voi in ("none", "file"):
            try:
                read_dicom(f, voi=voi)
                full = None
            except DicomReadError as e:
                full = e.reason
            try:
                check_dicom(f, voi=voi)
                cheap = None
            except DicomReadError as e:
                cheap = e.reason
            assert cheap == full, (kw, raw, voi)


def test_relative_paths_mean_the_callers_folder_after_a_change_of_directory(tmp_path, monkeypatch):
    """The reading processes outlive one build; a later build's relative paths are the caller's, not theirs."""
    from clinfuse.data.synth import SynthSpec, synthesize

    for name, n in (("a", 5), ("b", 7)):
        synthesize(tmp_path / name / "export", SynthSpec(studies=n, size=32, seed=n, missing_image=0), progress=False)
    for name, n in (("a", 5), ("b", 7)):
        monkeypatch.chdir(tmp_path / name)
        s = build_cohort("export/dicom", "export/reports.csv", "export/labels.csv", "cohort", progress=False)
        assert s.n_studies == n and s.info["counts"]["images"] >= n


def test_threads_sharing_a_pool_each_get_their_own_results():
    """A server answers requests in threads that screen files through the same process-wide pool: no
    worker may be handed to two threads at once (a verdict would reach the wrong request)."""
    import threading

    from clinfuse.data.workers import bounded_map

    errors: list[str] = []

    def client(c: int) -> None:
        for rnd in range(15):
            tasks = [(f"client {c} round {rnd} task {i}",) for i in range(4)]
            try:
                got = dict(bounded_map(T + "echo", tasks, workers=2, seconds=30))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"client {c}: {type(e).__name__}: {e}")
                return
            if got != {i: t[0] for i, t in enumerate(tasks)}:
                errors.append(f"client {c} round {rnd}: got {got}")
                return

    import sys

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: races show up
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), "a thread hung on the pool"
    assert not errors, errors[:3]
