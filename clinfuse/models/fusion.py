"""Late fusion of per-modality features: attention (the clinfuse model) and the baselines.

Every fusion kind is registered by name (``register_fusion``; ``list_fusions()`` lists them) and
chosen by ``model.fusion.kind``. The tokens of a study follow a :class:`TokenLayout`: one per image
slot (``max_images``), one for the report, one for the structured variables when the model reads
them; each token belongs to a *group* (0 image, 1 report, 2 variables). A *fused* kind maps token
features ``[B, M, d]`` and presence flags ``[B, M]`` to a fused vector ``[B, d]`` and per-token
weights ``[B, M]``, and the model puts one head on the fused vector (the model sums the weights per
group). A *late* kind (``late = True``) has no parameters of its own: the model puts one head on each
group's features (the mean of its present tokens) and averages the logits of the present groups;
``uses`` says which groups it reads at all (``image_only``, ``text_only``). With one image and no
variables the layout is today's two tokens (image, report) and every parameter keeps its shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FusionConfig
from ..errors import ClinfuseError

__all__ = ["AttentionFusion", "ConcatFusion", "LateFusion", "pattern_index", "FUSIONS", "register_fusion",
           "list_fusions", "fusion_class", "TokenLayout", "GROUPS"]

GROUPS = ("image", "report", "variables")
FUSIONS: dict[str, type[nn.Module]] = {}


@dataclass(frozen=True)
class TokenLayout:
    """The tokens of a study: `n_images` image slots, the report, and a variables token when
    `n_variables` > 0 (the number of structured-variable features the model reads)."""

    n_images: int = 1
    n_variables: int = 0

    @property
    def n_groups(self) -> int:
        return 3 if self.n_variables else 2

    @property
    def groups(self) -> tuple[int, ...]:
        """The group of each token (0 image, 1 report, 2 variables)."""
        return (0,) * self.n_images + (1,) + ((2,) if self.n_variables else ())

    @property
    def n_tokens(self) -> int:
        return len(self.groups)

    @property
    def group_names(self) -> tuple[str, ...]:
        return GROUPS[: self.n_groups]

    @property
    def two_tokens(self) -> bool:
        """One image and the report: the first version's layout (``clinfuse-model/1``)."""
        return self.n_images == 1 and not self.n_variables

    def group_mask(self, device=None) -> torch.Tensor:
        """``[G, M]`` bool: which tokens belong to each group."""
        g = torch.tensor(self.groups, device=device)
        return torch.stack([g == k for k in range(self.n_groups)])


def register_fusion(name: str):
    """Class decorator: register a fusion kind under `name` (``model.fusion.kind``).

    The class is built as ``cls(cfg: FusionConfig, layout: TokenLayout)`` (a class whose constructor
    takes the config only is built with it alone and serves the two-token layout); a fused kind has
    ``forward(feats [B, M, d], present [B, M]) -> (fused [B, d], weights [B, M])``; a late kind sets
    ``late = True`` (and ``uses``)."""

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
    """Missingness pattern of groups ``[B, G]`` as an int in 0..2^G-1: image + 2 * report + 4 * variables
    (3 = image and report present)."""
    weights = 2 ** torch.arange(present.shape[1], device=present.device)
    return (present.long() * weights).sum(1)


def group_presence(present: torch.Tensor, group_mask: torch.Tensor) -> torch.Tensor:
    """Token presence ``[B, M]`` -> group presence ``[B, G]`` (a group is present when any of its tokens
    is), with ``group_mask [G, M]`` from :meth:`TokenLayout.group_mask`."""
    return (present[:, None, :] & group_mask[None]).any(-1)


@register_fusion("attention")
class AttentionFusion(nn.Module):
    """One learned query attends over one token per modality, masked by presence.

    An absent modality is a masked key, so its attention weight is exactly 0. Rows with no modality
    at all are computed with every key unmasked (avoiding NaN) and their fused vector is zeroed.
    With ``missing='learned'`` a learned embedding of the missingness pattern is added to the fused
    vector, so the head can adapt to which modalities it saw without giving the absent one weight.
    """

    def __init__(self, cfg: FusionConfig, layout: TokenLayout = TokenLayout()):
        super().__init__()
        d = cfg.dim
        self.register_buffer("groups", torch.tensor(layout.groups), persistent=False)
        self.register_buffer("group_mask", layout.group_mask(), persistent=False)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(1, layout.n_groups, d) * 0.02)  # one per group
        self.attn = nn.MultiheadAttention(d, cfg.heads, batch_first=True)  # no dropout: weights stay exact
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
        self.missing = nn.Embedding(2 ** layout.n_groups, d) if cfg.missing == "learned" else None
        if self.missing is not None:
            nn.init.zeros_(self.missing.weight)

    def forward(self, feats: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = feats.shape[0]
        tokens = feats + self.type_embed[:, self.groups]  # [B, M, d] one token per image, report, variables
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
            fused = fused + self.missing(pattern_index(group_presence(present, self.group_mask)))
        return fused, weights


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """Baseline: concatenate the (zeroed-if-absent) features and the presence flags, then an MLP."""

    def __init__(self, cfg: FusionConfig, layout: TokenLayout = TokenLayout()):
        super().__init__()
        d, m = cfg.dim, layout.n_tokens
        self.mlp = nn.Sequential(nn.Linear(m * d + m, d), nn.GELU(), nn.Dropout(cfg.dropout))

    def forward(self, feats: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = present.to(feats.dtype)
        x = torch.cat([(feats * p[..., None]).flatten(1), p], dim=1)
        return self.mlp(x), _presence_weights(present)


def _presence_weights(present: torch.Tensor) -> torch.Tensor:
    """Equal shares among the present tokens or groups (baselines have no learned weights)."""
    p = present.float()
    return p / p.sum(1, keepdim=True).clamp(min=1.0)



class LateFusion(nn.Module):
    """Late kinds: the model averages per-group heads' logits over the present groups it uses
    (``uses``: image, report, variables; a group not listed is not read)."""

    late = True
    uses = (True, True, True)

    def __init__(self, cfg: FusionConfig, layout: TokenLayout = TokenLayout()):
        super().__init__()


@register_fusion("mean_logits")
class MeanLogits(LateFusion):
    """Baseline: the mean of the unimodal heads' logits over the present modalities."""


@register_fusion("image_only")
class ImageOnly(LateFusion):
    """Baseline: the images alone (report and variables are never read)."""

    uses = (True, False, False)


@register_fusion("text_only")
class TextOnly(LateFusion):
    """Baseline: the report alone (images and variables are never read)."""

    uses = (False, True, False)
