"""Run every benchmark and write benchmarks/RESULTS.md with the machine, the versions and the date.

Each benchmark runs in its own process (so that one's memory does not weigh on the next); its
printed table goes into RESULTS.md unchanged.

Usage: python benchmarks/run_all.py [--out benchmarks/RESULTS.md] [--only ingest train_throughput explain_cost]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "ingest": [],
    "cohort_scale": [],
    "train_throughput": [],
    "explain_cost": [],
    "phi_guard": [],
    "serve": [],
    "determinism": [],
    "robustness": [],
    "pacs": [],
    "tracking": [],
}


def machine() -> list[str]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- CPU: {cpu}, {cores} cores available; memory {psutil.virtual_memory().total / 2**30:.0f} GiB; GPU: {gpu}",
             f"- Python {platform.python_version()}; " + ", ".join(
                 f"{p} {md.version(p)}" for p in ("clinfuse", "torch", "monai", "transformers", "pydicom", "captum"))]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    args = ap.parse_args(argv)
    parts = ["# Benchmark results", "", "Written by `python benchmarks/run_all.py`; every table below is the",
             "unchanged output of the named script, run in this order in one session.", "", *machine(), ""]
    failed = []
    for name, extra in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
        print(f"run_all: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t
        out = r.stdout.strip() if r.returncode == 0 else (r.stdout + r.stderr)[-4000:]
        if r.returncode:
            failed.append(name)
        print(out, flush=True)
        parts += [f"## {name}.py", "", f"`python benchmarks/{name}.py {' '.join(extra)}`".replace(" `", "`")
                  + f" ({secs:.0f} s{', FAILED' if r.returncode else ''})", "", "```", out, "```", ""]
    args.out.write_text("\n".join(parts))
    print(f"run_all: wrote {args.out}")
    if failed:
        sys.exit(f"run_all: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
