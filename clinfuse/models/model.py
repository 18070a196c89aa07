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
from ..config import Config
from ..errors import ClinfuseError, ModelLoadError
from .fusion import _presence_weights, fusion_class
from .image import ImageEncoder
from .text import TextEncoder

__all__ = ["FusionModel", "build_model", "save_model", "load_model", "probabilities", "MODEL_FORMAT"]

MODEL_FORMAT = "clinfuse-model/1"


class FusionModel(nn.Module):
    """Image + report -> logits and per-modality weights.

    Forward inputs follow the batch contract (docs/concepts.md): ``image [B, C, *spatial]``,
    ``image_present [B]``, ``input_ids``/``attention_mask [B, K, L]``, ``text_present [B]``.
    Returns ``{"logits": [B, n_outputs], "modality_weights": [B, 2]}``, plus ``"aux_logits": [B, 2,
    n_outputs]`` and ``"present": [B, 2]`` (after modality dropout) when ``fusion.aux_weight > 0``: one
    linear head per modality on its own features, for the trainer's auxiliary loss.
    """

    def __init__(self, cfg: Config, n_outputs: int, text_hf_config):
        super().__init__()
        f = cfg.model.fusion
        self.kind = f.kind
        self.modality_dropout = f.modality_dropout
        self.n_outputs = n_outputs
        self.dim = d = f.dim
        fusion = fusion_class(f.kind)
        self.late = bool(getattr(fusion, "late", False))
        self.uses = tuple(getattr(fusion, "uses", (True, True)))
        if self.late and f.aux_weight > 0:
            raise ClinfuseError(f"model.fusion.aux_weight applies to fused kinds (e.g. 'attention', 'concat'), not "
                                f"{f.kind!r}, whose modalities already have a head each; set aux_weight: 0")
        self.image_encoder = ImageEncoder(cfg.model.image, d, tuple(cfg.data.image_size)) if self.uses[0] else None
        self.text_encoder = TextEncoder(cfg.model.text, d, text_hf_config) if self.uses[1] else None
        self.fusion = fusion(f)
        if not self.late:
            self.head = nn.Sequential(nn.Dropout(f.dropout), nn.Linear(d, n_outputs))
            self.aux_heads = nn.ModuleList([nn.Linear(d, n_outputs) for _ in range(2)]) if f.aux_weight > 0 else None
        else:  # one head per modality + a prior for rows with none (the late kind has no parameters)
            self.heads = nn.ModuleList([nn.Sequential(nn.Dropout(f.dropout), nn.Linear(d, n_outputs))
                                        for _ in range(2)])
            self.prior = nn.Parameter(torch.zeros(n_outputs))

    def _hide_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Modality dropout: hide one of two present modalities at the configured rate (training only)."""
        if not self.training or self.modality_dropout <= 0:
            return present
        both = present.all(1)
        drop = both & (torch.rand(present.shape[0], device=present.device) < self.modality_dropout)
        which = torch.randint(0, 2, (present.shape[0],), device=present.device)
        hide = torch.stack([drop & (which == 0), drop & (which == 1)], dim=1)
        return present & ~hide

    def encode(self, image, image_present, input_ids, attention_mask, text_present, inputs_embeds=None):
        """Per-modality features ``[B, 2, d]`` and presence ``[B, 2]`` (encoders run on present rows only)."""
        present = torch.stack([image_present.bool(), text_present.bool()], dim=1)
        if not all(self.uses):
            present = present & torch.tensor(self.uses, device=present.device)
        present = self._hide_modalities(present)
        b = present.shape[0]
        feats = []
        for m, enc in enumerate((self.image_encoder, self.text_encoder)):
            out = None
            rows = present[:, m]
            if enc is not None and rows.any():
                if m == 0:
                    sel = image[rows]
                    val = enc(sel)
                else:
                    emb = inputs_embeds[rows] if inputs_embeds is not None else None
                    val = enc(input_ids[rows], attention_mask[rows], inputs_embeds=emb)
                out = torch.zeros(b, val.shape[-1], dtype=val.dtype, device=val.device)
                out = out.index_put((rows.nonzero(as_tuple=True)[0],), val)
            feats.append(out)
        ref = next((x for x in feats if x is not None), None)
        if ref is None:
            ref = torch.zeros(b, self.dim, device=present.device)
        feats = [x if x is not None else torch.zeros_like(ref) for x in feats]
        return torch.stack(feats, dim=1), present  # [B, 2, d] one token per modality

    def forward(self, image, image_present, input_ids, attention_mask, text_present, inputs_embeds=None):
        feats, present = self.encode(image, image_present, input_ids, attention_mask, text_present, inputs_embeds)
        out = self.fuse(feats, present)
        if not self.late and self.aux_heads is not None:
            out["aux_logits"] = torch.stack([self.aux_heads[m](feats[:, m]) for m in range(2)], dim=1)  # [B, 2, C]
            out["present"] = present
        return out

    def fuse(self, feats: torch.Tensor, present: torch.Tensor) -> dict:
        """Logits and modality weights from per-modality features ``[B, 2, d]`` and presence ``[B, 2]``.

        Inference calls it once per presence pattern on features encoded once: the probability with a
        modality hidden costs one fusion, not another pass through the encoders.
        """
        if not self.late:
            fused, weights = self.fusion(feats, present)
            return {"logits": self.head(fused), "modality_weights": weights}
        per = torch.stack([self.heads[m](feats[:, m]) for m in range(2)], dim=1)  # [B, 2, C]
        weights = _presence_weights(present)
        logits = (per * weights[..., None]).sum(1)
        none = ~present.any(1)
        logits = torch.where(none[:, None], self.prior.expand_as(logits), logits)
        return {"logits": logits, "modality_weights": weights}


def probabilities(logits, task: str, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated probabilities from logits (tensor or array): ``logits / temperature`` through a softmax
    (multi-class) or a sigmoid (binary, multi-label), in float64."""
    z = torch.as_tensor(logits).double() / float(temperature)
    return torch.softmax(z, -1) if task == "multiclass" else torch.sigmoid(z)


def build_model(cfg: Config, n_outputs: int, text_hf_config) -> FusionModel:
    """Build the architecture from the config (no weights are read, nothing is downloaded)."""
    return FusionModel(cfg, n_outputs, text_hf_config)


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
    full = {"format": MODEL_FORMAT, "clinfuse_version": __version__, **meta, "weights_sha256": digest}
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
    if meta.get("format") != MODEL_FORMAT:
        raise ModelLoadError(f"{d}/model.json: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    want = meta.get("weights_sha256")
    if want is not None:
        import hashlib

        got = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
        if got != want:
            raise ModelLoadError(f"{d}/model.safetensors does not match the checksum in model.json (the file is "
                                 "damaged or was replaced); restore the folder or retrain")
    cfg = Config.model_validate(meta["config"])
    text_cfg, tokenizer = None, None
    if (d / "text" / "config.json").is_file():
        text_cfg = AutoConfig.from_pretrained(d / "text", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(d / "text", local_files_only=True)
    model = build_model(cfg, len(meta["output_names"]), text_cfg)
    st_load(model, str(d / "model.safetensors"), device=map_location)
    model.eval()
    return model, meta, tokenizer
