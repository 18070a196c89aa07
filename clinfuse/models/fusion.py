"""Late fusion of per-modality features: attention (the clinfuse model) and the baselines.

Every fusion maps features ``[B, M, d]`` and presence flags ``[B, M]`` (M = 2: image, report) to a
fused vector ``[B, d]`` (or logits, for ``mean_logits``) and per-modality weights ``[B, M]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import FusionConfig

__all__ = ["AttentionFusion", "ConcatFusion", "pattern_index", "FUSIONS"]

N_MODALITIES = 2


def pattern_index(present: torch.Tensor) -> torch.Tensor:
    """Missingness pattern as an int in 0..3: image + 2 * report (3 = both present)."""
    return present[:, 0].long() + 2 * present[:, 1].long()


class AttentionFusion(nn.Module):
    """One learned query attends over one token per modality, masked by presence.

    An absent modality is a masked key, so its attention weight is exactly 0. Rows with no modality
    at all are computed with every key unmasked (avoiding NaN) and their fused vector is zeroed.
    With ``missing='learned'`` a learned embedding of the missingness pattern is added to the fused
    vector, so the head can adapt to which modalities it saw without giving the absent one weight.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d = cfg.dim
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(1, N_MODALITIES, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, cfg.heads, batch_first=True)  # no dropout: weights stay exact
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
        self.missing = nn.Embedding(4, d) if cfg.missing == "learned" else None
        if self.missing is not None:
            nn.init.zeros_(self.missing.weight)

    def forward(self, feats: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = feats.shape[0]
        tokens = feats + self.type_embed  # [B, M, d] one token per modality
        none = ~present.any(1)  # [B]
        key_pad = ~present & ~none[:, None]  # [B, M] True = ignore; all-absent rows unmasked (then zeroed)
        q = self.query.expand(b, -1, -1)  # [B, 1, d]
        out, w = self.attn(q, tokens, tokens, key_padding_mask=key_pad, need_weights=True)  # [B,1,d], [B,1,M]
        h = self.norm(out[:, 0])
        fused = h + self.ffn(h)  # [B, d]
        keep = (~none).to(fused.dtype)[:, None]
        fused = fused * keep
        weights = w[:, 0] * keep
        if self.missing is not None:
            fused = fused + self.missing(pattern_index(present))
        return fused, weights


class ConcatFusion(nn.Module):
    """Baseline: concatenate the (zeroed-if-absent) features and the presence flags, then an MLP."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d = cfg.dim
        self.mlp = nn.Sequential(nn.Linear(N_MODALITIES * d + N_MODALITIES, d), nn.GELU(), nn.Dropout(cfg.dropout))

    def forward(self, feats: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = present.to(feats.dtype)
        x = torch.cat([(feats * p[..., None]).flatten(1), p], dim=1)
        return self.mlp(x), _presence_weights(present)


def _presence_weights(present: torch.Tensor) -> torch.Tensor:
    """Equal shares among the present modalities (baselines have no learned weights)."""
    p = present.float()
    return p / p.sum(1, keepdim=True).clamp(min=1.0)


FUSIONS = {"attention": AttentionFusion, "concat": ConcatFusion}
