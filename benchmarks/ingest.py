"""Cohort scanning speed: header-only scan (what `cohort build` does first) vs reading every pixel.

Prints a table and the ratio against the named baseline (full pydicom read + decode of every file),
measured in the same run on the same synthetic export.
Usage: python benchmarks/cohort_scan.py [--studies N] [--size PX]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pydicom

from clinfuse.config import CohortConfig
from clinfuse.data.cohort import build_cohort
from clinfuse.data.studies import scan_dicom
from clinfuse.data.synth import SynthSpec, synthesize


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512, help="image size; larger images show the header-only gain")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        synthesize(d, SynthSpec(studies=args.studies, size=args.size, seed=0), progress=False)
        t_synth = time.perf_counter() - t
        files = sorted((Path(d) / "dicom").rglob("*.dcm"))
        t = time.perf_counter()
        for f in files:
            pydicom.dcmread(f).pixel_array  # baseline: full read and decode
        t_full = time.perf_counter() - t
        cfg = CohortConfig(fingerprint="header")
        t = time.perf_counter()
        scan_dicom(Path(d) / "dicom", cfg, progress=False)
        t_hdr = time.perf_counter() - t
        t = time.perf_counter()
        scan_dicom(Path(d) / "dicom", CohortConfig(), progress=False)
        t_hdr_hash = time.perf_counter() - t
        t = time.perf_counter()
        build_cohort(Path(d) / "dicom", Path(d) / "reports.csv", Path(d) / "labels.csv", Path(d) / "cohort",
                     progress=False)
        t_build = time.perf_counter() - t
    n = len(files)
    print(f"{args.studies} studies, {n} DICOM files at {args.size} px")
    print(f"{'step':<48} {'seconds':>8} {'files/s':>9}")
    rows = [("synth: write the export", t_synth),
            ("baseline: pydicom full read + decode", t_full),
            ("scan: headers only (fingerprint=header)", t_hdr),
            ("scan: headers + content sha256 (default)", t_hdr_hash),
            ("cohort build (scan + join + verify pixels)", t_build)]
    for name, s in rows:
        print(f"{name:<48} {s:>8.2f} {n / s:>9.0f}")
    print(f"ratio baseline / header-only scan: {t_full / t_hdr:.1f}x")
    print(f"ratio baseline / default scan (with content hash): {t_full / t_hdr_hash:.1f}x")


if __name__ == "__main__":
    main()
