"""Training augmentation on whole batches, on the training device.

Per-item MONAI augmentation costs about 1 ms per 64 px image on a CPU core (mostly per-call
overhead), as much as a tiny model's training step, and makes data loading the bottleneck. Here the
batch is augmented in one call on the device that trains: a random rotation and zoom (drawn together,
or each on its own as MONAI's tutorial recipe draws them) resampled once by MONAI's batched
``AffineTransform`` layer, a random gamma (contrast), Gaussian noise and, where
configured, a left-right flip. Each
sample's parameters come from its own generator seeded by (seed, epoch, dataset index), so the
augmentation of a study is the same whatever the batch, the worker count or an interruption.
Absent images (all zeros) are left untouched. See docs/model.md.
"""

from __future__ import annotations

import math

import torch

from ..config import Config

__all__ = ["BatchAugment", "augment_seeds"]


def augment_seeds(seed: int, epoch: int, index: torch.Tensor) -> list[int]:
    """One seed per sample from (run seed, epoch, dataset index)."""
    return [int((seed * 1_000_003 + epoch * 100_003 + int(i)) % (2**63 - 1)) for i in index.tolist()]


def _rotation(angles: torch.Tensor, nd: int) -> torch.Tensor:
    if nd == 2:
        c, s = torch.cos(angles[0]), torch.sin(angles[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    mats = []
    for axis, a in enumerate(angles):
        c, s = torch.cos(a), torch.sin(a)
        m = torch.eye(3)
        i, j = [k for k in range(3) if k != axis]
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


class BatchAugment:
    """Random affine (p=0.8; with ``data.affine=independent`` a rotation and a zoom, p=0.5 each), gamma
    (p=``data.contrast``, 0.3 by default), Gaussian noise (p=0.3) and a left-right flip of the last axis
    (p=``data.flip``, 0 by default) on ``[B, C, *spatial]`` in [0, 1]; ``data.padding`` fills what the
    affine uncovers (zeros or the edge).

    Args:
        cfg: ``data.rotate_degrees``, ``data.scale``, ``data.affine``, ``data.padding``, ``data.noise_std``,
            ``data.contrast``, ``data.flip`` and the spatial dims.
    """

    def __init__(self, cfg: Config):
        from monai.networks.layers import AffineTransform

        self.nd = cfg.model.image.spatial_dims
        self.rot = math.radians(cfg.data.rotate_degrees)
        self.scale = cfg.data.scale
        self.noise = cfg.data.noise_std
        self.contrast, self.flip = cfg.data.contrast, cfg.data.flip
        self.independent = cfg.data.affine == "independent"
        self.resample = AffineTransform(normalized=True, padding_mode=cfg.data.padding, align_corners=False)

    def params(self, seeds: list[int]) -> dict[str, torch.Tensor]:
        nd = self.nd
        thetas, gammas, noise_on, affine_on, gamma_on, flip_on = [], [], [], [], [], []
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            u = torch.rand(4 + nd, generator=g)
            angles = (u[4 : 4 + (1 if nd == 2 else 3)] * 2 - 1) * self.rot
            zoom = 1.0 + (u[3] * 2 - 1) * self.scale
            gamma_on.append(u[1] < self.contrast)
            noise_on.append(u[2] < 0.3)
            gammas.append(0.8 + torch.rand(1, generator=g)[0] * 0.45)
            flip_on.append(torch.rand(1, generator=g)[0] < self.flip)  # drawn last: earlier draws stay as they were
            if self.independent:  # two more draws, after the others, so the joint default's draws are unchanged
                rotate, scale = torch.rand(2, generator=g) < 0.5
                m = (_rotation(angles, nd) if rotate else torch.eye(nd)) / (zoom if scale else 1.0)
                affine_on.append(rotate | scale)
            else:
                m = _rotation(angles, nd) / zoom
                affine_on.append(u[0] < 0.8)
            thetas.append(torch.cat([m, torch.zeros(nd, 1)], dim=1))
        return {"theta": torch.stack(thetas), "affine": torch.stack(affine_on), "gamma_on": torch.stack(gamma_on),
                "gamma": torch.stack(gammas), "noise_on": torch.stack(noise_on), "flip": torch.stack(flip_on)}

    def __call__(self, image: torch.Tensor, present: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        if image.ndim == self.nd + 3:  # [B, N, C, *S]: every image slot on its own, seeded by (study, slot)
            b, n = image.shape[:2]
            slot_seeds = [(s * 31 + j) % (2**63 - 1) for s in seeds for j in range(n)]
            flat = self(image.flatten(0, 1), present.reshape(b * n), slot_seeds)
            return flat.reshape(image.shape)
        p = {k: v.to(image.device) for k, v in self.params(seeds).items()}
        keep = present.bool()
        out = image
        eye = torch.eye(self.nd, self.nd + 1, device=image.device).expand_as(p["theta"])
        theta = torch.where(p["affine"].view(-1, 1, 1), p["theta"], eye)
        out = self.resample(out.float(), theta).to(image.dtype)
        shape = (-1,) + (1,) * (image.ndim - 1)
        gamma = torch.where(p["gamma_on"], p["gamma"], torch.ones_like(p["gamma"])).view(shape)
        out = out.clamp(0, 1) ** gamma
        if self.flip > 0:
            out = torch.where(p["flip"].view(shape), out.flip(-1), out)
        if self.noise > 0:
            noise = torch.stack([torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(s + 1))
                                 for s in seeds]).to(image.device)
            out = out + noise * self.noise * p["noise_on"].to(image.dtype).view(shape)
        out = out.clamp(0, 1)
        return torch.where(keep.view(shape), out, image)
