"""Cohort build memory against the number of studies: is the main process flat in the size of the export?

Each row generates N studies of reports and labels (a reports CSV of about 1 KB a study, three studies
per patient, 20% positive) and builds a cohort from them with no DICOM folder (the DICOM side is measured
by ``ingest.py``; here the growth per study alone), in a fresh process each, so "peak MiB" is that
process's largest resident set (``ru_maxrss``) with the interpreter and libraries.

Baseline (the floor, measured in the same run, in a fresh process each): reading the same reports CSV
with ``csv.reader``, row by row, keeping nothing: the least any build must do with the text. Ratio: the
build's seconds and peak over the floor's. A flat build keeps the peak ratio about constant as N grows.

Usage: python benchmarks/cohort_scale.py [--studies 20000 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_VOCAB = np.array("opacity effusion clear lungs no acute the right left base consolidation heart size normal pleural"
                  .split())

_FLOOR = """
import csv, resource, sys, time
csv.field_size_limit(2**31 - 1)
t = time.perf_counter()
with open(sys.argv[1], newline="", encoding="utf-8") as f:
    n = sum(1 for _ in csv.reader(f))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

_BUILD = """
import resource, sys, tempfile, time
from pathlib import Path
from clinfuse.config import config_from_dict
from clinfuse.data.cohort import build_cohort
cfg = config_from_dict({"cohort": {"labels": {"patient_column": "PatientID"}}}).cohort
t = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    build_cohort(None, Path(sys.argv[1]), Path(sys.argv[2]), Path(out) / "c", cfg, progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def make(d: Path, n: int) -> tuple[Path, Path]:
    reports, labels = d / f"reports{n}.csv", d / f"labels{n}.csv"
    if reports.is_file() and labels.is_file():
        return reports, labels
    rng = np.random.default_rng(0)
    with open(reports, "w", newline="") as f, open(labels, "w", newline="") as g:
        w, v = csv.writer(f), csv.writer(g)
        w.writerow(["StudyInstanceUID", "report"])
        v.writerow(["StudyInstanceUID", "label", "PatientID"])
        for i in range(n):
            words = " ".join(rng.choice(_VOCAB, 120))
            w.writerow([f"1.2.826.0.1.{i}", f"FINDINGS: {words}. IMPRESSION: {words[:200]}."])
            v.writerow([f"1.2.826.0.1.{i}", int(rng.random() < 0.2), f"P{i // 3:08d}"])
    return reports, labels


def run(code: str, *args: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    seconds, mib = out.stdout.split()[-2:]
    return float(seconds), float(mib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, nargs="+", default=[20000, 100000],
                    help="a row per number of studies (default: %(default)s)")
    ap.add_argument("--keep", type=Path, help="write the generated reports and labels here and reuse them on the "
                    "next run (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    d = args.keep or Path(tempfile.mkdtemp(prefix="clinfuse-scale-"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"{'studies':>8} {'reports MB':>10} {'floor s':>8} {'build s':>8} {'floor MiB':>9} {'peak MiB':>9} "
          f"{'time ratio':>10} {'peak ratio':>10}", flush=True)
    try:
        for n in args.studies:
            reports, labels = make(d, n)
            fs, fm = run(_FLOOR, reports)
            bs, bm = run(_BUILD, reports, labels)
            print(f"{n:>8} {reports.stat().st_size / 1e6:>10.0f} {fs:>8.1f} {bs:>8.1f} {fm:>9.0f} {bm:>9.0f} "
                  f"{bs / fs:>9.1f}x {bm / fm:>9.2f}x", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
