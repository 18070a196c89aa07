"""Class imbalance at low prevalence: does the default loss beat unweighted BCE?

For each seed: one synthetic cohort (prevalence --prevalence, default 0.05), then one training run per condition with the
same data and seed; the best-on-validation model is scored on the test split. Minority recall is read
at matched specificity (the test threshold where each model's specificity is 0.90), so a different
calibration cannot pass for better ranking.

Each seed also prints the limit: the Bayes-optimal posterior of the generator (truth.csv, given the
modalities each test study has) scored the same way, so "no option learns" can be told from "nothing
is there to learn".

Usage: python studies/imbalance/run.py [--studies 3000] [--prevalence 0.05] [--seeds 0 1 2] [--out runs/imbalance]
           [--conditions TEXT ...] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort  # noqa: E402
from clinfuse.evaluation.bayes import truth_rows  # noqa: E402
from clinfuse.evaluation.evaluate import predict_split  # noqa: E402
from clinfuse.inference import Model  # noqa: E402
from clinfuse.data.synth import SynthSpec, synthesize  # noqa: E402
from clinfuse.evaluation.metrics import auprc_ties_random, recall_at_specificity  # noqa: E402
from clinfuse.models.model import probabilities  # noqa: E402
from clinfuse.training.trainer import train  # noqa: E402

CONDITIONS = {
    "bce unweighted (baseline)": ["loss.name=bce", "loss.class_weights=none"],
    "bce effective-number weights": ["loss.name=bce", "loss.class_weights=effective"],
    "bce inverse-frequency weights": ["loss.name=bce", "loss.class_weights=inverse"],
    "focal (gamma 2, effective weights)": ["loss.name=focal", "loss.class_weights=effective"],
    "focal unweighted (gamma 2)": ["loss.name=focal", "loss.class_weights=none"],
    "logit adjusted (tau 1)": ["loss.name=logit_adjusted", "loss.class_weights=none"],
    "balanced sampler + bce unweighted": ["loss.name=bce", "loss.class_weights=none", "loss.sampler=balanced"],
}


LIMIT = "bayes-optimal (the limit)"


def metrics(y, p, auprc=average_precision_score) -> dict:
    y = np.asarray(y).astype(int)
    return {"auroc": roc_auc_score(y, p), "auprc": auprc(y, p), "recall@spec0.90": recall_at_specificity(y, p),
            "test_pos": int(y.sum()), "test_n": len(y)}


def score(model_dir: Path, cohort: Path) -> tuple[dict, list[str], np.ndarray]:
    """The model's metrics on the test split, and the split's study ids and labels (the limit's studies)."""
    out = predict_split(Model.load(model_dir), cohort, "test", batch_size=64)
    y = out["labels"][:, 0]
    p = probabilities(torch.from_numpy(out["logits"]), "binary").numpy()[:, 0]
    return metrics(y, p), list(out["study_id"]), y


def limit(truth_csv: Path, cohort: Path, study_ids: list[str], y) -> dict:
    """The generator's posterior given each test study's modalities, scored like a model. It takes few
    distinct values, so its AUPRC is read with ties in random order and its recall at the threshold
    where specificity reaches 0.90 counts tied studies as below it (a lower bound)."""
    p = np.array([float(r["p_available_label"]) for r in truth_rows(truth_csv, cohort, study_ids)])
    return metrics(y, p, auprc_ties_random)


def line(seed: int, name: str, r: dict) -> str:
    return (f"seed {seed}  {name:<42} AUROC {r['auroc']:.3f}  AUPRC {r['auprc']:.3f}  "
            f"recall@spec0.90 {r['recall@spec0.90']:.3f}  (test {r['test_pos']}/{r['test_n']} positive)"
            + (f"  {r['seconds']} s" if "seconds" in r else ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=3000, help="studies per synthetic cohort (default 3,000)")
    ap.add_argument("--prevalence", type=float, default=0.05,
                    help="share of positive studies in each synthetic cohort (default %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="one cohort per seed; every condition trains on it with that seed")
    ap.add_argument("--out", default="runs/imbalance", help="working folder (default: %(default)s)")
    ap.add_argument("--conditions", nargs="+", metavar="TEXT",
                    help="run only the conditions whose name contains one of these texts")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="config overrides for every condition, e.g. train.epochs=4 (printed with the table)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    conditions = {k: v for k, v in CONDITIONS.items()
                  if not args.conditions or any(c in k for c in args.conditions)}
    results: dict[str, list[dict]] = {c: [] for c in conditions}
    results[LIMIT] = []
    for seed in args.seeds:
        exp, coh = out / f"seed{seed}/export", out / f"seed{seed}/cohort"
        if not (coh / "cohort.json").is_file():
            synthesize(exp, SynthSpec(studies=args.studies, prevalence=args.prevalence, seed=seed, size=96), progress=False)
            build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", coh,
                         load_config(HERE / "config.yaml", [f"cohort.split.seed={seed}"]), progress=False)
        for name, overrides in conditions.items():
            run = out / f"seed{seed}" / name.split(" (")[0].replace(" ", "_").replace("+", "and")
            cfg = load_config(HERE / "config.yaml", overrides + args.overrides + [f"train.seed={seed}"])
            t0 = time.perf_counter()
            train(coh, cfg, run, progress=False)
            r, test_ids, test_y = score(run / "best", coh)
            r["seconds"] = round(time.perf_counter() - t0)
            results[name].append(r)
            print(line(seed, name, r), flush=True)
        if conditions:
            results[LIMIT].append(limit(exp / "truth.csv", coh, test_ids, test_y))
            print(line(seed, LIMIT, results[LIMIT][-1]), flush=True)
    print(f"\nstudies={args.studies} prevalence={args.prevalence} seeds={args.seeds} "
          f"overrides={args.overrides or 'none'}; mean ± sd over seeds")
    base = "bce unweighted (baseline)"
    print(f"{'condition':<42} {'AUROC':>13} {'AUPRC':>13} {'recall@spec0.90':>17}")
    for name, rs in results.items():
        if not rs:
            continue
        cells = []
        for k in ("auroc", "auprc", "recall@spec0.90"):
            v = np.array([r[k] for r in rs])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        print(f"{name:<42} {cells[0]:>13} {cells[1]:>13} {cells[2]:>17}")
    if base in results:
        print(f"\npaired differences against {base} (per seed; wins = seeds where the condition is higher)")
        for name, rs in results.items():
            if name in (base, LIMIT):
                continue
            cells = []
            for k in ("auroc", "auprc", "recall@spec0.90"):
                d = np.array([r[k] for r in rs]) - np.array([r[k] for r in results[base]])
                cells.append(f"{d.mean():+.3f} (wins {int((d > 0).sum())}/{len(d)})")
            print(f"{name:<42} " + "  ".join(f"{c:>20}" for c in cells))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
