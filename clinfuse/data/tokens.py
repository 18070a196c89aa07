"""Report text -> token ids and masks of the batch contract (``[N, K, L]``), for any Hugging Face tokenizer.

This is data preparation, not model code: the dataset, the model object's ``preprocess`` and the
served model all call it, so a report becomes the same tensors on every path.
"""

from __future__ import annotations

import torch

from ..config import TextEncoderConfig

__all__ = ["tokenize_reports", "empty_tokens"]


def empty_tokens(n: int, cfg: TextEncoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding ids and zero masks ``[N, K, L]`` (models without a text encoder)."""
    k = 1 if cfg.long_text == "truncate" else cfg.max_chunks
    ids = torch.zeros(n, k, cfg.max_length, dtype=torch.long)
    return ids, torch.zeros_like(ids)


def tokenize_reports(tokenizer, texts: list[str], cfg: TextEncoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks ``[N, K, L]`` (K = 1 when truncating, ``max_chunks`` when chunking).

    An empty text gives a chunk of padding with mask 0 (the dataset flags it as absent).
    """
    length = cfg.max_length
    k = 1 if cfg.long_text == "truncate" else cfg.max_chunks
    pad = tokenizer.pad_token_id or 0
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = torch.full((len(texts), k, length), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), k, length), dtype=torch.long)
    body_len = length - 2
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    for i, toks in enumerate(encoded):
        if not toks:
            continue
        pieces = [toks[j : j + body_len] for j in range(0, len(toks), body_len)][:k]
        for c, piece in enumerate(pieces):
            row = [cls_id, *piece, sep_id]
            ids[i, c, : len(row)] = torch.tensor(row)
            mask[i, c, : len(row)] = 1
    return ids, mask
