"""Metrics on numpy arrays: discrimination, operating-point metrics, calibration, bootstrap intervals.

Conventions: ``y`` is ``[N]`` 0/1 for one binary output; ``p`` the probability of the positive class.
Multi-label outputs are scored per label; multi-class per class one-vs-rest, plus macro and micro
averages. Operating points and temperatures are fitted on validation only and then applied, unchanged,
to test.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["threshold_metrics", "binary_report", "expected_calibration_error", "brier", "choose_threshold",
           "fit_temperature", "bootstrap_ci", "multi_report", "auroc", "auprc", "auprc_ties_random",
           "recall_at_specificity"]


def _safe(fn, y, p) -> float:
    try:
        if len(np.unique(y)) < 2:
            return float("nan")
        return float(fn(y, p))
    except ValueError:
        return float("nan")


def auroc(y, p) -> float:
    return _safe(roc_auc_score, y, p)


def auprc(y, p) -> float:
    return _safe(average_precision_score, y, p)


def auprc_ties_random(y, p, draws: int = 200, seed: int = 0) -> float:
    """AUPRC with tied scores put in random order, averaged over ``draws`` orders.

    scikit-learn's average precision takes a block of tied scores as one step, which understates a
    score with few distinct values: the Bayes posterior of the synthetic generator takes 9 values, and
    its AUPRC read that way was 0.03 below a trained model's on the same studies (studies/
    synthetic-fusion). This is what a score that breaks the ties arbitrarily gets on average, the fair
    ceiling to compare a continuous model with. Equals :func:`auprc` when no scores tie.
    """
    y, p = np.asarray(y), np.asarray(p, float)
    values = np.unique(p)
    if len(values) == len(p):
        return auprc(y, p)
    gap = float(np.min(np.diff(values))) if len(values) > 1 else 1.0
    rng = np.random.default_rng(seed)
    return float(np.mean([auprc(y, p + 0.5 * gap * rng.random(len(p))) for _ in range(draws)]))


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, F1 and balanced accuracy of ``p >= threshold``."""
    y = np.asarray(y).astype(int)
    pred = np.asarray(p) >= threshold
    tp = float(np.sum(pred & (y == 1)))
    tn = float(np.sum(~pred & (y == 0)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    ppv, npv = _div(tp, tp + fp), _div(tn, tn + fn)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    bal = (sens + spec) / 2 if not (math.isnan(sens) or math.isnan(spec)) else float("nan")
    return {"sensitivity": sens, "specificity": spec, "ppv": ppv, "npv": npv, "f1": f1, "balanced_accuracy": bal,
            "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def brier(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def expected_calibration_error(y, p, bins: int = 15) -> float:
    """ECE with equal-width bins: sum over bins of (bin share) * |mean label - mean probability|."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    if not len(y):
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def choose_threshold(y, p, method: str = "youden", target: float = 0.9) -> float:
    """Operating point on (validation) data.

    - ``youden``: the threshold maximising sensitivity + specificity - 1;
    - ``sensitivity``: the highest threshold whose sensitivity is at least `target`;
    - ``specificity``: the lowest threshold whose specificity is at least `target`.
    Falls back to 0.5 when `y` has one class only.
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0.0, 1.0)  # roc_curve's first threshold is +inf
    if method == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    if method == "sensitivity":
        ok = np.nonzero(tpr >= target)[0]
        return float(thr[ok[0]])
    ok = np.nonzero(1 - fpr >= target)[0]
    return float(thr[ok[-1]])


def fit_temperature(logits: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of ``logits / T`` (fitted on validation)."""
    import torch

    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels))
    if len(z) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        zz = z / log_t.exp()
        if task == "multiclass":
            loss = torch.nn.functional.cross_entropy(zz, y.long())
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(zz, y.double().reshape(zz.shape))
        loss.backward()
        return loss

    opt.step(nll)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 1e-2 < t < 1e2 else 1.0


def bootstrap_ci(y, p, fn, n: int = 1000, seed: int = 0, groups=None) -> tuple[float, float]:
    """Percentile 95% interval of ``fn(y, p)`` over `n` resamples (NaN resamples dropped).

    Args:
        groups: optional ``[N]`` cluster ids (e.g. patients): whole clusters are resampled, so that
            several images of one patient do not pass for independent evidence.
    """
    y, p = np.asarray(y), np.asarray(p)
    if n <= 0 or len(y) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is not None:
        # clusters numbered by first appearance, not by their names: pseudonyms change with the cohort's
        # salt, and sorted pseudonyms gave every rebuild of a cohort other resamples (other intervals)
        _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        inverse = np.argsort(np.argsort(first))[inverse.reshape(-1)]
        order = np.argsort(inverse, kind="stable")  # each cluster's rows, in row order
        members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    vals = []
    for _ in range(n):
        if groups is None:
            i = rng.integers(0, len(y), len(y))
        else:
            i = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        v = fn(y[i], p[i])
        if not math.isnan(v):
            vals.append(v)
    if len(vals) < max(10, n // 10):
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def recall_at_specificity(y, p, spec: float = 0.90) -> float:
    """Sensitivity at the threshold where specificity first reaches `spec` (ranking only, no calibration)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    if y.min() == y.max():
        return float("nan")
    neg = np.sort(p[y == 0])
    thr = neg[int(np.ceil(spec * len(neg))) - 1]  # the smallest threshold with specificity >= spec
    return float((p[y == 1] > thr).mean())


def binary_report(y, p, threshold: float, *, bins: int = 15, n_boot: int = 0, seed: int = 0, groups=None) -> dict:
    """All metrics of one binary output at the given threshold (with 95% intervals when n_boot > 0;
    resampling whole `groups`, e.g. patients, when given)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    out = {"n": int(len(y)), "positives": int(y.sum()), "auroc": auroc(y, p), "auprc": auprc(y, p),
           "brier": brier(y, p), "ece": expected_calibration_error(y, p, bins), "threshold": float(threshold)}
    out.update(threshold_metrics(y, p, threshold))
    if n_boot:
        for name, fn in (("auroc", auroc), ("auprc", auprc)):
            lo, hi = bootstrap_ci(y, p, fn, n_boot, seed, groups)
            out[f"{name}_ci95"] = [lo, hi]
        lo, hi = bootstrap_ci(y, p, lambda a, b: threshold_metrics(a, b, threshold)["sensitivity"], n_boot, seed,
                              groups)
        out["sensitivity_ci95"] = [lo, hi]
        lo, hi = bootstrap_ci(y, p, lambda a, b: threshold_metrics(a, b, threshold)["specificity"], n_boot, seed,
                              groups)
        out["specificity_ci95"] = [lo, hi]
    return out


def multi_report(y: np.ndarray, probs: np.ndarray, task: str, names: list[str], thresholds: list[float], *,
                 bins: int = 15, n_boot: int = 0, seed: int = 0, groups=None) -> dict:
    """Per-output reports plus macro and micro AUROC/AUPRC.

    Args:
        y: ``[N, K]`` 0/1 (binary, multi-label) or ``[N]`` class indices (multi-class).
        probs: ``[N, K]`` probabilities.
    """
    probs = np.asarray(probs, float)
    if task == "multiclass":
        onehot = np.eye(probs.shape[1], dtype=int)[np.asarray(y).astype(int)]
    else:
        onehot = np.asarray(y).astype(int).reshape(len(probs), -1)
    per = {n: binary_report(onehot[:, k], probs[:, k], thresholds[k], bins=bins, n_boot=n_boot, seed=seed,
                              groups=groups)
           for k, n in enumerate(names)}
    out = {"per_output": per}
    if len(names) > 1:
        out["macro"] = {m: float(np.nanmean([per[n][m] for n in names])) for m in
                        ("auroc", "auprc", "sensitivity", "specificity", "f1", "balanced_accuracy", "ece", "brier")}
        out["micro"] = {"auroc": auroc(onehot.ravel(), probs.ravel()), "auprc": auprc(onehot.ravel(), probs.ravel())}
        if task == "multiclass":
            out["accuracy"] = float((probs.argmax(1) == np.asarray(y)).mean())
    return out
