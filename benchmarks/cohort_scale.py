"""Cohort build memory against the number of studies: is the main process flat in the size of the export?

Each row generates N studies of reports, labels and clinical variables (a reports CSV of about 1 KB a
study, three studies per patient, 20% positive; four numeric variables and a sex column, 10% of values
missing, kinds left to the build to infer) and builds a cohort from them with no DICOM folder (the DICOM
side is measured by ``ingest.py``; here the growth per study alone), in a fresh process each, so "peak
MiB" is that process's largest resident set with the interpreter and libraries (``VmHWM``, read from
``/proc/self/status``: ``ru_maxrss`` would also count the generating parent's, which a forked child
inherits; ``ru_maxrss`` where there is no ``/proc``).

Baseline (the floor, measured in the same run, in a fresh process each): reading the same three CSV files
with ``csv.reader``, row by row, keeping nothing: the least any build must do with them. Ratio: the
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
import csv, sys, time
csv.field_size_limit(2**31 - 1)
t = time.perf_counter()
for path in sys.argv[1:]:
    with open(path, newline="", encoding="utf-8") as f:
        n = sum(1 for _ in csv.reader(f))
print(time.perf_counter() - t, peak())
"""

_BUILD = """
import sys, tempfile, time
from pathlib import Path
from clinfuse.config import config_from_dict
from clinfuse.data.cohort import build_cohort
cfg = config_from_dict({"cohort": {"labels": {"patient_column": "PatientID"}}}).cohort
t = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    build_cohort(None, Path(sys.argv[1]), Path(sys.argv[2]), Path(out) / "c", cfg, progress=False,
                 variables=Path(sys.argv[3]))
print(time.perf_counter() - t, peak())
"""

# this process's peak resident set in MiB (VmHWM is reset at exec; ru_maxrss keeps a forked parent's)
_PEAK = """
def peak():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def make(d: Path, n: int) -> tuple[Path, Path, Path]:
    reports, labels, variables = d / f"reports{n}.csv", d / f"labels{n}.csv", d / f"variables{n}.csv"
    if reports.is_file() and labels.is_file() and variables.is_file():
        return reports, labels, variables
    rng = np.random.default_rng(0)
    with open(reports, "w", newline="") as f, open(labels, "w", newline="") as g, \
            open(variables, "w", newline="") as h:
        w, v, x = csv.writer(f), csv.writer(g), csv.writer(h)
        w.writerow(["StudyInstanceUID", "report"])
        v.writerow(["StudyInstanceUID", "label", "PatientID"])
        x.writerow(["StudyInstanceUID", "temperature_c", "wbc", "crp", "spo2", "sex"])
        for i in range(n):
            words = " ".join(rng.choice(_VOCAB, 120))
            w.writerow([f"1.2.826.0.1.{i}", f"FINDINGS: {words}. IMPRESSION: {words[:200]}."])
            v.writerow([f"1.2.826.0.1.{i}", int(rng.random() < 0.2), f"P{i // 3:08d}"])
            values = [f"{m + s * z:.1f}" for m, s, z in zip((37, 9, 40, 95), (0.8, 3, 30, 3), rng.normal(size=4))]
            x.writerow([f"1.2.826.0.1.{i}", *(val if rng.random() >= 0.1 else "" for val in values),
                        "FM"[i % 2] if rng.random() >= 0.1 else ""])
    return reports, labels, variables


def run(code: str, *args: Path) -> tuple[float, float]:
    code = _PEAK + code
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    seconds, mib = out.stdout.split()[-2:]
    return float(seconds), float(mib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, nargs="+", default=[20000, 100000],
                    help="a row per number of studies (default: %(default)s)")
    ap.add_argument("--keep", type=Path, help="write the generated reports, labels and variables here and reuse them on the "
                    "next run (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    d = args.keep or Path(tempfile.mkdtemp(prefix="clinfuse-scale-"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"{'studies':>8} {'reports MB':>10} {'floor s':>8} {'build s':>8} {'floor MiB':>9} {'peak MiB':>9} "
          f"{'time ratio':>10} {'peak ratio':>10}", flush=True)
    try:
        for n in args.studies:
            reports, labels, variables = make(d, n)
            fs, fm = run(_FLOOR, reports, labels, variables)
            bs, bm = run(_BUILD, reports, labels, variables)
            print(f"{n:>8} {reports.stat().st_size / 1e6:>10.0f} {fs:>8.1f} {bs:>8.1f} {fm:>9.0f} {bm:>9.0f} "
                  f"{bs / fs:>9.1f}x {bm / fm:>9.2f}x", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
