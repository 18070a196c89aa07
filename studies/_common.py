"""Helpers the study scripts share: test-split predictions, bootstrap cells, table printing.

Kept out of the package on purpose: these are the studies' reading of results, not library API.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clinfuse.data.cohort import read_cohort  # noqa: E402
from clinfuse.evaluation.metrics import auprc, auprc_ties_random, auroc, bootstrap_ci, recall_at_specificity  # noqa: E402
from clinfuse.inference import Model  # noqa: E402


def split_rows(cohort: Path, split: str) -> tuple[list[dict], dict]:
    rows, info = read_cohort(cohort)
    return [r for r in rows if r["split"] == split], info


def labels_of(rows: list[dict], info: dict) -> np.ndarray:
    """``[N, K]`` 0/1 labels of cohort rows (binary: K = 1)."""
    from clinfuse.data.dataset import label_tensor

    return label_tensor(rows, info).numpy().astype(int).reshape(len(rows), -1)


def model_predictions(model_dir: Path, cohort: Path, split: str = "test", hide: str | None = None):
    """(y [N, K], p [N, K], patient ids, rows) for a saved model on a split, with its stored temperature."""
    from clinfuse.evaluation.evaluate import predict_split

    model = Model.load(model_dir)
    rows, _ = split_rows(cohort, split)
    out = predict_split(model, cohort, split, batch_size=64, hide=hide, rows=rows)
    p = model.probabilities(out["logits"])
    y = out["labels"].reshape(len(p), -1).astype(int)
    return y, p, [r["patient_id"] for r in rows], rows


def cell(fn, y, p, groups, n_boot: int, seed: int = 0) -> str:
    """``0.912 [0.871, 0.944]``: the metric with a 95% bootstrap interval over patients."""
    if y.min() == y.max():
        return "n/a (one class)"
    lo, hi = bootstrap_ci(y, p, fn, n_boot, seed, groups)
    return f"{fn(y, p):.3f} [{lo:.3f}, {hi:.3f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


__all__ = ["split_rows", "labels_of", "model_predictions", "cell", "table", "auroc", "auprc", "auprc_ties_random", "recall_at_specificity",
           "bootstrap_ci"]
