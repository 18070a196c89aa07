"""Serving cost: Model.predict on DICOM + report, against the floor, and HTTP latency of the served model.

1. Seconds per study of ``Model.predict`` at batch 1 and 16 on DICOM files + report text, against the
   floor measured in the same run: decoding the same DICOM files (``clinfuse.read_dicom``) plus one
   forward pass per batch on tensors already preprocessed and in memory. Target at batch 16: < 1.5x.
2. ``mlflow models serve`` of the same model on loopback: p50 / p95 latency of one-study requests
   from 2 concurrent clients x N requests each (0 errors expected), against the in-process time of
   ``Model.predict`` at batch 1.

A tiny model (configs/tiny.yaml, 64 px) is trained on a synthetic export first (about a minute);
``--config``/``--set`` choose another (e.g. DenseNet121 at 224 px, where the forward pass dominates).

Usage: python benchmarks/serve.py [--studies 64] [--requests 100] [--config FILE] [--set KEY=VALUE] [--no-http]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort, read_cohort  # noqa: E402
from clinfuse.data.dicom import read_dicom  # noqa: E402
from clinfuse.data.synth import SynthSpec, synthesize  # noqa: E402
from clinfuse.inference import Model, Study  # noqa: E402
from clinfuse.pipeline import train_and_audit  # noqa: E402


def _per_study(fn, n: int, reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / n


def _serve(d: Path, uri: str, version: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_REGISTRY_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/bench-serve/{version}",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=d)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                return proc, f"http://127.0.0.1:{port}/invocations"
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit("mlflow models serve did not start in 120 s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=64, help="studies timed in process (default 64)")
    ap.add_argument("--requests", type=int, default=100, help="HTTP requests per client (default 100)")
    ap.add_argument("--config", default=str(REPO / "configs/tiny.yaml"), help="config (default configs/tiny.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--no-http", action="store_true", help="skip the served-model part")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    d = Path(tmp.name)
    synthesize(d / "e", SynthSpec(studies=240, seed=0, size=128, lateral=0, missing_image=0, missing_report=0),
               progress=False)
    build_cohort(d / "e/dicom", d / "e/reports.csv", d / "e/labels.csv", d / "c", progress=False)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cfg = load_config(args.config, ["train.epochs=2", *args.overrides, f"tracking.tracking_uri={uri}",
                                    "tracking.register_as=bench-serve"])
    run = train_and_audit(d / "c", cfg, d / "run", progress=False, log=lambda m: None)
    model = Model.load(d / "run")
    rows, _ = read_cohort(d / "c")
    rows = [r for r in rows if r["image_present"] and r["report_present"]][: args.studies]
    studies = [Study(r["image_paths"], r["report"], r["study_id"]) for r in rows]
    n = len(studies)

    dicom = model.config.cohort.dicom
    pre = torch.utils.data.default_collate([model.dataset(rows)[i] for i in range(n)])

    def floor(bs):
        def f():
            for r in rows:
                read_dicom(r["image_paths"][0], voi=dicom.voi, channels=model.input.channels)
            with torch.no_grad():
                for i in range(0, n, bs):
                    model.network(pre["image"][i:i + bs], pre["image_present"][i:i + bs], pre["input_ids"][i:i + bs],
                                  pre["attention_mask"][i:i + bs], pre["text_present"][i:i + bs])
        return f

    table = []
    for bs in (1, 16):
        t_model = _per_study(lambda: model.predict(studies, batch_size=bs), n)
        t_floor = _per_study(floor(bs), n)
        table.append((bs, t_model, t_floor))
    print(f"model: {model.config.model.image.name} + {model.config.model.text.name_or_path} at "
          f"{list(model.input.image_size)} | {n} studies (DICOM 128 px + report) | torch threads {torch.get_num_threads()}")
    print(f"{'measure':<58} {'batch':>5} {'s/study':>9}")
    for bs, tm, tf in table:
        print(f"{'Model.predict (DICOM + report -> probabilities, p_without)':<58} {bs:>5} {tm:>9.4f}")
        print(f"{'floor: read_dicom + one forward on preloaded tensors':<58} {bs:>5} {tf:>9.4f}")
    for bs, tm, tf in table:
        print(f"ratio Model.predict / floor at batch {bs}: {tm / tf:.2f}" + ("  (target < 1.5)" if bs == 16 else ""))

    if args.no_http:
        tmp.cleanup()
        return
    proc, url = _serve(d, uri, str(run.model["version"]))
    bodies = [json.dumps({"dataframe_records": [{"study_id": s.study_id, "report": s.report, "dicom": [
        base64.b64encode(Path(s.images[0]).read_bytes()).decode()]}]}).encode() for s in studies]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(k: int):
        for j in range(args.requests):
            body = bodies[(k * args.requests + j) % len(bodies)]
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    ok = r.status == 200 and json.loads(r.read())["predictions"][0]["status"] == "ok"
            except OSError:
                ok = False
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                errors[0] += not ok

    try:
        client(0)  # warm-up pass of one client, not counted
        latencies.clear()
        errors[0] = 0
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    q = statistics.quantiles(latencies, n=20)
    p50, p95 = statistics.median(latencies), q[18]
    in_proc = table[0][1]
    print(f"HTTP, 2 clients x {args.requests} one-study requests on loopback: p50 {p50 * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms, {len(latencies) / wall:.1f} requests/s, errors {errors[0]}")
    print(f"ratio HTTP p50 / in-process Model.predict at batch 1: {p50 / in_proc:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
