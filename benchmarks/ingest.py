"""Cohort ingest: build throughput (files/s, MB/s) and peak memory on a synthetic export of ~2,000 files.

Baseline (the raw floor): reading the same files with ``pydicom.dcmread`` alone (headers and pixel
bytes, no decode), measured in the same run. Also shown: a full pydicom read + decode, and each
stage of ``cohort build``. Memory is the peak resident set size of this process during each step
(sampled every 10 ms), above what it held before the step.

Usage: python benchmarks/ingest.py [--studies 1885] [--size 512]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pydicom

from clinfuse.config import CohortConfig
from clinfuse.data.cohort import build_cohort
from clinfuse.data.studies import scan_dicom
from clinfuse.data.synth import SynthSpec, synthesize


class PeakRSS:
    """Peak RSS above the starting RSS while the block runs (a 10 ms sampling thread)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mib = (self.peak - self.base) / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1885, help="studies to synthesise (1,885 make ~2,000 files)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        synthesize(d, SynthSpec(studies=args.studies, size=args.size, seed=0), progress=False)
        t_synth = time.perf_counter() - t
        files = sorted((d / "dicom").rglob("*.dcm"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        steps = {}
        with PeakRSS() as m:
            for f in files:
                pydicom.dcmread(f)  # the floor: parse every file, pixel bytes read, nothing decoded
        steps["baseline: pydicom.dcmread of every file"] = m
        with PeakRSS() as m:
            for f in files:
                pydicom.dcmread(f).pixel_array
        steps["pydicom.dcmread + decode pixels"] = m
        with PeakRSS() as m:
            scan_dicom(d / "dicom", CohortConfig(fingerprint="header"), progress=False)
        steps["scan: headers only (fingerprint=header)"] = m
        with PeakRSS() as m:
            scan_dicom(d / "dicom", CohortConfig(), progress=False)
        steps["scan: headers + content sha256 (default)"] = m
        with PeakRSS() as m:
            build_cohort(d / "dicom", d / "reports.csv", d / "labels.csv", d / "cohort", progress=False)
        steps["cohort build (scan + join + decode check), default"] = m
        with PeakRSS() as m:
            build_cohort(d / "dicom", d / "reports.csv", d / "labels.csv", d / "cohort2",
                         CohortConfig(fingerprint="header", dicom={"verify_pixels": False}), progress=False)
        steps["cohort build, fingerprint=header, verify_pixels=false"] = m
    n = len(files)
    print(f"{args.studies} studies, {n} DICOM files, {mb:.0f} MB, {args.size} px uncompressed "
          f"(writing the export took {t_synth:.1f} s)")
    print(f"{'step':<56} {'seconds':>8} {'files/s':>8} {'MB/s':>7} {'peak MiB':>9}")
    for name, m in steps.items():
        print(f"{name:<56} {m.seconds:>8.2f} {n / m.seconds:>8.0f} {mb / m.seconds:>7.0f} {m.mib:>9.0f}")
    base = steps["baseline: pydicom.dcmread of every file"].seconds
    for name in ("cohort build (scan + join + decode check), default",
                 "cohort build, fingerprint=header, verify_pixels=false"):
        print(f"ratio {name} / baseline: {steps[name].seconds / base:.2f}x")


if __name__ == "__main__":
    main()
