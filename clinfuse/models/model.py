"""The full model: image encoder + text encoder + fusion + head; building, saving and loading.

``build_model(cfg, n_outputs, text_hf_config)`` builds the architecture (never touches the network).
``save_model`` writes ``model.safetensors`` + ``model.json`` (the resolved config, label names,
thresholds, input size) + ``text/`` (the text encoder's Hugging Face config and tokenizer), so that
``load_model(dir)`` rebuilds the model without the YAML and without network access.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..config import VIEW_NAMES, Config
from ..errors import ClinfuseError, ModelLoadError
from .fusion import TokenLayout, _presence_weights, fusion_class, group_presence
from .image import ImageEncoder
from .lexical import LexicalHead
from .text import TextEncoder
from .variables import VariablesEncoder, VariableSpec

__all__ = ["FusionModel", "build_model", "save_model", "load_model", "probabilities", "MODEL_FORMAT",
           "MODEL_FORMAT_STUDY", "study_kwargs", "STUDY_KEYS"]

MODEL_FORMAT = "clinfuse-model/1"  # one image and the report (two tokens): the first version's folders
MODEL_FORMAT_STUDY = "clinfuse-model/2"  # several image slots and/or a variables token
MODEL_FORMATS = (MODEL_FORMAT, MODEL_FORMAT_STUDY)

_OTHER_VIEW = VIEW_NAMES.index("other")
STUDY_KEYS = ("image_view", "variables", "variables_present")  # keyword inputs beyond the first five


def study_kwargs(batch: dict) -> dict:
    """The keyword inputs of :class:`FusionModel` that a batch carries (view ids, variables)."""
    return {k: batch[k] for k in STUDY_KEYS if k in batch}


class FusionModel(nn.Module):
    """A study's images, report and structured variables -> logits and per-modality weights.

    Forward inputs follow the batch contract (docs/concepts.md): ``image [B, C, *spatial]`` with
    ``image_present [B]`` (one image slot), or ``image [B, N, C, *spatial]`` with ``image_present
    [B, N]`` (N slots, up to ``model.image.max_images``; ``image_view [B, N]`` from
    :func:`clinfuse.config.view_id`),
    ``input_ids``/``attention_mask [B, K, L]``, ``text_present [B]``, and for a model that reads
    variables ``variables``/``variables_present [B, F]`` (:class:`~.variables.VariableSpec`).
    Returns ``{"logits": [B, n_outputs], "modality_weights": [B, G], "token_weights": [B, M]}`` (G
    groups: image, report[, variables]; M tokens, image slots first), plus ``"aux_logits": [B, G,
    n_outputs]`` and ``"present": [B, G]`` (after modality dropout) when ``fusion.aux_weight > 0``: one
    linear head per group on its own features, for the trainer's auxiliary loss.
    """

    def __init__(self, cfg: Config, n_outputs: int, text_hf_config, variables=None, n_views: int | None = None):
        super().__init__()
        import inspect

        f = cfg.model.fusion
        self.kind = f.kind
        self.modality_dropout = f.modality_dropout
        self.n_outputs = n_outputs
        self.dim = d = f.dim
        self.spatial_dims = cfg.model.image.spatial_dims
        spec = variables if isinstance(variables, VariableSpec) else VariableSpec.from_info(variables)
        if not cfg.model.variables.enabled:
            spec = VariableSpec()
        self.variable_spec = spec
        n_img = cfg.model.image.slots
        self.layout = layout = TokenLayout(n_img, spec.n_features)
        fusion = fusion_class(f.kind)
        self.late = bool(getattr(fusion, "late", False))
        uses = tuple(getattr(fusion, "uses", (True, True, True)))
        self.uses = (uses + (False,) * 3)[: layout.n_groups]  # a group a 'uses' does not list is not read
        if self.late and f.aux_weight > 0:
            raise ClinfuseError(f"model.fusion.aux_weight applies to fused kinds (e.g. 'attention', 'concat'), not "
                                f"{f.kind!r}, whose modalities already have a head each; set aux_weight: 0")
        self.image_encoder = ImageEncoder(cfg.model.image, d, tuple(cfg.data.image_size)) if self.uses[0] else None
        self.text_encoder = TextEncoder(cfg.model.text, d, text_hf_config) if self.uses[1] else None
        if "layout" in inspect.signature(fusion.__init__).parameters:
            self.fusion = fusion(f, layout=layout)
        elif layout.two_tokens:
            self.fusion = fusion(f)
        else:
            raise ClinfuseError(f"fusion {f.kind!r} takes no token layout (its constructor has no 'layout' "
                                "argument), so it reads one image and the report only; set model.image.max_images: 1 "
                                "and model.variables.enabled: false, or give it a layout argument")
        g = layout.n_groups
        if not self.late:
            self.head = nn.Sequential(nn.Dropout(f.dropout), nn.Linear(d, n_outputs))
            self.aux_heads = nn.ModuleList([nn.Linear(d, n_outputs) for _ in range(g)]) if f.aux_weight > 0 else None
        else:  # one head per group + a prior for rows with none (the late kind has no parameters)
            self.heads = nn.ModuleList([nn.Sequential(nn.Dropout(f.dropout), nn.Linear(d, n_outputs))
                                        for _ in range(g)])
            self.prior = nn.Parameter(torch.zeros(n_outputs))
        # created last, so that a two-token model draws its initial weights exactly as before
        # n_views: the rows of a saved model's embedding (a model saved before the series planes has 5)
        self.view_embed = nn.Embedding(n_views or len(VIEW_NAMES), d) if n_img > 1 and self.uses[0] else None
        if self.view_embed is not None:
            nn.init.zeros_(self.view_embed.weight)
        self.variables_encoder = VariablesEncoder(spec, d, cfg.model.variables.hidden, f.dropout) \
            if layout.n_variables and self.uses[2] else None
        lex = cfg.model.text.lexical
        self.lexical = LexicalHead(lex, text_hf_config.vocab_size, n_outputs) \
            if lex.enabled and self.text_encoder is not None else None
        self.register_buffer("group_mask", layout.group_mask(), persistent=False)  # [G, M]
        self.register_buffer("token_groups", torch.tensor(layout.groups), persistent=False)  # [M]

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.layout.group_names

    def _hide_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Modality dropout: hide one of the present groups at the configured rate (training only), never all."""
        if not self.training or self.modality_dropout <= 0:
            return present
        gp = self.group_presence(present)
        b = present.shape[0]
        if gp.shape[1] == 2:  # the two-token draw, kept as it was (same random numbers, same runs)
            drop = gp.all(1) & (torch.rand(b, device=present.device) < self.modality_dropout)
            which = torch.randint(0, 2, (b,), device=present.device)
            hide = torch.stack([drop & (which == 0), drop & (which == 1)], dim=1)
        else:
            drop = (gp.sum(1) >= 2) & (torch.rand(b, device=present.device) < self.modality_dropout)
            pick = (torch.rand(gp.shape, device=present.device) * gp).argmax(1)
            hide = nn.functional.one_hot(pick, gp.shape[1]).bool() & drop[:, None]
        return present & ~hide[:, self.token_groups]

    def group_presence(self, present: torch.Tensor) -> torch.Tensor:
        """Token presence ``[B, M]`` -> group presence ``[B, G]``."""
        return group_presence(present, self.group_mask)

    def group_features(self, feats: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean of each group's present token features ``[B, G, d]`` and group presence ``[B, G]``."""
        w = (present[:, None, :] & self.group_mask[None]).to(feats.dtype)  # [B, G, M]
        n = w.sum(-1, keepdim=True)
        return (w @ feats) / n.clamp(min=1.0), n[..., 0] > 0

    def image_slots(self, image: torch.Tensor, image_present: torch.Tensor):
        """``image [B, N, C, *S]`` and ``image_present [B, N]`` from either input form."""
        if image.ndim == self.spatial_dims + 2:  # [B, C, *S]: one slot
            return image[:, None], image_present.reshape(-1, 1).bool()
        return image, image_present.reshape(image.shape[0], image.shape[1]).bool()

    def encode(self, image, image_present, input_ids, attention_mask, text_present, inputs_embeds=None, *,
               image_view=None, variables=None, variables_present=None):
        """Token features ``[B, M, d]`` and presence ``[B, M]`` (encoders run on present inputs only;
        the images of all studies in one encoder call)."""
        lay = self.layout
        image, ip = self.image_slots(image, image_present)
        b, n = ip.shape
        if n > lay.n_images:  # more images than slots: the first ones (frontal views come first)
            image, ip, n = image[:, : lay.n_images], ip[:, : lay.n_images], lay.n_images
            image_view = image_view[:, : lay.n_images] if image_view is not None else None
        slots = torch.zeros(b, lay.n_images, dtype=torch.bool, device=ip.device)
        slots[:, :n] = ip
        tp = text_present.reshape(b).bool()
        parts = [slots, tp[:, None]]
        if lay.n_variables:
            vp = variables_present.bool().any(1) if variables_present is not None else torch.zeros_like(tp)
            parts.append(vp[:, None])
        present = torch.cat(parts, dim=1)  # [B, M]
        if not all(self.uses):
            present = present & torch.tensor(self.uses, device=present.device)[self.token_groups]
        present = self._hide_modalities(present)
        tokens: list[torch.Tensor | None] = [None] * lay.n_tokens
        img_rows = present[:, :n]
        if self.image_encoder is not None and img_rows.any():
            val = self.image_encoder(image[img_rows])  # [K, d]: every present image of the batch at once
            out = torch.zeros(b, n, val.shape[-1], dtype=val.dtype, device=val.device)
            out = out.index_put(img_rows.nonzero(as_tuple=True), val)
            if self.view_embed is not None:
                vid = image_view[:, :n].long() if image_view is not None else torch.zeros(b, n, dtype=torch.long,
                                                                                           device=out.device)
                vid = vid.masked_fill(vid >= self.view_embed.num_embeddings, _OTHER_VIEW)  # a view it has no row for
                out = out + self.view_embed(vid).to(out.dtype) * img_rows[..., None].to(out.dtype)
            for j in range(n):
                tokens[j] = out[:, j]
        rows = present[:, lay.n_images]
        if self.text_encoder is not None and rows.any():
            emb = inputs_embeds[rows] if inputs_embeds is not None else None
            val = self.text_encoder(input_ids[rows], attention_mask[rows], inputs_embeds=emb)
            tokens[lay.n_images] = _scatter(val, rows, b)
        if lay.n_variables:
            rows = present[:, -1]
            if self.variables_encoder is not None and rows.any():
                val = self.variables_encoder(variables[rows].float(), variables_present[rows])
                tokens[-1] = _scatter(val, rows, b)
        ref = next((x for x in tokens if x is not None), None)
        if ref is None:
            ref = torch.zeros(b, self.dim, device=present.device)
        feats = [x if x is not None else torch.zeros_like(ref) for x in tokens]
        return torch.stack(feats, dim=1), present  # [B, M, d]

    def lexical_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The fitted lexical branch's logits ``[B, C]`` (None without one, or before it is fitted)."""
        if self.lexical is None or not self.lexical.is_fitted:
            return None
        return self.lexical(input_ids, attention_mask)

    def forward(self, image, image_present, input_ids, attention_mask, text_present, inputs_embeds=None, **study):
        feats, present = self.encode(image, image_present, input_ids, attention_mask, text_present, inputs_embeds,
                                     **study)
        out = self.fuse(feats, present, self.lexical_logits(input_ids, attention_mask))
        if not self.late and self.aux_heads is not None:
            gf, gp = self.group_features(feats, present)
            out["aux_logits"] = torch.stack([self.aux_heads[g](gf[:, g]) for g in range(gf.shape[1])], dim=1)
            out["present"] = gp
        return out

    def fuse(self, feats: torch.Tensor, present: torch.Tensor, lexical: torch.Tensor | None = None) -> dict:
        """Logits and weights from token features ``[B, M, d]`` and presence ``[B, M]``; `lexical`: the
        lexical branch's logits ``[B, C]`` (:meth:`lexical_logits`), blended in where the report is present.

        Inference calls it once per presence pattern on features encoded once: the probability with a
        modality hidden costs one fusion, not another pass through the encoders.
        """
        out = self._fuse(feats, present)
        if lexical is not None:
            w = self.lexical.blend
            report = present[:, self.layout.n_images, None]
            out["logits"] = torch.where(report, (1 - w) * out["logits"] + w * lexical.to(out["logits"].dtype),
                                        out["logits"])
        return out

    def _fuse(self, feats: torch.Tensor, present: torch.Tensor) -> dict:
        gm = self.group_mask.to(feats.dtype)  # [G, M]
        if not self.late:
            fused, tw = self.fusion(feats, present)
            return {"logits": self.head(fused), "modality_weights": tw @ gm.T, "token_weights": tw}
        gf, gp = self.group_features(feats, present)
        per = torch.stack([self.heads[g](gf[:, g]) for g in range(gf.shape[1])], dim=1)  # [B, G, C]
        weights = _presence_weights(gp)
        logits = (per * weights[..., None]).sum(1)
        none = ~gp.any(1)
        logits = torch.where(none[:, None], self.prior.expand_as(logits), logits)
        per_token = present.to(feats.dtype) / (present.to(feats.dtype) @ gm.T @ gm).clamp(min=1.0)
        tw = per_token * (weights @ gm)
        return {"logits": logits, "modality_weights": weights, "token_weights": tw}


def _scatter(val: torch.Tensor, rows: torch.Tensor, b: int) -> torch.Tensor:
    out = torch.zeros(b, val.shape[-1], dtype=val.dtype, device=val.device)
    return out.index_put((rows.nonzero(as_tuple=True)[0],), val)


def probabilities(logits, task: str, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated probabilities from logits (tensor or array): ``logits / temperature`` through a softmax
    (multi-class) or a sigmoid (binary, multi-label), in float64."""
    z = torch.as_tensor(logits).double() / float(temperature)
    return torch.softmax(z, -1) if task == "multiclass" else torch.sigmoid(z)


def build_model(cfg: Config, n_outputs: int, text_hf_config, variables=None, n_views: int | None = None) -> FusionModel:
    """Build the architecture from the config (no weights are read, nothing is downloaded).
    `variables`: the cohort's (or model.json's) variables declaration, or None; `n_views`: the rows of the
    view embedding (default: every name of ``VIEW_NAMES``; a saved model's own count when it is loaded)."""
    return FusionModel(cfg, n_outputs, text_hf_config, variables, n_views)


def save_model(model: FusionModel, out_dir: str | Path, meta: dict, tokenizer, text_hf_config) -> Path:
    """Write ``model.safetensors``, ``text/`` and ``model.json`` (with the weights' SHA-256) as the
    folder `out_dir`. The files are written into a hidden folder beside it, which then replaces
    `out_dir` (:func:`swap_in_folder`): a save killed at any point leaves the previous model or the
    new one, never a mix and never neither (:func:`recover_folder` finishes an interrupted swap).
    Other entries of an existing `out_dir` (an ``eval-test/`` say) are kept. Returns the folder."""
    import hashlib
    import os
    import shutil

    from safetensors.torch import save_model as st_save

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out)
    work = out.parent / f".{out.name}.saving-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    st_save(_unwrap(model), str(work / "model.safetensors"))
    digest = hashlib.sha256((work / "model.safetensors").read_bytes()).hexdigest()
    text_dir = work / "text"
    text_dir.mkdir()
    if text_hf_config is not None:
        text_hf_config.save_pretrained(text_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(text_dir)
    net = _unwrap(model)
    layout = getattr(net, "layout", None)
    fmt = MODEL_FORMAT if layout is None or layout.two_tokens else MODEL_FORMAT_STUDY
    extra = {"variables": net.variable_spec.to_json()} if layout is not None and layout.n_variables else {}
    full = {"format": fmt, "clinfuse_version": __version__, **meta, **extra, "weights_sha256": digest}
    (work / "model.json").write_text(json.dumps(full, indent=2))
    if out.is_dir():  # keep what else lives in the folder
        for child in out.iterdir():
            if child.name not in ("model.json", "model.safetensors", "text"):
                os.replace(child, work / child.name)
    swap_in_folder(work, out)
    return out


def _aside(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def swap_in_folder(new: Path, final: Path) -> None:
    """Make folder `new` be `final`: the old `final` is moved aside, `new` renamed in, the old one removed."""
    import os
    import shutil

    old = _aside(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)  # a kill just before this leaves only the old folder aside: recover_folder
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: str | Path) -> None:
    """Finish a save that was interrupted: put the previous folder back where the new one never
    arrived; remove what an interrupted save left beside it."""
    import os
    import shutil

    final = Path(final)
    old = _aside(final)
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    if final.parent.is_dir():
        for tmp in final.parent.glob(f".{final.name}.saving-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _saved_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a safetensors file, read from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def load_model(model_dir: str | Path, map_location: str = "cpu") -> tuple[FusionModel, dict, object]:
    """Rebuild a saved model from its folder (no YAML, no network, no code execution).

    Returns:
        (model in eval mode, meta from model.json, tokenizer or None)

    Raises:
        ModelLoadError: the folder is not a clinfuse model.
    """
    from safetensors.torch import load_model as st_load
    from transformers import AutoConfig, AutoTokenizer

    d = Path(model_dir)
    recover_folder(d)
    if not (d / "model.json").is_file() or not (d / "model.safetensors").is_file():
        raise ModelLoadError(f"{d}: not a clinfuse model folder (needs model.json and model.safetensors)")
    meta = json.loads((d / "model.json").read_text())
    if meta.get("format") not in MODEL_FORMATS:
        raise ModelLoadError(f"{d}/model.json: format {meta.get('format')!r}, expected one of {list(MODEL_FORMATS)} "
                             "(a newer clinfuse wrote it? upgrade clinfuse)")
    want = meta.get("weights_sha256")
    if want is not None:
        import hashlib

        got = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
        if got != want:
            raise ModelLoadError(f"{d}/model.safetensors does not match the checksum in model.json (the file is "
                                 "damaged or was replaced); restore the folder or retrain")
    cfg = Config.model_validate(meta["config"])
    shapes = _saved_shapes(d / "model.safetensors")
    if cfg.model.text.lexical.enabled and "lexical.coef" not in shapes:
        cfg.model.text.lexical.enabled = False  # saved without the branch: the network alone, as it was trained
    text_cfg, tokenizer = None, None
    if (d / "text" / "config.json").is_file():
        text_cfg = AutoConfig.from_pretrained(d / "text", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(d / "text", local_files_only=True)
    model = build_model(cfg, len(meta["output_names"]), text_cfg, meta.get("variables"),
                        shapes.get("view_embed.weight", [None])[0])
    missing, unexpected = st_load(model, str(d / "model.safetensors"), strict=False, device=map_location)
    missing = [k for k in missing if k != "lexical.weight"]  # saved before the blend weight was stored: the config's
    if missing or unexpected:
        raise ModelLoadError(f"{d}/model.safetensors does not fit the model its model.json describes "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}); restore the folder or retrain")
    model.eval()
    return model, meta, tokenizer
