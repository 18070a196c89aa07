"""Cost of an explanation: seconds per explained study for each method, and the ratio to one plain forward pass.

Baseline: one forward pass of the same model on one study (batch of 1), timed in the same run.
Target (issue 5): the full explanation (image IG 32 steps + report IG 32 steps + Shapley) under 40
forward-pass equivalents, by batching the integration steps.

Usage: python benchmarks/explain_cost.py [--model RUN/best --cohort COHORT] [--studies 8]
(without --model it trains the tiny config on a synthetic cohort first)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clinfuse.config import config_from_dict, load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort, read_cohort  # noqa: E402
from clinfuse.data.synth import SynthSpec, synthesize  # noqa: E402
from clinfuse.explain.attributions import StudyInput, explain_study, modality_shapley  # noqa: E402
from clinfuse.explain.faithfulness import image_deletion, text_deletion  # noqa: E402
from clinfuse.inference import Model  # noqa: E402
from clinfuse.training.trainer import train  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--cohort")
    ap.add_argument("--studies", type=int, default=8)
    args = ap.parse_args(argv)
    tmp = None
    if not args.model:
        tmp = tempfile.TemporaryDirectory()
        d = Path(tmp.name)
        synthesize(d / "e", SynthSpec(studies=200, seed=0, size=128, lateral=0), progress=False)
        build_cohort(d / "e/dicom", d / "e/reports.csv", d / "e/labels.csv", d / "c", progress=False)
        data = load_config(REPO / "configs/tiny.yaml").model_dump(mode="json")
        data["train"]["epochs"] = 2
        train(d / "c", config_from_dict(data), d / "run", progress=False)
        args.model, args.cohort = str(d / "run/best"), str(d / "c")
    m = Model.load(args.model)
    model, tok, cfg, task = m.network, m.tokenizer, m.config, m.task
    rows, info = read_cohort(args.cohort)
    both = [r for r in rows if r["image_present"] and r["report_present"]][: args.studies]
    ds = m.dataset(both)
    xs = [StudyInput.from_item(ds[i]) for i in range(len(ds))]

    def each(fn):
        return lambda: [fn(x) for x in xs]

    with torch.no_grad():
        t_fwd = _time(each(lambda x: model(*x.args())), 20) / len(xs)
    rows_out = [
        ("plain forward pass (baseline)", t_fwd),
        ("Shapley of the modalities (4 subsets, 1 batch)", _time(each(lambda x: modality_shapley(model, x, 0, task)), 2) / len(xs)),
        ("explain_study: forward + Shapley + joint IG, 32 steps, 1 batch", _time(each(lambda x: explain_study(model, x, task=task, tokenizer=tok)), 1) / len(xs)),
        ("IG joint, 32 steps in batches of 8", _time(each(lambda x: explain_study(model, x, task=task, tokenizer=tok, internal_batch_size=8)), 1) / len(xs)),
        ("Grad-CAM image + IG report", _time(each(lambda x: explain_study(model, x, task=task, tokenizer=tok, image_method="gradcam")), 1) / len(xs)),
        ("Occlusion image + IG report", _time(each(lambda x: explain_study(model, x, task=task, tokenizer=tok, image_method="occlusion")), 1) / len(xs)),
    ]

    def full(x):
        a = explain_study(model, x, task=task, tokenizer=tok)
        image_deletion(model, x, a, task)
        text_deletion(model, x, a, task, tok)

    rows_out.append(("full explanation incl. faithfulness curves", _time(each(full), 1) / len(xs)))
    print(f"model {args.model} | {cfg.model.image.name} + {cfg.model.text.name_or_path} at {cfg.data.image_size} | "
          f"{len(xs)} studies | torch threads {torch.get_num_threads()}")
    print(f"{'method':<62} {'s/study':>9} {'x forward':>10}")
    for name, s in rows_out:
        print(f"{name:<62} {s:>9.4f} {s / t_fwd:>10.1f}")
    print(f"IG (image + report, 32 steps) + Shapley: {rows_out[2][1] / t_fwd:.1f} forward-pass equivalents (target < 40)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
