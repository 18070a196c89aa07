"""What tracking costs a training: tracking off vs the embedded SQLite store vs the team server.

One tiny training (configs/tiny.yaml, 32 px, --epochs epochs, 120 synthetic studies) as a
`clinfuse train` process, timed from start to exit, with:

1. tracking off (``--no-mlflow``): the baseline;
2. the embedded SQLite store (``sqlite:///...``);
3. the team server (``clinfuse server``: MLflow on PostgreSQL, basic auth, proxied artifacts, 2
   workers), as a trainer.

Per setting: wall seconds; seconds of logging per epoch (time between epoch records outside training
and validation, from metrics.jsonl, minus the same with tracking off); seconds of everything else
tracking adds (run set-up, cohort lineage, evaluation artifacts, the model logging and registration:
the rest of the wall-time difference); runs per minute with 1 and with 4 trainings started at once;
ratio of wall time against tracking off.

Usage: python benchmarks/tracking.py [--epochs 3] [--no-server]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAINER, TRAINER_PW = "bench-trainer", "bench-trainer-password"


def _env(user=None, pw=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"})
    if user:
        env.update({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": pw})
    return env


def _train_cmd(cohort: Path, out: Path, epochs: int, tracking: list[str]) -> list[str]:
    return [sys.executable, "-m", "clinfuse.cli", "train", "--cohort", str(cohort), "--out", str(out), "--config",
            str(REPO / "configs/tiny.yaml"), "--set", "data.image_size=[32,32]", "--set", f"train.epochs={epochs}",
            "--set", "train.patience=0", "--set", "eval.bootstrap=0", "--set", "tracking.system_metrics=false",
            "--no-progress", *tracking]


def _run(cohort, root, name, epochs, tracking, env, n=1) -> tuple[float, list[Path]]:
    outs = [root / f"{name}-{i}" for i in range(n)]
    t = time.perf_counter()
    procs = [subprocess.Popen(_train_cmd(cohort, o, epochs, tracking), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for o in outs]
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t
    for p, e in zip(procs, errs):
        if p.returncode != 0:
            sys.exit(f"benchmarks/tracking.py: a training of '{name}' failed:\n{e[-2000:]}")
    return wall, outs


def _epoch_overhead(out: Path) -> float:
    """Mean seconds per epoch spent outside training and validation (logging, checkpoints), from the
    epoch records' timestamps."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "epoch" in r and "time" in r]
    gaps = [b["time"] - a["time"] - b.get("train_seconds", 0.0) - b.get("val_seconds", 0.0)
            for a, b in zip(rows, rows[1:])]
    return sum(gaps) / len(gaps) if gaps else 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--no-server", action="store_true", help="skip the team server (no PostgreSQL here)")
    args = ap.parse_args(argv)
    from clinfuse.data.cohort import build_cohort
    from clinfuse.data.synth import SynthSpec, synthesize

    base = Path(tempfile.mkdtemp(prefix="clinfuse-bench-tracking-", dir="/tmp"))
    base.chmod(0o711)  # the postgres user enters the server folder below it
    synthesize(base / "e", SynthSpec(studies=120, seed=0, size=40), progress=False)
    build_cohort(base / "e/dicom", base / "e/reports.csv", base / "e/labels.csv", base / "c", progress=False)
    settings = [("off", ["--no-mlflow"], _env()),
                ("embedded SQLite", ["--tracking-uri", f"sqlite:///{base / 'mlflow.db'}"], _env())]
    server = None
    if not args.no_server:
        from clinfuse.net import free_port
        from clinfuse.server import TeamServer, add_user, init_server

        init_server(base / "srv", port=free_port(), log=lambda m: None)
        server = subprocess.Popen([sys.executable, "-m", "clinfuse.cli", "server", "start", str(base / "srv")],
                                  env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        ts = TeamServer(base / "srv")
        deadline = time.time() + 240
        while not ts.healthy():
            if time.time() > deadline or server.poll() is not None:
                sys.exit("benchmarks/tracking.py: the team server did not start")
            time.sleep(0.5)
        add_user(base / "srv", TRAINER, "trainer", TRAINER_PW)
        settings.append(("team server (PostgreSQL)", ["--tracking-uri", ts.url], _env(TRAINER, TRAINER_PW)))
    rows = []
    try:
        for name, tracking, env in settings:
            _run(base / "c", base, f"warm-{name[:3]}", 1, tracking, env)  # first use: tables, experiment
            one, (out,) = _run(base / "c", base, name[:3], args.epochs, tracking, env)
            four, _ = _run(base / "c", base, f"{name[:3]}x4", args.epochs, tracking, env, n=4)
            rows.append((name, one, _epoch_overhead(out), 60 / one, 4 * 60 / four))
    finally:
        if server is not None:
            subprocess.run([sys.executable, "-m", "clinfuse.cli", "server", "stop", str(base / "srv")],
                           env=_env(), capture_output=True)
            server.wait(timeout=120)
    off = rows[0]
    print(f"tiny training, {args.epochs} epochs, 120 studies at 32 px, one `clinfuse train` process each; "
          f"{os.cpu_count()} CPU cores\n")
    print("| tracking | wall s | per epoch: logging s | final logging s | runs/min (1) | runs/min (4 at once) | "
          "wall ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, wall, ep, r1, r4 in rows:
        per_epoch = ep - off[2]
        final = (wall - off[1]) - args.epochs * per_epoch
        print(f"| {name} | {wall:.1f} | {per_epoch:.3f} | {final:.1f} | {r1:.1f} | {r4:.1f} | {wall / off[1]:.2f} |")


if __name__ == "__main__":
    main()
