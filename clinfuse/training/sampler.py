"""A deterministic, resumable, distributed-aware sampler.

The order of epoch e is a function of (seed, e) only, so a run resumed mid-epoch sees exactly the
batches an uninterrupted run would. Under torchrun each rank takes every world-th index (padded to
equal length, like ``DistributedSampler``). With ``weights`` it draws with replacement in proportion
to them (class-balanced sampling).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "balanced_weights"]


class EpochSampler(Sampler[int]):
    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 weights: torch.Tensor | None = None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world = rank, world_size
        self.weights = weights
        self.epoch = 0
        self.start = 0  # samples of this rank to skip (resume mid-epoch)
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights.double(), self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world
        idx = (idx * math.ceil(total / max(len(idx), 1)))[:total]
        return idx[self.rank :: self.world]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def balanced_weights(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Per-sample weights inverse to the frequency of the sample's (rarest) class."""
    if task == "multiclass":
        counts = torch.bincount(labels.long()).double()
        return 1.0 / counts[labels.long()]
    labels = labels.long()
    keys = [tuple(r) for r in labels.tolist()]
    from collections import Counter

    c = Counter(keys)
    return torch.tensor([1.0 / c[k] for k in keys], dtype=torch.float64)
