"""Evaluation plots (matplotlib, Agg backend): ROC, PR, reliability, confusion matrix, AUROC by pattern."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_plots"]


def write_plots(out_dir: Path, y: np.ndarray, probs: np.ndarray, task: str, names: list[str],
                thresholds: list[float], result: dict, bins: int = 15) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    onehot = np.eye(probs.shape[1], dtype=int)[y] if task == "multiclass" else np.asarray(y).reshape(len(probs), -1)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    for k, n in enumerate(names):
        if len(np.unique(onehot[:, k])) < 2:
            continue
        fpr, tpr, _ = roc_curve(onehot[:, k], probs[:, k])
        prec, rec, _ = precision_recall_curve(onehot[:, k], probs[:, k])
        rep = result["overall"]["per_output"][n]
        ax[0].plot(fpr, tpr, label=f"{n} (AUROC {rep['auroc']:.3f})")
        ax[1].plot(rec, prec, label=f"{n} (AUPRC {rep['auprc']:.3f})")
        ax[0].scatter([1 - rep["specificity"]], [rep["sensitivity"]], marker="o")
    ax[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (dot: operating point)")
    ax[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
    for a in ax:
        a.legend(fontsize=8)
    save(fig, "roc_pr.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    edges = np.linspace(0, 1, bins + 1)
    for k, n in enumerate(names):
        idx = np.minimum((probs[:, k] * bins).astype(int), bins - 1)
        xs, ys = [], []
        for b in range(bins):
            m = idx == b
            if m.sum() >= 3:
                xs.append(probs[m, k].mean())
                ys.append(onehot[m, k].mean())
        ax.plot(xs, ys, "o-", label=f"{n} (ECE {result['overall']['per_output'][n]['ece']:.3f})")
    ax.plot(edges, edges, "k--", lw=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability (bins with >= 3)")
    ax.legend(fontsize=8)
    save(fig, "reliability.png")

    k = 0 if task != "multiclass" else None
    fig, ax = plt.subplots(figsize=(4, 3.6))
    if task == "multiclass":
        pred, true = probs.argmax(1), np.asarray(y)
        cm = np.zeros((len(names), len(names)), int)
        for a, b in zip(true, pred):
            cm[a, b] += 1
        labels = names
    else:
        pred = probs[:, k] >= thresholds[k]
        true = onehot[:, k].astype(bool)
        cm = np.array([[np.sum(~true & ~pred), np.sum(~true & pred)], [np.sum(true & ~pred), np.sum(true & pred)]])
        labels = ["neg", f"pos ({names[k]})"]
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title="Confusion (at operating point)")
    save(fig, "confusion.png")

    subsets = [("all", result["overall"])] + [(f"{p}", r) for p, r in result["by_pattern"].items()] + \
        [(h.split(" (")[0], r) for h, r in result["hidden"].items()]
    vals = [r.get("macro", next(iter(r["per_output"].values())))["auroc"] for _, r in subsets]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.barh([s for s, _ in subsets][::-1], vals[::-1], color="#4c72b0")
    for i, v in enumerate(vals[::-1]):
        ax.text(v + 0.005, i, f"{v:.3f}", va="center", fontsize=8)
    ax.set(xlim=(0.4, 1.02), xlabel="AUROC", title="AUROC by missingness pattern")
    save(fig, "by_pattern.png")
    return written
