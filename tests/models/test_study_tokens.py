"""Whole studies in the model: several image slots with view embeddings, a structured-variables token,
masks per token, weights per token and per group, saving as clinfuse-model/2 (issue #13)."""

from __future__ import annotations

import json

import pytest
import torch

from clinfuse.config import config_from_dict
from clinfuse.data.tokens import tokenize_reports
from clinfuse.models.fusion import list_fusions
from clinfuse.config import view_id
from clinfuse.models.model import MODEL_FORMAT, MODEL_FORMAT_STUDY, build_model, load_model, save_model
from clinfuse.models.text import build_tiny_tokenizer, tiny_bert_config
from clinfuse.models.variables import VariableSpec

CORPUS = ["INDICATION: cough. FINDINGS: clear lungs.", "INDICATION: fever, concern for pneumonia.",
          "FINDINGS: small effusion. IMPRESSION: effusion."]
SPEC = {"numeric": ["crp", "temperature_c"], "categorical": {"sex": ["F", "M"]}}


def _cfg(kind="attention", max_images=2, **fusion):
    return config_from_dict({"data": {"image_size": [32, 32]},
                             "model": {"image": {"name": "densenet_tiny", "max_images": max_images},
                                       "text": {"name_or_path": "tiny", "max_length": 16},
                                       "fusion": {"dim": 16, "heads": 2, "kind": kind, **fusion}}})


def _model(kind="attention", variables=SPEC, max_images=2, n_out=2, **fusion):
    tok = build_tiny_tokenizer(CORPUS)
    torch.manual_seed(0)
    return tok, build_model(_cfg(kind, max_images, **fusion), n_out, tiny_bert_config(len(tok)), variables)


def _inputs(tok, n=8, seed=0):
    """n studies cycling through presence patterns of two image slots, report and variables."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = tokenize_reports(tok, [CORPUS[i % 3] for i in range(n)], _cfg().model.text)
    pats = [(1, 1, 1, 1), (1, 0, 1, 1), (0, 1, 0, 1), (1, 1, 1, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 0, 0, 0),
            (0, 0, 0, 0)]
    ip = torch.tensor([[pats[i % 8][0], pats[i % 8][1]] for i in range(n)]).bool()
    tp = torch.tensor([pats[i % 8][2] for i in range(n)]).bool()
    spec = VariableSpec.from_info(SPEC)
    feats = [spec.features({"crp": 10.0 * i, "temperature_c": 37 + i / 10, "sex": "MF"[i % 2]} if pats[i % 8][3]
                           else {}) for i in range(n)]
    kw = {"image_view": torch.tensor([[1, 3]] * n) * ip.long(),
          "variables": torch.stack([x for x, _ in feats]), "variables_present": torch.stack([p for _, p in feats])}
    return (torch.rand(n, 2, 1, 32, 32, generator=g), ip, ids, mask, tp), kw


@pytest.mark.parametrize("kind", list_fusions())
def test_every_kind_reads_slots_and_variables_with_exact_masks(kind):
    tok, m = _model(kind)
    m.eval()
    args, kw = _inputs(tok)
    out = m(*args, **kw)
    assert out["logits"].shape == (8, 2) and out["modality_weights"].shape == (8, 3)
    assert out["token_weights"].shape == (8, 4)  # two image slots, report, variables
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["token_weights"]).all()
    used = torch.tensor(m.uses)[m.token_groups]
    present = torch.cat([args[1], args[4][:, None], kw["variables_present"].any(1, keepdim=True)], 1) & used
    assert (out["token_weights"][~present] == 0).all()  # an absent token has exactly zero weight
    some = present.any(1)
    assert torch.allclose(out["modality_weights"][some].sum(1), torch.ones(int(some.sum())), atol=1e-5)
    # what is absent cannot change the output: other pixels in empty slots, other values for missing variables
    image, variables = args[0].clone(), kw["variables"].clone()
    image[~args[1]] = 7.0
    variables[~kw["variables_present"]] = -50.0
    again = m(image, *args[1:], **{**kw, "variables": variables})
    assert torch.allclose(again["logits"], out["logits"], atol=1e-6)


def test_view_embedding_and_variables_change_the_prediction():
    tok, m = _model()
    m.eval()
    args, kw = _inputs(tok)
    with torch.no_grad():
        m.view_embed.weight.normal_()
    base = m(*args, **kw)["logits"]
    swapped = m(*args, **{**kw, "image_view": kw["image_view"].flip(1)})["logits"]
    row = 0  # both slots present: telling PA from lateral matters
    assert not torch.allclose(base[row], swapped[row])
    more = m(*args, **{**kw, "variables": kw["variables"] + 5.0})["logits"]
    assert not torch.allclose(base[0], more[0])  # variables present in row 0


def test_one_image_and_no_variables_is_the_two_token_model(tmp_path):
    """max_images 1 and no variables: today's parameters (names, shapes), format /1, inputs of either form."""
    tok, m = _model(variables=None, max_images=1)
    keys = set(m.state_dict())
    assert not any(k.startswith(("view_embed", "variables_encoder")) for k in keys)
    assert m.fusion.type_embed.shape == (1, 2, 16) and m.fusion.missing.weight.shape == (4, 16)
    save_model(m, tmp_path / "m", {"config": _cfg(max_images=1).model_dump(mode="json"), "output_names": ["a", "b"]},
               tok, tiny_bert_config(len(tok)))
    assert json.loads((tmp_path / "m" / "model.json").read_text())["format"] == MODEL_FORMAT
    m.eval()
    args, _ = _inputs(tok)
    one = (args[0][:, 0], args[1][:, 0], *args[2:])
    slot = (args[0][:, :1], args[1][:, :1], *args[2:])
    assert torch.allclose(m(*one)["logits"], m(*slot)["logits"], atol=1e-6)


def test_study_model_saves_as_format_2_with_its_variables_and_standardisation(tmp_path):
    tok, m = _model()
    m.variables_encoder.fit_standardisation(torch.tensor([[10.0, 37.0, 1, 0], [30.0, 39.0, 0, 1]]),
                                            torch.ones(2, 4, dtype=torch.bool))
    assert m.variables_encoder.mean[:2].tolist() == [20.0, 38.0] and m.variables_encoder.std[2:].tolist() == [1, 1]
    save_model(m, tmp_path / "m", {"config": _cfg().model_dump(mode="json"), "output_names": ["a", "b"]},
               tok, tiny_bert_config(len(tok)))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == MODEL_FORMAT_STUDY and meta["variables"] == SPEC
    again, meta2, _ = load_model(tmp_path / "m")
    assert again.variables_encoder.mean[:2].tolist() == [20.0, 38.0]
    m.eval()
    args, kw = _inputs(tok)
    assert torch.allclose(m(*args, **kw)["logits"], again(*args, **kw)["logits"], atol=1e-6)


def test_modality_dropout_hides_one_present_group_never_all():
    tok, m = _model(modality_dropout=0.9)
    m.train()
    args, kw = _inputs(tok, n=64)
    present = torch.cat([args[1], args[4][:, None], kw["variables_present"].any(1, keepdim=True)], 1)
    hidden = m._hide_modalities(present)
    gp, gh = m.group_presence(present), m.group_presence(hidden)
    assert (hidden <= present).all()
    assert ((gp.sum(1) - gh.sum(1)) <= 1).all() and (gh.sum(1)[gp.sum(1) >= 1] >= 1).all()
    assert (gp.sum(1) - gh.sum(1)).sum() > 5  # it does hide at that rate
    assert (gh[gp.sum(1) == 1] == gp[gp.sum(1) == 1]).all()  # a lone group is never hidden


def test_variable_features_mask_missing_and_unknown_values():
    spec = VariableSpec.from_info(SPEC)
    x, p = spec.features({"crp": "12.5", "sex": "M", "temperature_c": float("nan")})
    assert x.tolist() == [12.5, 0.0, 0.0, 1.0] and p.tolist() == [True, False, True, True]
    x, p = spec.features({"sex": "X", "crp": None})
    assert not p.any() and not x.any()
    assert spec.problems({"sex": "X", "height": 1, "crp": "high", "temperature_c": ""}) == [
        "height", "sex='X' (not one of ['F', 'M'])", "crp='high' (not a finite number)"]


def test_view_ids():
    assert [view_id(v) for v in ("PA", "ap", "LL", "LATERAL", "", None, "OBLIQUE")] == [1, 2, 3, 3, 0, 0, 4]


def test_a_fusion_without_a_layout_is_refused_for_several_tokens():
    from torch import nn

    from clinfuse.errors import ClinfuseError
    from clinfuse.models import register_fusion
    from clinfuse.models.fusion import FUSIONS

    @register_fusion("test_old_style")
    class _Old(nn.Module):
        def __init__(self, cfg):
            super().__init__()

    try:
        with pytest.raises(ClinfuseError, match="max_images: 1"):
            _model("test_old_style")
    finally:
        FUSIONS.pop("test_old_style")


def test_decode_inverts_features():
    spec = VariableSpec.from_info(SPEC)
    values = {"crp": 12.5, "sex": "M"}
    assert spec.decode(*spec.features(values)) == {"crp": 12.5, "temperature_c": None, "sex": "M"}
