"""Bayes-optimal AUROC/AUPRC of the synthetic generator: image alone, report alone, both.

The ceiling every fused model on a synthetic cohort is measured against (issues 3, 6, 7).
Usage: python studies/synthetic_ceiling/run.py [--studies N] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import tempfile

import numpy as np
from sklearn.metrics import roc_auc_score

from clinfuse.data.synth import SynthSpec, synthesize
from clinfuse.evaluation.metrics import auprc_ties_random


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20000, help="studies synthesized per prevalence (default 20,000)")
    ap.add_argument("--seed", type=int, default=0, help="synthesis seed")
    ap.add_argument("--prevalence", type=float, nargs="+", default=[0.3, 0.05],
                    help="shares of positive studies, one cohort each (default 0.3 0.05)")
    args = ap.parse_args(argv)
    print(f"studies={args.studies} seed={args.seed} (images at 32 px: the ceiling does not depend on size)")
    print("AUPRC with tied posteriors in random order (auprc_ties_random, 50 orders)")
    print(f"{'prevalence':>10} {'modality':>8} {'AUROC':>7} {'AUPRC':>7}")
    for prev in args.prevalence:
        with tempfile.TemporaryDirectory() as d:
            synthesize(d, SynthSpec(studies=args.studies, seed=args.seed, size=32, prevalence=prev,
                                    missing_image=0, missing_report=0, lateral=0), progress=False)
            with open(f"{d}/truth.csv", newline="") as f:
                rows = list(csv.DictReader(f))
        y = np.array([int(r["y_pneumonia"]) for r in rows])
        for which in ("image", "report", "both"):
            p = [float(r[f"p_{which}_label"]) for r in rows]
            print(f"{prev:>10} {which:>8} {roc_auc_score(y, p):>7.4f} {auprc_ties_random(y, p, draws=50):>7.4f}")


if __name__ == "__main__":
    main()
