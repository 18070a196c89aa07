"""Comparing a model with the Bayes-optimal answers of a synthetic cohort (``truth.csv``).

``truth.csv`` is keyed by the export's original key; the cohort's ``private/key_map.csv`` maps the
cohort's study ids to it. For each missingness pattern, the ceiling is the Bayes posterior given the
modalities the study has (``p_available_*``); for studies with both modalities scored with one
hidden, it is the posterior given the other (``p_image_*`` / ``p_report_*``). The posterior takes few
distinct values, so its AUPRC is read with the ties in random order (:func:`auprc_ties_random`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .metrics import auprc, auprc_ties_random, auroc

__all__ = ["bayes_comparison", "format_bayes_table", "truth_rows"]

SMALL_SUBSET = 30  # studies; below this a subset's ratio to the Bayes AUROC is flagged as noise


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def truth_rows(truth_csv: str | Path, cohort_dir: str | Path, study_ids) -> list[dict]:
    """The ``truth.csv`` row of each cohort study id, joined through ``private/key_map.csv``."""
    key_rows = _read(Path(cohort_dir) / "private" / "key_map.csv")
    key_col = [c for c in key_rows[0] if c != "study_id"][0]
    key_of = {r["study_id"]: r[key_col] for r in key_rows}
    truth = {r[key_col]: r for r in _read(Path(truth_csv))}
    return [truth[key_of[s]] for s in study_ids]


def bayes_comparison(truth_csv: str | Path, cohort_dir: str | Path, predictions: dict, output: str = "label") -> list[dict]:
    """Rows of (subset, n, model AUROC/AUPRC, Bayes AUROC/AUPRC) for one binary output.

    Args:
        truth_csv: the synthetic export's truth.csv.
        cohort_dir: the cohort built from that export (its private/key_map.csv joins the two).
        predictions: ``{"study_id": [...], "p": [...], "y": [...], "image_present": [...], "text_present": [...],
            "p_image_hidden": [...], "p_report_hidden": [...]}`` on the test split.
        output: the truth column suffix (``label`` for binary exports).
    """
    t = truth_rows(truth_csv, cohort_dir, predictions["study_id"])
    y = np.asarray(predictions["y"]).astype(int)
    p = np.asarray(predictions["p"], float)
    ip = np.asarray(predictions["image_present"], bool)
    tp = np.asarray(predictions["text_present"], bool)
    bayes_avail = np.array([float(r[f"p_available_{output}"]) for r in t])
    out = []

    def add(name, mask, model_p, bayes_p):
        if mask.sum() and 0 < y[mask].sum() < mask.sum():
            out.append({"subset": name, "n": int(mask.sum()), "positives": int(y[mask].sum()),
                        "model_auroc": auroc(y[mask], model_p[mask]), "bayes_auroc": auroc(y[mask], bayes_p[mask]),
                        "model_auprc": auprc(y[mask], model_p[mask]), "bayes_auprc": auprc_ties_random(y[mask], bayes_p[mask])})

    every = np.ones_like(ip)
    add("all (modalities as present)", every, p, bayes_avail)
    add("both present", ip & tp, p, bayes_avail)
    add("image only", ip & ~tp, p, bayes_avail)
    add("report only", ~ip & tp, p, bayes_avail)
    both = ip & tp
    if "p_report_hidden" in predictions:
        add("both present, report hidden", both, np.asarray(predictions["p_report_hidden"], float),
            np.array([float(r[f"p_image_{output}"]) for r in t]))
    if "p_image_hidden" in predictions:
        add("both present, image hidden", both, np.asarray(predictions["p_image_hidden"], float),
            np.array([float(r[f"p_report_{output}"]) for r in t]))
    for r in out:
        r["auroc_gap"] = r["bayes_auroc"] - r["model_auroc"]
        r["auroc_ratio"] = r["model_auroc"] / r["bayes_auroc"] if r["bayes_auroc"] else float("nan")
    return out


def format_bayes_table(rows: list[dict]) -> str:
    head = (f"{'subset':<30} {'n':>5} {'pos':>4} {'AUROC':>7} {'Bayes':>7} {'% of Bayes':>10} "
            f"{'AUPRC':>7} {'Bayes':>7}")
    lines = [head, "-" * len(head)]
    small = False
    for r in rows:
        mark = "*" if r["n"] < SMALL_SUBSET else " "
        small |= mark == "*"
        lines.append(f"{r['subset']:<30} {r['n']:>5} {r['positives']:>4} {r['model_auroc']:>7.3f} {r['bayes_auroc']:>7.3f} "
                     f"{100 * r['auroc_ratio']:>9.1f}%{mark}{r['model_auprc']:>7.3f} {r['bayes_auprc']:>7.3f}")
    if small:
        lines.append(f"* fewer than {SMALL_SUBSET} studies: the ratio is mostly sampling noise (it can exceed 100%)")
    return "\n".join(lines)
