"""Robustness figures: a synthetic export mutated as a hostile tester would, then built into a cohort.

Mutations of real synthetic DICOM files: random byte flips, truncation at a random length, header
values edited to what pydicom cannot use (RescaleSlope 'abc', WindowCenter 'abc', WindowWidth 0, a
one-value PixelSpacing, RescaleSlope 1e39 -> infinite pixels, an unknown transfer syntax), two JPEG-LS
files whose frame header claims 20000x20000 and 65535x65535 pixels (the decoder works for seconds and
asks for gigabytes), plus a FIFO named *.dcm, a link to /dev/zero and a symlinked study folder. The
cohort build runs in a child process with a time limit, each file within 5 s
(cohort.dicom.max_seconds_per_file) and the default memory cap per reading process; then 3 trainings' MLflow runs start at once on a new SQLite store, and the
PHI guard screens cohort.json and the built reports.

Printed: files mutated, set aside with a reason, accepted (decoded fine: a flip in the pixel data is
a valid image), not read (a lateral view the frontal policy leaves out is never decoded), crashes,
hangs, peak memory of the build, identifier hits, runs lost under concurrency. Crashes, hangs,
identifier hits and runs lost must be 0.

Usage: python benchmarks/robustness.py [--studies 150] [--flips 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUILD = """
import resource, sys
from clinfuse.config import load_config
from clinfuse.data.cohort import build_cohort
cfg = load_config(sys.argv[5])
build_cohort(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], cfg, progress=False)
from clinfuse.data.workers import close_pools
close_pools()  # the reading processes end, so that their peak counts in RUSAGE_CHILDREN
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""

RACE = """
import sys
from clinfuse.tracking.mlflow_tracker import MlflowTracker
t = MlflowTracker(sys.argv[1], "race", system_metrics=False)
t.log_metrics({"x": 1.0}, step=0)
t.close()
"""


def _raw_edit(f: Path, keyword: str, text: str) -> None:
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(f)
    t = Tag(tag_for_keyword(keyword))
    raw = (text + " " * (len(text) % 2)).encode()
    ds._dict[t] = RawDataElement(t, dictionary_VR(t), len(raw), raw, 0, False, True)
    ds.save_as(f)


def mutate(files: list[Path], root: Path, flips: int, rng: random.Random) -> dict[str, str]:
    import pydicom
    from pydicom.uid import JPEGLSLossless

    done: dict[str, str] = {}
    pool = list(files)
    rng.shuffle(pool)
    edits = [("RescaleSlope", "abc"), ("WindowCenter", "abc"), ("WindowWidth", "0"), ("PixelSpacing", "0.5"),
             ("RescaleSlope", "1e39")]
    for kw, value in edits:
        f = pool.pop()
        _raw_edit(f, kw, value)
        done[str(f)] = f"{kw}={value}"
    f = pool.pop()
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    ds.save_as(f, enforce_file_format=False)
    done[str(f)] = "unknown transfer syntax"
    for _ in range(flips):
        f = pool.pop()
        data = bytearray(f.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        f.write_bytes(bytes(data))
        done[str(f)] = "byte flips"
    for _ in range(flips // 2):
        f = pool.pop()
        data = f.read_bytes()
        f.write_bytes(data[: rng.randrange(len(data))])
        done[str(f)] = "truncated"
    for side in (20000, 65535):  # a JPEG-LS frame header claiming a huge image: seconds of work, GBs asked
        f = next(x for x in reversed(pool) if pydicom.dcmread(x, stop_before_pixels=True).ViewPosition != "LL")
        pool.remove(f)  # a frontal view: one the build reads
        ds = pydicom.dcmread(f)
        ds.compress(JPEGLSLossless)
        ds.save_as(f)
        data = bytearray(f.read_bytes())
        sof = data.find(b"\xff\xf7")
        data[sof + 5: sof + 9] = side.to_bytes(2, "big") * 2
        f.write_bytes(bytes(data))
        done[str(f)] = f"JPEG-LS claiming {side}x{side}"
    fifo = root / "fifo.dcm"
    os.mkfifo(fifo)
    done[str(fifo)] = "FIFO"
    os.symlink("/dev/zero", root / "zero.dcm")
    done[str(root / "zero.dcm")] = "link to /dev/zero"
    study = pool.pop().parent
    moved = root.parent / "moved" / study.name
    moved.parent.mkdir(exist_ok=True)
    os.replace(study, moved)
    os.symlink(moved, study)
    done[str(study)] = "symlinked folder"
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=150)
    ap.add_argument("--flips", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from clinfuse.data.synth import SynthSpec, synthesize
    from clinfuse.phi import PhiGuard

    rng = random.Random(args.seed)
    tmp = tempfile.TemporaryDirectory()
    d = Path(tmp.name)
    synthesize(d / "e", SynthSpec(studies=args.studies, seed=args.seed, size=64, lateral=0.2, missing_image=0),
               progress=False)
    files = sorted((d / "e" / "dicom").rglob("*.dcm"))
    mutated = mutate(files, d / "e" / "dicom", args.flips, rng)
    cfg = d / "cfg.yaml"
    cfg.write_text("cohort:\n  dicom:\n    voi: file\n    max_seconds_per_file: 5\n")
    crashes = hangs = 0
    peak_mib = peak_child_mib = float("nan")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", BUILD, str(d / "e/dicom"), str(d / "e/reports.csv"),
                            str(d / "e/labels.csv"), str(d / "c"), str(cfg)], capture_output=True, text=True,
                           timeout=600, cwd=REPO)
        if r.returncode:
            crashes = 1
            print(r.stderr[-2000:], file=sys.stderr)
        else:
            peak_mib, peak_child_mib = (int(x) / 1024 for x in r.stdout.strip().splitlines()[-1].split())
    except subprocess.TimeoutExpired:
        hangs = 1
    secs = time.perf_counter() - t0
    set_aside = accepted = 0
    hits = 0
    if not crashes and not hangs:
        with open(d / "c" / "quarantine.csv", newline="") as f:
            q = {row["source"]: row["reason"] for row in csv.DictReader(f)}
        with open(d / "c" / "cohort.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        used = {p for row in rows for p in json.loads(row["image_paths"])}
        for src in mutated:
            if src in q and q[src]:
                set_aside += 1
            elif str(Path(src).resolve()) in used or src in used:
                accepted += 1
        guard = PhiGuard(json.loads((d / "c/private/identifiers.json").read_text()))
        hits = int(guard.find((d / "c/cohort.json").read_text()) is not None)
        hits += sum(guard.find(row["report"]) is not None for row in rows)
    unaccounted = len(mutated) - set_aside - accepted
    store = f"sqlite:///{d / 'race.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, store], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(3)]
    lost = sum(p.wait(timeout=300) != 0 for p in procs)
    print(f"synthetic export: {len(files)} files of {args.studies} studies (seed {args.seed}); cohort build "
          f"{secs:.1f} s")
    print(f"{'figure':<48} {'count':>8}")
    for name, v in (("files mutated", len(mutated)), ("set aside with a reason", set_aside),
                    ("accepted (still a valid image)", accepted), ("not read (not chosen for its study, e.g. a lateral)", unaccounted),
                    ("crashes of the build", crashes), ("hangs (over 600 s)", hangs),
                    ("identifier hits (cohort.json, reports)", hits), ("runs lost, 3 concurrent starts", lost)):
        print(f"{name:<48} {v:>8}")
    print(f"peak memory of the build process: {peak_mib:.0f} MiB; of its largest reading process: "
          f"{peak_child_mib:.0f} MiB (cap cohort.dicom.max_worker_mb)")
    print("must be 0: crashes, hangs, identifier hits, runs lost -> "
          + ("all 0" if crashes == hangs == hits == lost == 0 else "NOT all 0"))
    tmp.cleanup()


if __name__ == "__main__":
    main()
