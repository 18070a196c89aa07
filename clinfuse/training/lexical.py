"""Fitting the lexical branch (:class:`clinfuse.models.lexical.LexicalHead`) on a cohort's training reports:
scikit-learn's TF-IDF weighting and one logistic regression per output, after the network is trained."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import ClinfuseError

__all__ = ["choose_weight", "fit_lexical", "WEIGHTS"]

WEIGHTS = tuple(i / 10 for i in range(11))  # the blend weights weight: auto chooses from


def _tfidf(counts, min_df: int):
    """idf ``[F]`` (sklearn's smooth idf, 0 below `min_df`) and the L2-normalised TF-IDF rows of sparse `counts`."""
    import scipy.sparse as sp

    n = counts.shape[0]
    df = np.asarray((counts > 0).sum(0)).ravel()
    idf = np.log((1 + n) / (1 + df)) + 1
    idf[df < min_df] = 0
    x = counts.astype(np.float64).tocsr(copy=True)
    x.data = 1 + np.log(x.data)
    x = x.multiply(idf[None]).tocsr()
    norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    norm[norm == 0] = 1
    return idf, sp.diags(1 / norm) @ x


def fit_lexical(model, rows: list[dict], *, batch_size: int = 256, log=None) -> dict:
    """Fit the lexical branch of a :class:`clinfuse.Model` on cohort rows (the training split) and
    mark it fitted; the caller saves the model. Rows without a report are skipped.

    Returns a summary: reports used, features used, seconds.

    Raises:
        ClinfuseError: the model has no lexical branch, or no training row has a report.
    """
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    from ..data.dataset import label_tensor
    from ..data.tokens import tokenize_reports

    head = getattr(model.network, "lexical", None)
    if head is None:
        raise ClinfuseError("this model has no lexical branch (model.text.lexical.enabled was false when it was built)")
    t0 = time.time()
    cfg = model.config.model.text
    lc = cfg.lexical
    rows = [r for r in rows if (r.get("report") or "").strip()]
    if not rows:
        raise ClinfuseError("the lexical branch is fitted on the training split's reports, and none has a report; "
                            "set model.text.lexical.enabled: false")
    parts = []
    for i in range(0, len(rows), batch_size):
        ids, mask = tokenize_reports(model.tokenizer, [r["report"] for r in rows[i: i + batch_size]], cfg)
        c = head.counts(ids, mask)
        nz = c.nonzero(as_tuple=True)
        parts.append(sp.csr_matrix((c[nz].numpy(), (nz[0].numpy(), nz[1].numpy())), shape=tuple(c.shape)))
    counts = sp.vstack(parts).tocsr()
    some = np.asarray(counts.sum(1)).ravel() > 0  # a report of specials only has no feature
    keep = [r for r, k in zip(rows, some) if k]
    counts = counts[some]
    idf, x = _tfidf(counts, lc.min_df)
    info = model.info()
    y = label_tensor(keep, info).numpy()
    n_out = head.coef.shape[0]
    coef = np.zeros((n_out, head.n_features))
    bias = np.zeros(n_out)
    cw = None if lc.class_weight == "none" else "balanced"
    if info["task"] == "multiclass":
        classes = np.unique(y)
        if len(classes) > 1:
            lr = LogisticRegression(C=lc.C, max_iter=2000, class_weight=cw).fit(x, y)
            if len(classes) == 2:  # scikit-learn returns one row for two classes: logit of the second
                coef[classes[1]], bias[classes[1]] = lr.coef_[0], lr.intercept_[0]
            else:
                coef[classes], bias[classes] = lr.coef_, lr.intercept_
    else:
        y = y.reshape(len(keep), -1)
        for k in range(n_out):
            if y[:, k].min() == y[:, k].max():
                continue  # one class only in training: the branch says nothing about this output
            lr = LogisticRegression(C=lc.C, max_iter=2000, class_weight=cw).fit(x, y[:, k])
            coef[k], bias[k] = lr.coef_[0], lr.intercept_[0]
    dev = head.coef.device
    head.idf.copy_(torch.as_tensor(idf, dtype=torch.float32, device=dev))
    head.coef.copy_(torch.as_tensor(coef, dtype=torch.float32, device=dev))
    head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32, device=dev))
    head.fitted.fill_(True)
    summary = {"fitted_on": "train", "n_reports": len(keep), "n_features": int((idf > 0).sum()),
               "seconds": round(time.time() - t0, 1)}
    model.meta["lexical"] = summary
    if log is not None:
        log(f"lexical branch: fitted on {len(keep)} training reports, {summary['n_features']} features, "
            f"{summary['seconds']:.1f} s")
    return summary


def choose_weight(model, rows: list[dict], *, metric: str = "auroc", log=None) -> dict:
    """Choose the blend weight of a fitted lexical branch on validation rows and store it in the model
    (the caller saves it): the weight of :data:`WEIGHTS` with the best validation macro AUROC
    (``metric='auroc'``) or the lowest log loss (``'loss'``), ties to the smaller weight, so 0 (the
    network alone) wins wherever the branch adds nothing. Rows without a report score the same at every
    weight. Without rows, or where the metric is undefined (one class only), the weight stays as it is.

    Returns what was chosen: weight, metric, the score of each weight, validation studies used.
    """
    import torch.nn.functional as F

    from ..inference.run import predict_rows
    from .trainer import _auroc

    head = getattr(model.network, "lexical", None)
    if head is None or not head.is_fitted:
        raise ClinfuseError("choose_weight needs a fitted lexical branch (fit_lexical first)")
    kept = head.blend
    summary = {"weight": kept, "chosen_on": None, "metric": metric, "n_val": len(rows), "scores": {}}
    if rows:
        try:  # the blend is linear in the weight: the two ends give every weight between
            head.weight.fill_(0.0)
            net = predict_rows(model, rows)
            head.weight.fill_(1.0)
            lex = predict_rows(model, rows)["logits"]
        finally:
            head.weight.fill_(kept)
        task, y = model.task, net["labels"]
        best = None
        for w in WEIGHTS:
            logits = (1 - w) * net["logits"] + w * lex
            if metric == "loss":
                lt, yt = torch.from_numpy(logits).float(), torch.from_numpy(y)
                score = -float(F.cross_entropy(lt, yt.long()) if task == "multiclass" else
                               F.binary_cross_entropy_with_logits(lt, yt.float().reshape(lt.shape)))
            else:
                score = _auroc(y if task == "multiclass" else y.reshape(len(y), -1), logits, task)
            if np.isfinite(score):
                summary["scores"][f"{w:.1f}"] = round(score, 6)
                if best is None or score > best[1] + 1e-9:
                    best = (w, score)
        if best is not None:
            summary.update(weight=best[0], chosen_on="val")
            head.weight.fill_(best[0])
    model.meta.setdefault("lexical", {})["blend"] = summary
    if log is not None:
        how = (f"chosen on {len(rows)} validation studies by {metric}" if summary["chosen_on"] else
               "no validation split to choose it on" if not rows else f"validation {metric} undefined")
        log(f"lexical branch: blend weight {summary['weight']:.1f} ({how})")
    return summary
