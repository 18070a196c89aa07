"""Attributions for one study with Captum.

- Image: Integrated Gradients on the pixels (default), Grad-CAM on the last convolutional block
  (``LayerGradCam``, upsampled) or Occlusion.
- Report: Integrated Gradients on the word embeddings (what Captum's ``LayerIntegratedGradients`` on
  ``word_embeddings`` computes), with a padding baseline (PAD everywhere, [CLS]/[SEP] kept), summed per
  token and merged back into whole words.
- Variables (a model that reads them): Integrated Gradients on the variables' values from the
  training mean (one-hots from all off), summed per variable; a missing variable scores None.
- Modality: the fusion's attention weights and the exact Shapley value of each modality group (2^G
  forward passes in one batch: with each subset of image, report[, variables] hidden).
- Several images (a model with image slots): one map per present image, each made with the other
  images shown as they are.

When several inputs are present, image, report and variables Integrated Gradients run as one Captum
call on the joint path (pixels, word embeddings and values move together from their baselines), all
steps in one batch: completeness then holds for the sum of all maps, and the convergence delta is
reported.
Attributions explain the logit of the target output (its log-odds), not the probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..models.model import probabilities as _probs
from ..errors import ClinfuseError

__all__ = ["StudyInput", "Attribution", "explain_study", "auto_image_method", "merge_wordpieces", "modality_shapley", "gradcam_layer",
           "p_without"]


@dataclass
class StudyInput:
    """One study as a batch of 1, in the batch contract's tensors.

    ``image`` is ``[1, C, *S]`` with ``image_present [1]`` (one slot) or ``[1, N, C, *S]`` with
    ``image_present [1, N]`` (a model with N image slots); ``extra`` holds the model's keyword inputs
    (``image_view``, ``variables``, ``variables_present``), each with a batch dimension of 1."""

    image: torch.Tensor
    image_present: torch.Tensor
    input_ids: torch.Tensor  # [1, K, L]
    attention_mask: torch.Tensor  # [1, K, L]
    text_present: torch.Tensor  # [1] bool
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_item(cls, item: dict) -> "StudyInput":
        return cls.from_batch({k: (v[None] if torch.is_tensor(v) else [v]) for k, v in item.items()})

    @classmethod
    def from_batch(cls, batch: dict) -> "StudyInput":
        """The first study of a collated batch."""
        from ..models.model import study_kwargs

        ip = batch["image_present"][:1]
        ip = ip.reshape(1, -1).bool() if ip.ndim == 2 else ip.reshape(1).bool()
        return cls(batch["image"][:1], ip, batch["input_ids"][:1], batch["attention_mask"][:1],
                   batch["text_present"][:1].reshape(1).bool(), {k: v[:1] for k, v in study_kwargs(batch).items()})

    def args(self):
        return self.image, self.image_present, self.input_ids, self.attention_mask, self.text_present

    @property
    def multi(self) -> bool:
        """Several image slots (``image [1, N, C, *S]``)."""
        return self.image_present.ndim == 2

    @property
    def image_slots(self) -> list[int]:
        """The present image slots (``[0]`` for a one-slot study with an image)."""
        if self.multi:
            return self.image_present[0].nonzero(as_tuple=True)[0].tolist()
        return [0] if bool(self.image_present[0]) else []

    @property
    def has_image(self) -> bool:
        return bool(self.image_present.any())

    @property
    def has_variables(self) -> bool:
        vp = self.extra.get("variables_present")
        return vp is not None and bool(vp.any())

    def slot_image(self, j: int) -> torch.Tensor:
        """``[1, C, *S]``: the image of slot `j`."""
        return self.image[:, j] if self.multi else self.image

    def with_slot(self, j: int, imgs: torch.Tensor) -> torch.Tensor:
        """The image input for a batch of ``len(imgs)`` copies of the study, slot `j` replaced by `imgs`."""
        if not self.multi:
            return imgs
        full = self.image.expand(imgs.shape[0], *self.image.shape[1:]).clone()
        full[:, j] = imgs
        return full

    def kwargs(self, b: int = 1, **override) -> dict:
        """The keyword inputs repeated to a batch of `b` (``override`` replaces some)."""
        out = {k: v.expand(b, *v.shape[1:]) for k, v in self.extra.items()}
        out.update(override)
        return out

    def run(self, model, image=None, *, image_present=None, input_ids=None, attention_mask=None,
            text_present=None, inputs_embeds=None, **extra) -> dict:
        """The model on copies of this study (the batch size is taken from what is given), with some
        inputs replaced."""
        given = [t for t in (image, input_ids, attention_mask, inputs_embeds, *extra.values()) if t is not None]
        b = given[0].shape[0] if given else 1
        rep = lambda t: t.expand(b, *t.shape[1:])  # noqa: E731
        return model(image if image is not None else rep(self.image),
                     image_present if image_present is not None else rep(self.image_present),
                     input_ids if input_ids is not None else rep(self.input_ids),
                     attention_mask if attention_mask is not None else rep(self.attention_mask),
                     text_present if text_present is not None else rep(self.text_present),
                     inputs_embeds=inputs_embeds, **self.kwargs(b, **extra))


@dataclass
class Attribution:
    target: int
    logit: float
    probabilities: list[float]
    attention_weights: list[float]  # per group: image, report[, variables]
    shapley: dict[str, float]  # per group, on the probability of the target
    image_map: np.ndarray | None = None  # [*S], summed over channels (the first present image)
    image_method: str | None = None
    tokens: list[tuple[str, float]] = field(default_factory=list)  # whole words with scores
    token_positions: list[list[tuple[int, int]]] = field(default_factory=list)  # (chunk, position) per word
    convergence_delta: float | None = None
    baseline_logit: float | None = None
    image_maps: dict[int, np.ndarray] = field(default_factory=dict)  # per present image slot
    variable_scores: dict[str, float | None] = field(default_factory=dict)  # IG per variable (None: missing)
    token_weights: list[float] = field(default_factory=list)  # attention per token (image slots first)


def _target_logit(model, target: int):
    def f(*args, **kw):
        return model(*args, **kw)["logits"][:, target]

    return f


def baseline_ids(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """PAD everywhere except [CLS] and [SEP], which stay where they are."""
    pad = tokenizer.pad_token_id or 0
    keep = (input_ids == tokenizer.cls_token_id) | (input_ids == tokenizer.sep_token_id)
    return torch.where(keep, input_ids, torch.full_like(input_ids, pad))


@torch.no_grad()
def modality_shapley(model, x: StudyInput, target: int, task: str, temperature: float = 1.0) -> dict[str, float]:
    """Exact Shapley value of each present modality group for the target probability (2^G forward
    passes in one batch: 4 for image and report, 8 with the variables).

    v(S) is the model's probability with only the groups in S shown; an absent group's value is 0.
    Also returned: ``v`` (v(S) per subset, keyed like ``image+report``; ``none`` for the empty one)
    and, for two groups, the four v(S) as ``v_both``, ``v_image_only``, ``v_report_only``, ``v_none``.
    """
    import itertools
    import math

    names = list(getattr(model, "group_names", ("image", "report")))
    g = len(names)
    subsets = list(itertools.product((1, 0), repeat=g))  # (1, 1[, 1]) first: all shown
    n = len(subsets)
    flags = torch.tensor(subsets, dtype=torch.bool, device=x.image.device)  # [n, G]
    ip = x.image_present.expand(n, *x.image_present.shape[1:])
    ip = ip & (flags[:, 0].view(-1, *([1] * (ip.ndim - 1))))
    over = {}
    if g == 3:
        over["variables_present"] = x.extra["variables_present"].expand(n, -1) & flags[:, 2:3]
    out = x.run(model, x.image.expand(n, *x.image.shape[1:]), image_present=ip,
                text_present=x.text_present.expand(n) & flags[:, 1], **over)
    v = dict(zip(subsets, _probs(out["logits"], task, temperature)[:, target].tolist()))
    res: dict = {}
    for k, name in enumerate(names):
        phi = 0.0
        for s in subsets:
            if s[k]:
                continue
            with_k = tuple(1 if i == k else b for i, b in enumerate(s))
            size = sum(s)
            phi += math.factorial(size) * math.factorial(g - size - 1) / math.factorial(g) * (v[with_k] - v[s])
        res[name] = float(phi)
    res["v"] = {("+".join(nm for nm, b in zip(names, s) if b) or "none"): float(p) for s, p in v.items()}
    if g == 2:
        res.update({"v_none": v[(0, 0)], "v_both": v[(1, 1)], "v_image_only": v[(1, 0)], "v_report_only": v[(0, 1)]})
    return res


def p_without(shapley: dict, present: dict[str, bool]) -> dict[str, float | None]:
    """The explained probability with each present group hidden and the other present ones kept
    (None for a group that is absent or the only one present)."""
    names = list(present)
    shown = [n for n in names if present[n]]
    out = {}
    for n in names:
        if not present[n] or len(shown) < 2:
            out[n] = None
            continue
        key = "+".join(m for m in names if m in shown and m != n)
        out[n] = shapley["v"][key]
    return out


def merge_wordpieces(tokenizer, ids: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor):
    """Whole words with summed scores from WordPiece tokens (``##`` pieces joined; specials and padding dropped).

    Args:
        ids, mask, scores: ``[K, L]``.
    Returns:
        (list of (word, score), list of the (chunk, position) pairs of each word)
    """
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    ids, mask, scores = ids.cpu(), mask.cpu(), scores.cpu()  # one copy, not one device sync per token
    words, positions = [], []
    for k in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if not mask[k, j] or int(ids[k, j]) in special:
                continue
            piece = tokenizer.convert_ids_to_tokens(int(ids[k, j]))
            s = float(scores[k, j])
            if piece.startswith("##") and words:
                w, old = words[-1]
                words[-1] = (w + piece[2:], old + s)
                positions[-1].append((k, j))
            else:
                words.append((piece, s))
                positions.append([(k, j)])
    return words, positions


def gradcam_layer(model) -> nn.Module:
    """The last convolutional block of the image encoder (Grad-CAM's target)."""
    net = model.image_encoder.net
    feats = getattr(net, "features", None)
    if feats is not None:
        blocks = [m for name, m in feats.named_children() if name.startswith("denseblock")]
        if blocks:
            return blocks[-1]  # not norm5: its in-place ReLU overwrites the hooked output
    for name in ("layer4", "layer3", "_blocks"):
        if hasattr(net, name):
            return getattr(net, name)
    raise ClinfuseError(f"Grad-CAM needs a convolutional encoder; '{type(net).__name__}' has no known last block")


def auto_image_method(model, x: StudyInput) -> str:
    """The image method of ``explain.image_method: auto``, chosen by evidence (docs/explanations.md, "The
    default image method"): Occlusion for 2D images (with ``explain.occlusion_baseline``, a blurred window
    by default): under a deletion test the models do not read as a finding (in-painted patches) it beat
    every random order on 102 of 113 real radiographs of three models (IG 95, Grad-CAM 47) and pointed at a
    planted finding in 113 of 120 synthetic studies (IG 120, Grad-CAM 102). Grad-CAM for volumes, where
    Occlusion slides in three dimensions (3,375 passes instead of 225; not measured there), and Occlusion
    for an encoder without a convolutional block (a ViT). Before: Integrated Gradients (first version),
    Occlusion with a black window (2026-12-06, chosen under zeroed deletion, which favours a black window),
    Grad-CAM (2026-12-07, before the blurred window was measured)."""
    if x.slot_image(0).ndim == 4:  # [1, C, H, W]: a 2D image
        return "occlusion"
    try:
        gradcam_layer(model)
    except ClinfuseError:
        return "occlusion"
    return "gradcam"


def occlusion_baseline_image(img: torch.Tensor, window: int, kind: str = "blur"):
    """What Occlusion puts in its window. 'zero': black (Captum's default), which the models read as a dark
    finding rather than as nothing; 'blur': the image under a Gaussian blur with sigma = the window's side
    (per channel, edges replicated), so a window takes the local mean brightness of its surroundings and loses
    only what is finer than the window: the occlusion counterpart of the deletion test's in-painting."""
    if kind == "zero":
        return 0.0
    if kind != "blur":
        raise ClinfuseError(f"explain.occlusion_baseline must be 'zero' or 'blur', got '{kind}'")
    from monai.networks.layers import gaussian_1d, separable_filtering

    k = gaussian_1d(torch.tensor(float(window)), truncated=3.0).to(img.device)
    with torch.no_grad():
        return separable_filtering(img.float(), [k] * (img.ndim - 2), mode="replicate").to(img.dtype)


def explain_study(model, x: StudyInput, *, task: str, tokenizer=None, target: int | None = None,
                  image_method: str = "ig", steps: int = 32, internal_batch_size: int | None = None,
                  temperature: float = 1.0, occlusion_window: int | None = None,
                  occlusion_baseline: str = "blur") -> Attribution:
    """All attributions of one study.

    Args:
        model: a FusionModel (eval mode).
        x: the study.
        task: 'binary', 'multilabel' or 'multiclass'.
        tokenizer: the model's tokenizer (needed for the report).
        target: output index to explain (default: the predicted one; for a binary model, 0).
        image_method: 'ig', 'gradcam', 'occlusion' or 'auto' (:func:`auto_image_method`: Occlusion for 2D
            images, Grad-CAM for volumes, Occlusion for an encoder without a convolutional block).
        steps: Integrated Gradients steps.
        internal_batch_size: IG steps per forward batch (default: all steps in one batch).
        occlusion_window: Occlusion's window side in pixels (default: an eighth of the image's shorter side).
        occlusion_baseline: what Occlusion puts in its window: 'blur' (default: the image blurred at the
            window's scale, :func:`occlusion_baseline_image`) or 'zero' (black).
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    if image_method == "auto":
        image_method = auto_image_method(model, x)
    model.eval()
    with torch.no_grad():
        out = x.run(model)
    probs = _probs(out["logits"], task, temperature)[0]
    if target is None:
        target = int(probs.argmax()) if task == "multiclass" else (int(probs.argmax()) if probs.numel() > 1 else 0)
    res = Attribution(target=target, logit=float(out["logits"][0, target]), probabilities=probs.tolist(),
                      attention_weights=out["modality_weights"][0].tolist(),
                      shapley=modality_shapley(model, x, target, task, temperature),
                      token_weights=out["token_weights"][0].tolist() if "token_weights" in out else [])
    has_img, has_txt = x.has_image, bool(x.text_present[0]) and tokenizer is not None
    has_var = x.has_variables and getattr(model, "variables_encoder", None) is not None
    ibs = internal_batch_size or steps
    emb_layer = model.text_encoder.bert.get_input_embeddings() if model.text_encoder is not None else None
    embeds = base_embeds = None
    if has_txt:
        with torch.no_grad():
            embeds = emb_layer(x.input_ids)  # [1, K, L, H]
            base_embeds = emb_layer(baseline_ids(tokenizer, x.input_ids))

    # one Integrated Gradients call over everything it explains: pixels (method 'ig'), word
    # embeddings, variables (baseline: the training mean, one-hots all off)
    names, ig_inputs, ig_base = [], [], []
    if has_img and image_method == "ig":
        names.append("image")
        ig_inputs.append(x.image)
        ig_base.append(torch.zeros_like(x.image))
    if has_txt:
        names.append("text")
        ig_inputs.append(embeds)
        ig_base.append(base_embeds)
    if has_var:
        enc = model.variables_encoder
        names.append("variables")
        xv = x.extra["variables"].float()
        n_num = len(enc.spec.numeric)
        base = torch.zeros_like(xv)
        base[:, :n_num] = enc.mean[:n_num].to(xv.dtype)
        ig_inputs.append(xv)
        ig_base.append(base)
    if ig_inputs:
        def f(*inp):
            got = dict(zip(names, inp))
            b = inp[0].shape[0]
            kw = {"variables": got["variables"]} if "variables" in got else {}
            return x.run(model, got.get("image", x.image.expand(b, *x.image.shape[1:])),
                         inputs_embeds=got.get("text"), **kw)["logits"][:, target]

        ig = IntegratedGradients(f)
        attrs, delta = ig.attribute(tuple(ig_inputs), baselines=tuple(ig_base), n_steps=steps,
                                    internal_batch_size=ibs, return_convergence_delta=True)
        res.convergence_delta = float(delta.abs().max())
        with torch.no_grad():
            res.baseline_logit = float(f(*ig_base)[0])
        got = dict(zip(names, attrs))
        if "image" in got:
            a = got["image"][0]  # [C, *S] or [N, C, *S]
            res.image_maps = {j: (a[j] if x.multi else a).sum(0).detach().cpu().numpy() for j in x.image_slots}
            res.image_method = "integrated_gradients"
        if "text" in got:
            scores = got["text"][0].sum(-1).detach()  # [K, L]
            lex = getattr(model, "lexical", None)
            if lex is not None and lex.is_fitted:
                # IG moves the embeddings only; the lexical branch reads the ids, so its share of each
                # token is added exactly (LexicalHead.token_scores), and the baseline loses what it adds
                extra = lex.token_scores(x.input_ids, x.attention_mask, target)[0].to(scores.dtype)
                scores = scores + extra
                res.baseline_logit -= float(extra.sum())
            res.tokens, res.token_positions = merge_wordpieces(tokenizer, x.input_ids[0], x.attention_mask[0], scores)
        if "variables" in got:
            a = got["variables"][0].detach()
            vp = x.extra["variables_present"][0]
            res.variable_scores = {name: (float(a[sl].sum()) if bool(vp[sl].any()) else None)
                                   for name, sl in model.variables_encoder.spec.slices().items()}

    if has_img and image_method == "gradcam":
        layer = gradcam_layer(model)
        for j in x.image_slots:
            def g(img, j=j):
                return x.run(model, x.with_slot(j, img))["logits"][:, target]

            cam = LayerGradCam(g, layer)
            a = cam.attribute(x.slot_image(j).clone().requires_grad_(True), relu_attributions=True)
            # the encoder saw every present image of the study in one batch: row k is the k-th present slot
            a = a[x.image_slots.index(j)][None] if a.shape[0] > 1 else a
            spatial = tuple(x.slot_image(j).shape[2:])
            up = LayerAttribution.interpolate(a, spatial, interpolate_mode="bilinear" if len(spatial) == 2 else "trilinear")
            res.image_maps[j] = up[0].sum(0).detach().cpu().numpy()
        res.image_method = "gradcam"
    elif has_img and image_method == "occlusion":
        for j in x.image_slots:
            def g(img, j=j):
                return x.run(model, x.with_slot(j, img))["logits"][:, target]

            img = x.slot_image(j)
            size = img.shape[2:]
            w = occlusion_window or max(2, min(size) // 8)
            occ = Occlusion(g)
            a = occ.attribute(img, sliding_window_shapes=(img.shape[1], *([w] * len(size))),
                              strides=(img.shape[1], *([max(1, w // 2)] * len(size))),
                              baselines=occlusion_baseline_image(img, w, occlusion_baseline),
                              perturbations_per_eval=16)
            res.image_maps[j] = a[0].sum(0).detach().cpu().numpy()
        res.image_method = "occlusion"
    if res.image_maps:
        res.image_map = res.image_maps[min(res.image_maps)]
    return res
