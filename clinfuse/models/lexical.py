"""The lexical branch of the report path: TF-IDF of the report's tokens through a logistic regression.

On real reports a bag of words is hard to beat (docs/studies.md, Open-I question 5: TF-IDF + logistic
regression ahead of fine-tuned MiniLM on the findings' macro AUPRC over five splits), and the mean of the
two beats either. :class:`LexicalHead` brings that inside the model: it reads the same ``input_ids`` the
encoder reads (the tokenizer's word pieces, and their adjacent pairs hashed into buckets), weighs them by
TF-IDF (sublinear tf, idf from the training split, L2-normalised) and applies one linear map per output.
Its weights are fitted after the network is trained, by :func:`clinfuse.training.lexical.fit_lexical`
(scikit-learn's logistic regression on the training split), and stored as buffers in ``model.safetensors``.
Until it is fitted it adds nothing, so training is exactly what it is without it.

No new vocabulary is stored: the features are the tokenizer's ids and hashed pairs of them, so the branch
ships no string that the tokenizer does not already ship (what the PHI guard screens).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LexicalConfig

__all__ = ["LexicalHead", "body_mask"]

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
        self.register_buffer("idf", torch.zeros(self.n_features))
        self.register_buffer("coef", torch.zeros(n_outputs, self.n_features))
        self.register_buffer("bias", torch.zeros(n_outputs))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # the blend weight: chosen on validation by the fit (weight 'auto') or the configured value; a model
        # saved before it was stored keeps the configured one (0.5 then)
        self.register_buffer("weight", torch.tensor(0.5 if cfg.weight == "auto" else float(cfg.weight)))

    @property
    def blend(self) -> float:
        """logits = (1 - blend) * network + blend * lexical where the report is present."""
        return float(self.weight)

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
        return self._count(*self.occurrences(input_ids, attention_mask))

    def _count(self, feat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
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
        feat, valid = self.occurrences(input_ids, attention_mask)
        counts = self._count(feat, valid)
        term = self.vector(counts) * self.coef[target]  # [B, F]
        per = term.gather(1, feat) / counts.gather(1, feat).clamp(min=1) * valid  # [B, T]
        n = k * length
        scores = per[:, :n].reshape(b, k, length).clone()
        if self.buckets:
            pair = per[:, n:].reshape(b, k, length - 1) / 2
            scores[..., :-1] += pair
            scores[..., 1:] += pair
        return scores * self.blend
