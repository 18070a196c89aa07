"""Cohort ingest: build time, CPU use and peak memory against the floor of reading and decoding the same files.

The export is synthetic and mixed: radiographs of 256, 512 and 1024 pixels (60/30/10% of studies),
5% of files re-encoded as RLE Lossless and 2% as JPEG-LS, and broken files (zero-byte, not DICOM,
truncated pixels, header cut short) at 0.5% of the files.

Baseline (the floor, measured in the same run on the same files, serial, page cache warm):
``pydicom.dcmread`` + ``.pixel_array`` of every file. Also shown: the header-only read, and
``build_cohort`` with its default (one reading process per usable core, content fingerprint,
every selectable image decoded) and with one reading process. "CPU s" adds this process and its
children; "peak MiB" is the largest resident set of this process plus its reading processes
(sampled every 20 ms), in absolute terms, so it includes the interpreter and libraries; "main MiB" is
the largest resident set of this process alone (the reading processes hold one file each, so it is
the part that can grow with the export).

Usage: python benchmarks/ingest.py [--files 2000] [--keep DIR]
       python benchmarks/ingest.py --files 20000     # the hospital-scale row (about 9 GB of files)
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pydicom

from clinfuse.config import CohortConfig
from clinfuse.data.cohort import build_cohort
from clinfuse.data.synth import SynthSpec, synthesize

MIX = ((256, 0.6), (512, 0.3), (1024, 0.1))


class Measure:
    """Wall time, CPU time (process + children) and peak RSS (process + children) of a block."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.peak = self.main = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.cpu0 = self._cpu()
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _cpu(self) -> float:
        t = os.times()
        live = 0.0
        for c in self.proc.children(recursive=True):
            try:
                ct = c.cpu_times()
                live += ct.user + ct.system
            except psutil.Error:
                pass
        return t.user + t.system + t.children_user + t.children_system + live

    def _rss(self) -> int:
        total = self.proc.memory_info().rss
        self.main = max(self.main, total)
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = self._cpu() - self.cpu0
        self._stop.set()
        self._t.join()
        self.mib = max(self.peak, self._rss()) / 2**20
        self.main_mib = self.main / 2**20


def make_export(d: Path, files: int) -> None:
    """A mixed export of about `files` files under d/dicom, with d/reports.csv and d/labels.csv."""
    from pydicom.uid import JPEGLSLossless, RLELossless

    studies = int(files / 1.06)  # about 6% of studies also have a lateral view (synth's lateral=0.2 of 30%)
    parts = []
    for i, (size, share) in enumerate(MIX):
        n = max(1, int(studies * share))
        part = d / f"part{size}"
        synthesize(part, SynthSpec(studies=n, size=size, seed=100 + i, corrupt=max(1, int(n * 0.005))),
                   progress=False)
        parts.append(part)
    for name in ("reports.csv", "labels.csv"):
        rows, fields = [], None
        for part in parts:
            with open(part / name, newline="") as f:
                r = csv.DictReader(f)
                fields = r.fieldnames
                rows += list(r)
        with open(d / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    (d / "dicom").mkdir()
    for part in parts:
        (part / "dicom").rename(d / "dicom" / part.name)
        shutil.rmtree(part)
    rng = np.random.default_rng(0)
    for p in sorted((d / "dicom").rglob("*.dcm")):
        if "INCOMING" in p.parts:
            continue
        u = rng.random()
        if u < 0.07:
            ds = pydicom.dcmread(p)
            ds.compress(RLELossless if u < 0.05 else JPEGLSLossless)
            ds.save_as(p)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000, help="about how many DICOM files to generate")
    ap.add_argument("--keep", type=Path, help="generate the export here (or reuse one made there before)")
    args = ap.parse_args(argv)
    tmp = None
    if args.keep:
        d = args.keep
    else:
        tmp = tempfile.TemporaryDirectory()
        d = Path(tmp.name)
    t = time.perf_counter()
    if not (d / "labels.csv").is_file():
        d.mkdir(parents=True, exist_ok=True)
        make_export(d, args.files)
    t_synth = time.perf_counter() - t
    files = sorted(p for p in (d / "dicom").rglob("*.dcm"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    for f in files:  # warm the page cache for every row alike
        f.read_bytes()
    steps: dict[str, Measure] = {}
    with Measure() as m:
        for f in files:
            try:
                pydicom.dcmread(f).pixel_array
            except Exception:  # noqa: BLE001 - the broken files fail; the floor is the read attempt
                pass
    steps["floor: pydicom.dcmread + .pixel_array, serial"] = m
    with Measure() as m:
        for f in files:
            try:
                pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001
                pass
    steps["pydicom.dcmread headers only, serial"] = m
    builds = {
        "cohort build, default (a reading process per core)": CohortConfig(),
        "cohort build, one reading process": CohortConfig(workers=1),
        "cohort build, fingerprint=header, verify_pixels=false": CohortConfig(fingerprint="header",
                                                                             dicom={"verify_pixels": False}),
    }
    summaries = {}
    for name, cfg in builds.items():
        out = d / f"cohort-{len(summaries)}"
        with Measure() as m:
            summaries[name] = build_cohort(d / "dicom", d / "reports.csv", d / "labels.csv", out, cfg, progress=False)
        steps[name] = m
    n = len(files)
    s = next(iter(summaries.values()))
    print(f"{n} DICOM files, {mb:,.0f} MB (sizes {', '.join(f'{a}px {b:.0%}' for a, b in MIX)}; 5% RLE, 2% JPEG-LS; "
          f"{s.n_quarantined} set aside), {s.n_studies} studies; {psutil.cpu_count()} cores; "
          f"export written in {t_synth:.0f} s")
    print(f"{'step':<56} {'seconds':>8} {'files/s':>8} {'MB/s':>7} {'CPU s':>7} {'peak MiB':>9} {'main MiB':>9}")
    for name, m in steps.items():
        print(f"{name:<56} {m.seconds:>8.2f} {n / m.seconds:>8.0f} {mb / m.seconds:>7.0f} {m.cpu:>7.1f} {m.mib:>9.0f} {m.main_mib:>9.0f}")
    base = steps["floor: pydicom.dcmread + .pixel_array, serial"].seconds
    for name in builds:
        print(f"ratio {name} / floor: {steps[name].seconds / base:.2f}x")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
