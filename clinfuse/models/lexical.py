"""The lexical branch of the report path: TF-IDF of the report's tokens through a logistic regression.

On real reports a bag of words is hard to beat (docs/studies.md, Open-I question 5: TF-IDF + logistic
regression ahead of fine-tuned MiniLM on the findings' macro AUPRC over five splits), and the mean of the
two beats either. :class:`LexicalHead` brings that inside the model: it reads the same ``input_ids`` the
encoder reads (the tokenizer's word pieces, and their adjacent pairs hashed into buckets), weighs them by
TF-IDF (sublinear tf, idf from the training split, L2-normalised) and applies one linear map per output.
Its weights are fitted after the network is trained, by :func:`fit_lexical` (scikit-learn's logistic
regression on the training split), and stored as buffers in ``model.safetensors``. Until it is fitted it
adds nothing, so training is exactly what it is without it.

No new vocabulary is stored: the features are the tokenizer's ids and hashed pairs of them, so the branch
ships no string that the tokenizer does not already ship (what the PHI guard screens).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..config import LexicalConfig
from ..errors import ClinfuseError

__all__ = ["LexicalHead", "fit_lexical", "body_mask"]

_PRIME = 1000003


def body_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The report's own tokens of ``[.., L]`` chunks laid out as ``[CLS] tokens [SEP] pad``
    (:func:`clinfuse.data.tokens.tokenize_reports`): the mask without each chunk's first and last token."""
    m = attention_mask.bool()
    nxt = torch.zeros_like(m)
    nxt[..., :-1] = m[..., 1:]
    body = m & nxt  # the last present token ([SEP]) has no present successor
    body[..., 0] = False  # [CLS]
    return body


class LexicalHead(nn.Module):
    """TF-IDF of token ids (+ hashed bigrams) -> logits ``[B, C]``; zero and unused until fitted.

    Args:
        cfg: the lexical settings (``model.text.lexical``).
        vocab_size: the tokenizer's vocabulary size (ids at or above it are folded into it).
        n_outputs: the model's outputs.
    """

    def __init__(self, cfg: LexicalConfig, vocab_size: int, n_outputs: int):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.buckets = int(cfg.buckets) if cfg.bigrams else 0
        self.n_features = self.vocab_size + self.buckets
        self.blend = float(cfg.weight)
        self.register_buffer("idf", torch.zeros(self.n_features))
        self.register_buffer("coef", torch.zeros(n_outputs, self.n_features))
        self.register_buffer("bias", torch.zeros(n_outputs))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def occurrences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Feature ids ``[B, T]`` and their validity ``[B, T]`` of each token and adjacent pair (T = K*L + K*(L-1))."""
        b = input_ids.shape[0]
        body = body_mask(attention_mask)
        ids = input_ids.clamp(0, self.vocab_size - 1)
        feats, valid = [ids.reshape(b, -1)], [body.reshape(b, -1)]
        if self.buckets:
            pair = (input_ids[..., :-1].long() * _PRIME + input_ids[..., 1:].long()) % self.buckets + self.vocab_size
            feats.append(pair.reshape(b, -1))
            valid.append((body[..., :-1] & body[..., 1:]).reshape(b, -1))
        return torch.cat(feats, 1), torch.cat(valid, 1)

    def counts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw feature counts ``[B, F]``."""
        feat, valid = self.occurrences(input_ids, attention_mask)
        out = torch.zeros(feat.shape[0], self.n_features, dtype=torch.float32, device=feat.device)
        return out.scatter_add_(1, feat, valid.float())

    def vector(self, counts: torch.Tensor) -> torch.Tensor:
        """TF-IDF ``[B, F]``: (1 + log tf) * idf, L2-normalised per report."""
        tf = torch.where(counts > 0, 1 + torch.log(counts.clamp(min=1)), torch.zeros_like(counts)) * self.idf
        return tf / tf.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # -> [B, C]
        x = self.vector(self.counts(input_ids, attention_mask))
        return x @ self.coef.T.to(x.dtype) + self.bias.to(x.dtype)

    @torch.no_grad()
    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: int) -> torch.Tensor:
        """What each token adds to the blended logit of `target`, ``[B, K, L]``: a feature's term
        (coefficient x TF-IDF value) shared equally by its occurrences, a pair's half to each of its two
        tokens, times the blend weight. The scores sum to the branch's blended logit less its bias."""
        b, k, length = input_ids.shape
        counts = self.counts(input_ids, attention_mask)
        term = self.vector(counts) * self.coef[target]  # [B, F]
        feat, valid = self.occurrences(input_ids, attention_mask)
        per = term.gather(1, feat) / counts.gather(1, feat).clamp(min=1) * valid  # [B, T]
        n = k * length
        scores = per[:, :n].reshape(b, k, length).clone()
        if self.buckets:
            pair = per[:, n:].reshape(b, k, length - 1) / 2
            scores[..., :-1] += pair
            scores[..., 1:] += pair
        return scores * self.blend


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
    keep = [r for r, n in zip(rows, np.asarray(counts.sum(1)).ravel()) if n > 0]
    counts = counts[np.asarray(counts.sum(1)).ravel() > 0]
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
