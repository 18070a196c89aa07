"""Cost of deterministic kernels, and whether two trainings give the same weights.

Trains the tiny config (configs/tiny.yaml, 32 px, 3 epochs) on a synthetic cohort with
``train.deterministic`` on and off, alternately, in fresh processes, at 1 thread and at 2, and prints
the training seconds (sum of epochs), the weights' SHA-256 prefix, and the ratio deterministic / not
(the baseline: the same training with ``deterministic: false``, measured in the same run).

On a GPU, ``--device cuda`` runs the same check there (the thread count then only sets the CPU
side) and lists the ops that have no deterministic CUDA kernel (torch's warn-only warnings, captured
in each child): this is how a session with a GPU states what is and is not deterministic on CUDA.

Usage: python benchmarks/determinism.py [--repeats 2] [--device cpu|cuda] [--image-size 32] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, warnings
from pathlib import Path
from clinfuse.config import load_config
from clinfuse.training.trainer import train
cfg = load_config(sys.argv[1], ["train.epochs=3", "tracking.enabled=false", f"train.threads={sys.argv[4]}",
                                f"train.deterministic={sys.argv[3]}"] + json.loads(sys.argv[6]))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = train(sys.argv[2] + "/c", cfg, Path(sys.argv[5]), progress=False)
ops = sorted({str(w.message).split(" does not have a deterministic")[0] for w in caught
              if "does not have a deterministic" in str(w.message)})
print(json.dumps({"seconds": sum(h["train_seconds"] for h in r.history), "ops": ops,
                  "sha": json.loads((Path(sys.argv[5]) / "best/model.json").read_text())["weights_sha256"]}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="further config overrides, e.g. train.amp=off")
    args = ap.parse_args(argv)
    overrides = json.dumps([f"train.device={args.device}",
                            f"data.image_size=[{args.image_size},{args.image_size}]"] + args.overrides)
    sys.path.insert(0, str(REPO))
    from clinfuse.data.cohort import build_cohort
    from clinfuse.data.synth import SynthSpec, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        synthesize(d / "e", SynthSpec(studies=160, seed=2, size=40), progress=False)
        build_cohort(d / "e/dicom", d / "e/reports.csv", d / "e/labels.csv", d / "c", progress=False)
        res: dict[tuple[int, str], list[dict]] = {}
        k = 0
        for threads in (1, 2):
            for _ in range(args.repeats):
                for det in ("true", "false"):
                    k += 1
                    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "configs/tiny.yaml"), str(d), det,
                                          str(threads), str(d / f"run{k}"), overrides], capture_output=True,
                                         text=True, cwd=REPO)
                    if out.returncode:
                        sys.exit(f"training run {k} failed:\n{out.stderr[-3000:]}")
                    res.setdefault((threads, det), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"device {args.device}; image size {args.image_size}; overrides {args.overrides or 'none'}")
        print(f"{'threads':>7} {'deterministic':>13} {'train s (each run)':>24} {'weights sha256 (each run)':>30}")
        for (threads, det), rs in res.items():
            secs = ", ".join(f"{r['seconds']:.2f}" for r in rs)
            shas = ", ".join(r["sha"][:12] for r in rs)
            print(f"{threads:>7} {det:>13} {secs:>24} {shas:>30}")
        for threads in (1, 2):
            on = sum(r["seconds"] for r in res[(threads, "true")])
            off = sum(r["seconds"] for r in res[(threads, "false")])
            same = len({r["sha"] for r in res[(threads, "true")] + res[(threads, "false")]}) == 1
            each = ", ".join(f"deterministic {det}: {'yes' if len({r['sha'] for r in res[(threads, det)]}) == 1 else 'no'}"
                             for det in ("true", "false"))
            print(f"ratio deterministic / not at {threads} thread(s): {on / off:.2f}; repeats identical: {each}; "
                  f"all {2 * args.repeats} runs identical: {'yes' if same else 'no'}")
        a = res[(1, "true")][0]["sha"] != res[(2, "true")][0]["sha"]
        print(f"1 thread vs 2 threads give different weights: {'yes' if a else 'no'}")
        ops = sorted({op for rs in res.values() for r in rs for op in r["ops"]})
        print("ops without a deterministic kernel (torch's warnings): " + ("; ".join(ops) if ops else "none"))


if __name__ == "__main__":
    main()
