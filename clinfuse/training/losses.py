"""Losses for binary, multi-class and multi-label targets, with class-imbalance handling.

Targets: binary ``[B, 1]`` float, multi-label ``[B, K]`` float (sigmoid losses); multi-class ``[B]``
long (softmax losses). Weights come from the training labels:

- ``inverse``: sigmoid: ``pos_weight = n_neg / n_pos``; softmax: ``w_c ∝ 1 / n_c``.
- ``effective``: Cui et al. 2019, effective number ``E_n = (1 - beta^n) / (1 - beta)``; sigmoid:
  ``pos_weight = E_neg / E_pos``; softmax: ``w_c ∝ 1 / E_{n_c}``. Softmax weights are scaled to
  average 1 over classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig

__all__ = ["build_loss", "class_weights", "FocalLoss", "LogitAdjustedLoss", "list_losses"]


def list_losses() -> list[str]:
    return ["bce", "ce", "focal", "logit_adjusted"]


def _effective(n: torch.Tensor, beta: float) -> torch.Tensor:
    return (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n.double())) / (1.0 - beta)


def class_weights(labels: torch.Tensor, task: str, scheme: str, beta: float = 0.999,
                  n_classes: int | None = None) -> torch.Tensor | None:
    """Sigmoid tasks: ``pos_weight [K]``; multi-class: per-class weights ``[C]``; None for scheme 'none'.

    Args:
        labels: training labels, ``[N, K]`` (sigmoid) or ``[N]`` (multi-class).
        task: 'binary', 'multilabel' or 'multiclass'.
        scheme: 'none', 'inverse' or 'effective'.
    """
    if scheme == "none":
        return None
    if task == "multiclass":
        counts = torch.bincount(labels.long(), minlength=n_classes or int(labels.max()) + 1).double().clamp(min=1)
        w = 1.0 / counts if scheme == "inverse" else 1.0 / _effective(counts, beta)
        return (w / w.mean()).float()
    pos = labels.double().sum(0).clamp(min=1)
    neg = (labels.shape[0] - labels.double().sum(0)).clamp(min=1)
    if scheme == "inverse":
        return (neg / pos).float()
    return (_effective(neg, beta) / _effective(pos, beta)).float()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): sigmoid for binary/multi-label, softmax for multi-class.

    ``weight``: sigmoid: pos_weight applied to the positive term; softmax: per-class weights.
    """

    def __init__(self, task: str, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.task, self.gamma = task, gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "multiclass":
            logp = F.log_softmax(logits.float(), dim=-1)
            logp_t = logp.gather(1, target[:, None]).squeeze(1)
            loss = -((1 - logp_t.exp()) ** self.gamma) * logp_t
            if self.weight is not None:
                w = self.weight[target]
                return (loss * w).sum() / w.sum()
            return loss.mean()
        logits, target = logits.float(), target.float()
        p = torch.sigmoid(logits)
        pos = -target * (1 - p) ** self.gamma * F.logsigmoid(logits)
        neg = -(1 - target) * p**self.gamma * F.logsigmoid(-logits)
        if self.weight is not None:
            pos = pos * self.weight
        return (pos + neg).mean()


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted loss (Menon et al. 2021): train on ``logits + tau * log prior``; predict with raw logits.

    Sigmoid tasks use the log prior odds ``log(pi / (1 - pi))`` per label.
    """

    def __init__(self, task: str, prior: torch.Tensor, tau: float = 1.0):
        super().__init__()
        self.task = task
        prior = prior.double().clamp(1e-6, 1 - 1e-6)
        adj = prior.log() if task == "multiclass" else (prior / (1 - prior)).log()
        self.register_buffer("adjust", (tau * adj).float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits.float() + self.adjust
        if self.task == "multiclass":
            return F.cross_entropy(z, target)
        return F.binary_cross_entropy_with_logits(z, target.float())


class _BCE(nn.Module):
    def __init__(self, pos_weight):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=self.pos_weight)


class _CE(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits, target):
        return F.cross_entropy(logits.float(), target, weight=self.weight)


def build_loss(cfg: LossConfig, task: str, train_labels: torch.Tensor, n_outputs: int) -> nn.Module:
    """The loss named in `cfg`, with weights or priors from the training labels.

    'bce' and 'ce' name the same weighted loss; the one that fits the task is used (sigmoid for
    binary/multi-label, softmax for multi-class).
    """
    weight = class_weights(train_labels, task, cfg.class_weights, cfg.beta, n_outputs)
    if cfg.name in ("bce", "ce"):
        return _CE(weight) if task == "multiclass" else _BCE(weight)
    if cfg.name == "focal":
        return FocalLoss(task, cfg.gamma, weight)
    if task == "multiclass":
        prior = torch.bincount(train_labels.long(), minlength=n_outputs).double() / len(train_labels)
    else:
        prior = train_labels.double().mean(0)
    return LogitAdjustedLoss(task, prior, cfg.tau)
