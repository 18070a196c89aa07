"""How far an explanation can be trusted: deletion curves against random orders.

Image: the image is cut into patches (1/16 of the side), patches are set to the baseline (0) in
order of their summed attribution, most positive first, at 11 fractions from 0 to 1; the curve is
the target probability after each step and its area the mean over fractions. The same is done for
`n_random` random orders. A faithful map makes the probability fall faster than random: its
deletion area is smaller. ``faithfulness = random_area - deletion_area``; an explanation whose area
is not below every random order's is flagged ``better_than_random: false``.
Report: the same with whole words removed (their tokens set to padding and masked).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .attributions import Attribution, StudyInput, _probs

__all__ = ["image_deletion", "text_deletion"]

FRACTIONS = np.linspace(0.0, 1.0, 11)


def _summary(curve: np.ndarray, random_curves: np.ndarray) -> dict:
    area = float(curve.mean())
    r_areas = random_curves.mean(1)
    return {"deletion_area": area, "random_area": float(r_areas.mean()), "random_area_sd": float(r_areas.std()),
            "faithfulness": float(r_areas.mean() - area), "better_than_random": bool(area < r_areas.min()),
            "curve": [round(float(v), 5) for v in curve],
            "random_curve": [round(float(v), 5) for v in random_curves.mean(0)]}


@torch.no_grad()
def image_deletion(model, x: StudyInput, attr: Attribution, task: str, temperature: float = 1.0,
                   n_random: int = 3, seed: int = 0, slot: int | None = None) -> dict | None:
    """The deletion test of one image's map (`slot`: which image of a several-image study; default the
    first present), the study's other inputs shown as they are."""
    if slot is None:
        slot = min(attr.image_maps) if attr.image_maps else 0
    amap = attr.image_maps.get(slot) if x.multi else attr.image_map
    if amap is None:
        return None
    image = x.slot_image(slot)
    spatial = image.shape[2:]
    nd = len(spatial)
    p = max(1, min(spatial) // 16)
    amap = torch.as_tensor(amap, dtype=torch.float32)[None, None]
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    patches = pool(amap, p, ceil_mode=True)[0, 0]  # [*S/p]
    grid = patches.shape
    n = patches.numel()
    g = torch.Generator().manual_seed(seed)
    orders = [torch.argsort(patches.flatten(), descending=True)] + [torch.randperm(n, generator=g) for _ in range(n_random)]
    curves = []
    for order in orders:
        imgs = []
        for f in FRACTIONS:
            keep = torch.ones(n)
            keep[order[: int(round(f * n))]] = 0
            m = keep.reshape(grid)[None, None]
            m = F.interpolate(m, scale_factor=p, mode="nearest")[(..., *[slice(0, s) for s in spatial])]
            imgs.append(image[0] * m[0])
        out = x.run(model, x.with_slot(slot, torch.stack(imgs)))
        curves.append(_probs(out["logits"], task, temperature)[:, attr.target].numpy())
    res = _summary(curves[0], np.stack(curves[1:]))
    res["patch"] = p
    return res


@torch.no_grad()
def text_deletion(model, x: StudyInput, attr: Attribution, task: str, tokenizer, temperature: float = 1.0,
                  n_random: int = 3, seed: int = 0) -> dict | None:
    if not attr.tokens:
        return None
    n = len(attr.tokens)
    scores = torch.tensor([s for _, s in attr.tokens])
    g = torch.Generator().manual_seed(seed)
    orders = [torch.argsort(scores, descending=True)] + [torch.randperm(n, generator=g) for _ in range(n_random)]
    pad = tokenizer.pad_token_id or 0
    curves = []
    for order in orders:
        ids, masks = [], []
        for f in FRACTIONS:
            i, m = x.input_ids[0].clone(), x.attention_mask[0].clone()
            for w in order[: int(round(f * n))].tolist():
                for k, j in attr.token_positions[w]:
                    i[k, j], m[k, j] = pad, 0
            ids.append(i)
            masks.append(m)
        out = x.run(model, input_ids=torch.stack(ids), attention_mask=torch.stack(masks))
        curves.append(_probs(out["logits"], task, temperature)[:, attr.target].numpy())
    return _summary(curves[0], np.stack(curves[1:]))
