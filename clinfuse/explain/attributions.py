"""Attributions for one study with Captum.

- Image: Integrated Gradients on the pixels (default), Grad-CAM on the last convolutional block
  (``LayerGradCam``, upsampled) or Occlusion.
- Report: Integrated Gradients on the word embeddings (what Captum's ``LayerIntegratedGradients`` on
  ``word_embeddings`` computes), with a padding baseline (PAD everywhere, [CLS]/[SEP] kept), summed per
  token and merged back into whole words.
- Modality: the fusion's attention weights and the exact Shapley value of each modality (4 forward
  passes: with each subset of modalities hidden).

When both modalities are present, image and report Integrated Gradients run as one Captum call on
the joint path (image and word embeddings move together from their baselines), all steps in one
batch: completeness then holds for the sum of both maps, and the convergence delta is reported.
Attributions explain the logit of the target output (its log-odds), not the probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..models.model import probabilities as _probs
from ..errors import ClinfuseError

__all__ = ["StudyInput", "Attribution", "explain_study", "merge_wordpieces", "modality_shapley", "gradcam_layer"]


@dataclass
class StudyInput:
    """One study as a batch of 1, in the batch contract's tensors."""

    image: torch.Tensor  # [1, C, *S]
    image_present: torch.Tensor  # [1] bool
    input_ids: torch.Tensor  # [1, K, L]
    attention_mask: torch.Tensor  # [1, K, L]
    text_present: torch.Tensor  # [1] bool

    @classmethod
    def from_item(cls, item: dict) -> "StudyInput":
        return cls(item["image"][None], item["image_present"].reshape(1).bool(), item["input_ids"][None],
                   item["attention_mask"][None], item["text_present"].reshape(1).bool())

    def args(self):
        return self.image, self.image_present, self.input_ids, self.attention_mask, self.text_present


@dataclass
class Attribution:
    target: int
    logit: float
    probabilities: list[float]
    attention_weights: list[float]  # [image, report]
    shapley: dict[str, float]  # per modality, on the probability of the target
    image_map: np.ndarray | None = None  # [*S], summed over channels
    image_method: str | None = None
    tokens: list[tuple[str, float]] = field(default_factory=list)  # whole words with scores
    token_positions: list[list[tuple[int, int]]] = field(default_factory=list)  # (chunk, position) per word
    convergence_delta: float | None = None
    baseline_logit: float | None = None


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
    """Exact Shapley value of each present modality for the target probability (4 forward passes, batched).

    v(S) is the model's probability with only the modalities in S shown. An absent modality's value is 0.
    Also returned: the four v(S) (``v_both``, ``v_image_only``, ``v_report_only``, ``v_none``).
    """
    flags = [(1, 1), (1, 0), (0, 1), (0, 0)]  # both, image only, report only, none
    n = len(flags)
    ip = torch.tensor([a for a, _ in flags], dtype=torch.bool) & x.image_present
    tp = torch.tensor([b for _, b in flags], dtype=torch.bool) & x.text_present
    out = model(x.image.expand(n, *x.image.shape[1:]), ip, x.input_ids.expand(n, *x.input_ids.shape[1:]),
                x.attention_mask.expand(n, *x.attention_mask.shape[1:]), tp)
    v = _probs(out["logits"], task, temperature)[:, target].tolist()
    v_both, v_img, v_txt, v_none = v
    phi_img = 0.5 * ((v_img - v_none) + (v_both - v_txt))
    phi_txt = 0.5 * ((v_txt - v_none) + (v_both - v_img))
    return {"image": float(phi_img), "report": float(phi_txt), "v_none": float(v_none), "v_both": float(v_both),
            "v_image_only": float(v_img), "v_report_only": float(v_txt)}


def merge_wordpieces(tokenizer, ids: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor):
    """Whole words with summed scores from WordPiece tokens (``##`` pieces joined; specials and padding dropped).

    Args:
        ids, mask, scores: ``[K, L]``.
    Returns:
        (list of (word, score), list of the (chunk, position) pairs of each word)
    """
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
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


def explain_study(model, x: StudyInput, *, task: str, tokenizer=None, target: int | None = None,
                  image_method: str = "ig", steps: int = 32, internal_batch_size: int | None = None,
                  temperature: float = 1.0, occlusion_window: int | None = None) -> Attribution:
    """All attributions of one study.

    Args:
        model: a FusionModel (eval mode).
        x: the study.
        task: 'binary', 'multilabel' or 'multiclass'.
        tokenizer: the model's tokenizer (needed for the report).
        target: output index to explain (default: the predicted one; for a binary model, 0).
        image_method: 'ig', 'gradcam' or 'occlusion'.
        steps: Integrated Gradients steps.
        internal_batch_size: IG steps per forward batch (default: all steps in one batch).
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    model.eval()
    with torch.no_grad():
        out = model(*x.args())
    probs = _probs(out["logits"], task, temperature)[0]
    if target is None:
        target = int(probs.argmax()) if task == "multiclass" else (int(probs.argmax()) if probs.numel() > 1 else 0)
    res = Attribution(target=target, logit=float(out["logits"][0, target]), probabilities=probs.tolist(),
                      attention_weights=out["modality_weights"][0].tolist(),
                      shapley=modality_shapley(model, x, target, task, temperature))
    has_img, has_txt = bool(x.image_present[0]), bool(x.text_present[0]) and tokenizer is not None
    ibs = internal_batch_size or steps
    fwd = _target_logit(model, target)
    emb_layer = model.text_encoder.bert.get_input_embeddings() if model.text_encoder is not None else None
    embeds = base_embeds = None
    if has_txt:
        with torch.no_grad():
            embeds = emb_layer(x.input_ids)  # [1, K, L, H]
            base_embeds = emb_layer(baseline_ids(tokenizer, x.input_ids))

    ig_inputs, ig_base = [], []
    if has_img and image_method == "ig":
        ig_inputs.append(x.image)
        ig_base.append(torch.zeros_like(x.image))
    if has_txt:
        ig_inputs.append(embeds)
        ig_base.append(base_embeds)
    if ig_inputs:
        def f(*inp):
            img = inp[0] if (has_img and image_method == "ig") else x.image.expand(inp[0].shape[0], *x.image.shape[1:])
            e = inp[-1] if has_txt else None
            b = inp[0].shape[0]
            rep = lambda t: t.expand(b, *t.shape[1:])  # noqa: E731
            return fwd(img, rep(x.image_present), rep(x.input_ids), rep(x.attention_mask), rep(x.text_present),
                       inputs_embeds=e)

        ig = IntegratedGradients(f)
        attrs, delta = ig.attribute(tuple(ig_inputs), baselines=tuple(ig_base), n_steps=steps,
                                    internal_batch_size=ibs, return_convergence_delta=True)
        res.convergence_delta = float(delta.abs().max())
        with torch.no_grad():
            res.baseline_logit = float(f(*ig_base)[0])
        if has_img and image_method == "ig":
            res.image_map = attrs[0][0].sum(0).detach().numpy()
            res.image_method = "integrated_gradients"
        if has_txt:
            scores = attrs[-1][0].sum(-1).detach()  # [K, L]
            res.tokens, res.token_positions = merge_wordpieces(tokenizer, x.input_ids[0], x.attention_mask[0], scores)

    if has_img and image_method == "gradcam":
        def g(img):
            return fwd(img, x.image_present, x.input_ids, x.attention_mask, x.text_present)

        cam = LayerGradCam(g, gradcam_layer(model))
        a = cam.attribute(x.image.clone().requires_grad_(True), relu_attributions=True)
        up = LayerAttribution.interpolate(a, tuple(x.image.shape[2:]), interpolate_mode="bilinear" if x.image.ndim == 4 else "trilinear")
        res.image_map = up[0].sum(0).detach().numpy()
        res.image_method = "gradcam"
    elif has_img and image_method == "occlusion":
        def g(img):
            b = img.shape[0]
            rep = lambda t: t.expand(b, *t.shape[1:])  # noqa: E731
            return fwd(img, rep(x.image_present), rep(x.input_ids), rep(x.attention_mask), rep(x.text_present))

        size = x.image.shape[2:]
        w = occlusion_window or max(2, min(size) // 8)
        occ = Occlusion(g)
        a = occ.attribute(x.image, sliding_window_shapes=(x.image.shape[1], *([w] * len(size))),
                          strides=(x.image.shape[1], *([max(1, w // 2)] * len(size))), baselines=0.0,
                          perturbations_per_eval=16)
        res.image_map = a[0].sum(0).detach().numpy()
        res.image_method = "occlusion"
    return res
