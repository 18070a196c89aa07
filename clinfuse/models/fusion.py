"""Late fusion of per-modality features: attention (the clinfuse model) and the baselines.

Every fusion kind is registered by name (``register_fusion``; ``list_fusions()`` lists them) and
chosen by ``model.fusion.kind``. A *fused* kind maps features ``[B, M, d]`` and presence flags
``[B, M]`` (M = 2: image, report) to a fused vector ``[B, d]`` and per-modality weights ``[B, M]``,
and the model puts one head on the fused vector. A *late* kind (``late = True``) has no parameters
of its own: the model puts one head on each modality's features and averages the logits of the
present ones; ``uses`` says which modalities it reads at all (``image_only``, ``text_only``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import FusionConfig
from ..errors import ClinfuseError

__all__ = ["AttentionFusion", "ConcatFusion", "LateFusion", "pattern_index", "FUSIONS", "register_fusion",
           "list_fusions", "fusion_class"]

N_MODALITIES = 2
FUSIONS: dict[str, type[nn.Module]] = {}


def register_fusion(name: str):
    """Class decorator: register a fusion kind under `name` (``model.fusion.kind``).

    The class is built as ``cls(cfg: FusionConfig)``; a fused kind has ``forward(feats, present) ->
    (fused [B, d], weights [B, M])``; a late kind sets ``late = True`` (and ``uses``)."""

    def deco(cls):
        FUSIONS[name] = cls
        return cls

    return deco


def list_fusions() -> list[str]:
    """Names accepted by ``model.fusion.kind``."""
    return sorted(FUSIONS)


def fusion_class(kind: str) -> type[nn.Module]:
    """The registered class of a fusion kind.

    Raises:
        ClinfuseError: no such kind (the message lists the registered ones).
    """
    if kind not in FUSIONS:
        raise ClinfuseError(f"model.fusion.kind {kind!r} is not a registered fusion; registered: "
                            f"{', '.join(list_fusions())} (add one with clinfuse.models.register_fusion)")
    return FUSIONS[kind]


def pattern_index(present: torch.Tensor) -> torch.Tensor:
    """Missingness pattern as an int in 0..3: image + 2 * report (3 = both present)."""
    return present[:, 0].long() + 2 * present[:, 1].long()


@register_fusion("attention")
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


@register_fusion("concat")
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



class LateFusion(nn.Module):
    """Late kinds: the model averages per-modality heads' logits over the present modalities it uses."""

    late = True
    uses = (True, True)

    def __init__(self, cfg: FusionConfig):
        super().__init__()


@register_fusion("mean_logits")
class MeanLogits(LateFusion):
    """Baseline: the mean of the unimodal heads' logits over the present modalities."""


@register_fusion("image_only")
class ImageOnly(LateFusion):
    """Baseline: the image alone (the report is never read)."""

    uses = (True, False)


@register_fusion("text_only")
class TextOnly(LateFusion):
    """Baseline: the report alone (the image is never read)."""

    uses = (False, True)
