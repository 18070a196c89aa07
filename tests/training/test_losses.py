"""Losses against values computed by hand on small inputs."""

import math

import pytest
import torch

from clinfuse.config import LossConfig
from clinfuse.training.losses import FocalLoss, LogitAdjustedLoss, build_loss, class_weights
from clinfuse.training.sampler import EpochSampler, balanced_weights


def _bce(z, y, w=1.0):
    p = 1 / (1 + math.exp(-z))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


def test_class_weights_by_hand():
    y = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    assert class_weights(y, "binary", "inverse").item() == pytest.approx(3.0)
    e = lambda n, b=0.9: (1 - b**n) / (1 - b)  # noqa: E731
    assert class_weights(y, "binary", "effective", beta=0.9).item() == pytest.approx(e(3) / e(1), rel=1e-5)
    w = class_weights(torch.tensor([0, 0, 0, 1]), "multiclass", "inverse", n_classes=2)
    assert w.tolist() == pytest.approx([0.5, 1.5])  # 1/3 and 1/1 scaled to mean 1
    assert class_weights(y, "binary", "none") is None


def test_weighted_bce_by_hand():
    y = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    z = torch.tensor([[0.3], [-0.2], [1.0], [0.0]])
    loss = build_loss(LossConfig(name="bce", class_weights="inverse"), "binary", y, 1)(z, y)
    expect = (_bce(0.3, 1, 3.0) + _bce(-0.2, 0) + _bce(1.0, 0) + _bce(0.0, 0)) / 4
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_weighted_ce_by_hand():
    y = torch.tensor([0, 0, 0, 1])
    z = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.2], [0.1, 0.4]])
    loss = build_loss(LossConfig(name="ce", class_weights="inverse"), "multiclass", y, 2)(z, y)
    w = [0.5, 1.5]
    nll = [-torch.log_softmax(z[i], 0)[y[i]].item() for i in range(4)]
    expect = sum(w[y[i]] * nll[i] for i in range(4)) / sum(w[y[i]] for i in range(4))
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_focal_by_hand_and_gamma_zero_is_bce():
    z, y = torch.tensor([[2.0], [-1.0]]), torch.tensor([[1.0], [1.0]])
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    expect = sum(-((1 - pi) ** 2) * math.log(pi) for pi in p) / 2
    assert FocalLoss("binary", gamma=2.0)(z, y).item() == pytest.approx(expect, rel=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    assert FocalLoss("binary", gamma=0.0)(z, y).item() == pytest.approx(bce.item(), rel=1e-6)
    zc, yc = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    pt = torch.softmax(zc, -1)[0, 0].item()
    assert FocalLoss("multiclass", gamma=1.0)(zc, yc).item() == pytest.approx(-(1 - pt) * math.log(pt), rel=1e-6)


def test_logit_adjustment_by_hand():
    prior = torch.tensor([0.2])
    z, y = torch.tensor([[0.5]]), torch.tensor([[1.0]])
    loss = LogitAdjustedLoss("binary", prior, tau=1.0)(z, y)
    assert loss.item() == pytest.approx(_bce(0.5 + math.log(0.2 / 0.8), 1), rel=1e-6)


def test_sampler_deterministic_sharded_and_resumable():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert sorted(full) == list(range(10))
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(3)
    assert list(s) != full
    r0, r1 = EpochSampler(9, seed=1, rank=0, world_size=2), EpochSampler(9, seed=1, rank=1, world_size=2)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == 5 and set(a) | set(b) == set(range(9))


def test_balanced_sampler_draws_minority_about_half_the_time():
    y = torch.tensor([[1]] * 10 + [[0]] * 90)
    s = EpochSampler(100, seed=0, weights=balanced_weights(y, "binary"))
    draws = [i for e in range(20) for i in (s.set_epoch(e) or list(s))]
    assert 0.4 < sum(d < 10 for d in draws) / len(draws) < 0.6
