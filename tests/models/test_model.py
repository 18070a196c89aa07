"""Shapes, masks and gradients for every fusion kind and every missingness pattern."""

from __future__ import annotations


import pytest
import torch

from clinfuse.config import config_from_dict
from clinfuse.models.fusion import AttentionFusion
from clinfuse.models.image import ImageEncoder, list_image_encoders
from clinfuse.models.model import build_model, load_model, save_model
from clinfuse.data.tokens import tokenize_reports
from clinfuse.models.text import build_tiny_tokenizer, tiny_bert_config
from clinfuse.config import FusionConfig, ImageEncoderConfig
from clinfuse.models.fusion import list_fusions

FUSION_KINDS = list_fusions()

CORPUS = ["INDICATION: cough. FINDINGS: clear lungs.", "INDICATION: fever, concern for pneumonia.",
          "FINDINGS: small effusion. IMPRESSION: effusion."]
PATTERNS = [(1, 1), (1, 0), (0, 1), (0, 0)]


def _cfg(kind="attention", **fusion):
    return config_from_dict({"data": {"image_size": [32, 32]},
                             "model": {"image": {"name": "densenet_tiny"}, "text": {"name_or_path": "tiny", "max_length": 16},
                                       "fusion": {"dim": 16, "heads": 2, "kind": kind, **fusion}}})


def _batch(n=4, patterns=PATTERNS):
    tok = build_tiny_tokenizer(CORPUS)
    ids, mask = tokenize_reports(tok, [CORPUS[i % 3] for i in range(n)], _cfg().model.text)
    ip = torch.tensor([patterns[i % len(patterns)][0] for i in range(n)]).bool()
    tp = torch.tensor([patterns[i % len(patterns)][1] for i in range(n)]).bool()
    return tok, (torch.randn(n, 1, 32, 32), ip, ids, mask, tp)


def _model(kind="attention", n_out=3, **fusion):
    tok = build_tiny_tokenizer(CORPUS)
    torch.manual_seed(0)
    return build_model(_cfg(kind, **fusion), n_out, tiny_bert_config(len(tok)))


def test_registries_are_open_at_run_time():
    """A backbone or fusion registered by user code is accepted by the config and built by name."""
    from torch import nn

    from clinfuse.errors import ClinfuseError
    from clinfuse.models import register_fusion, register_image_encoder
    from clinfuse.models.fusion import FUSIONS, ConcatFusion
    from clinfuse.models.image import _REGISTRY

    assert {"densenet121", "resnet18", "vit"} <= set(list_image_encoders())
    assert {"attention", "concat", "mean_logits", "image_only", "text_only"} <= set(FUSION_KINDS)

    @register_image_encoder("test_pool")
    def _pool(cfg, d, size):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cfg.in_channels, d))

    @register_fusion("test_concat")
    class _MyConcat(ConcatFusion):
        pass

    try:
        cfg = config_from_dict({"data": {"image_size": [32, 32]},
                                "model": {"image": {"name": "test_pool"}, "text": {"name_or_path": "tiny", "max_length": 16},
                                          "fusion": {"dim": 16, "heads": 2, "kind": "test_concat"}}})
        tok, b = _batch(4)
        m = build_model(cfg, 2, tiny_bert_config(len(tok)))
        assert m(*b)["logits"].shape == (4, 2) and isinstance(m.fusion, _MyConcat)
    finally:
        _REGISTRY.pop("test_pool"), FUSIONS.pop("test_concat")
    with pytest.raises(ClinfuseError, match="registered: .*attention"):
        build_model(_cfg("no_such_fusion"), 2, tiny_bert_config(len(tok)))


@pytest.mark.parametrize("kind", FUSION_KINDS)
@pytest.mark.parametrize("train", [False, True])
def test_shapes_and_weights_for_every_kind_and_pattern(kind, train):
    m = _model(kind)
    m.train(train)
    _, b = _batch(8)
    out = m(*b)
    assert out["logits"].shape == (8, 3) and out["modality_weights"].shape == (8, 2)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["modality_weights"]).all()
    w, ip, tp = out["modality_weights"], b[1], b[4]
    if kind == "image_only":
        tp = torch.zeros_like(tp)
    if kind == "text_only":
        ip = torch.zeros_like(ip)
    assert (w[~ip, 0] == 0).all() and (w[~tp, 1] == 0).all(), "an absent modality gets exactly zero weight"
    present_any = ip | tp
    torch.testing.assert_close(w[present_any].sum(1), torch.ones(int(present_any.sum())))


def test_absent_modality_content_cannot_change_the_output():
    m = _model().eval()
    _, (img, ip, ids, mask, tp) = _batch(4, [(0, 1)])
    a = m(img, ip, ids, mask, tp)["logits"]
    b = m(torch.randn_like(img) * 100, ip, ids, mask, tp)["logits"]
    torch.testing.assert_close(a, b)


def test_attention_fusion_all_absent_row_is_finite_and_zero_in_train_mode():
    f = AttentionFusion(FusionConfig(dim=8, heads=2, missing="none")).train()
    fused, w = f(torch.randn(3, 2, 8), torch.tensor([[0, 0], [1, 0], [1, 1]]).bool())
    assert torch.isfinite(fused).all()
    assert (fused[0] == 0).all() and (w[0] == 0).all()
    assert w[1].tolist() == [1.0, 0.0]


def test_learned_missing_embedding_distinguishes_patterns():
    f = AttentionFusion(FusionConfig(dim=8, heads=2, missing="learned")).eval()
    with torch.no_grad():
        f.missing.weight.copy_(torch.arange(32, dtype=torch.float32).reshape(4, 8))
    fused, _ = f(torch.zeros(2, 2, 8), torch.tensor([[0, 0], [0, 0]]).bool())
    torch.testing.assert_close(fused[0], f.missing.weight[0])


def test_gradient_reaches_both_encoders():
    m = _model().train()
    _, b = _batch(4, [(1, 1)])
    m(*b)["logits"].sum().backward()
    img_grad = sum(p.grad.abs().sum() for p in m.image_encoder.parameters() if p.grad is not None)
    txt_grad = sum(p.grad.abs().sum() for p in m.text_encoder.bert.parameters() if p.grad is not None)
    assert img_grad > 0 and txt_grad > 0


def test_modality_dropout_hides_one_of_two_in_training_only():
    m = _model(modality_dropout=0.99)
    present = torch.ones(200, 2, dtype=torch.bool)
    m.train()
    hidden = m._hide_modalities(present)
    assert (hidden.sum(1) == 1).float().mean() > 0.9 and hidden.any(1).all()
    m.eval()
    assert m._hide_modalities(present).all()


def test_freeze_layers():
    cfg = config_from_dict({"data": {"image_size": [32, 32]},
                            "model": {"image": {"name": "densenet_tiny"},
                                      "text": {"name_or_path": "tiny", "freeze_layers": 1}}})
    tok = build_tiny_tokenizer(CORPUS)
    m = build_model(cfg, 1, tiny_bert_config(len(tok)))
    layers = m.text_encoder.bert.encoder.layer
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not m.text_encoder.bert.get_input_embeddings().weight.requires_grad


def test_long_reports_are_chunked_and_pooled():
    tok = build_tiny_tokenizer(CORPUS)
    cfg = config_from_dict({"model": {"text": {"name_or_path": "tiny", "max_length": 8, "long_text": "chunks",
                                               "max_chunks": 3}}}).model.text
    ids, mask = tokenize_reports(tok, [" ".join(CORPUS), "", "cough."], cfg)
    assert ids.shape == (3, 3, 8)
    assert mask[0, :, 0].tolist() == [1, 1, 1] and mask[1].sum() == 0 and mask[2, :, 0].tolist() == [1, 0, 0]
    assert (ids[0, :, 0] == tok.cls_token_id).all()


@pytest.mark.parametrize("name", ["densenet_tiny", "resnet10", "efficientnet-b0", "vit", "densenet121", "resnet18"])
def test_image_encoders_2d(name):
    enc = ImageEncoder(ImageEncoderConfig(name=name), 16, (64, 64)).eval()
    assert enc(torch.randn(2, 1, 64, 64)).shape == (2, 16)


@pytest.mark.parametrize("name", ["densenet_tiny", "resnet10"])
def test_image_encoders_3d(name):
    enc = ImageEncoder(ImageEncoderConfig(name=name, spatial_dims=3), 16, (16, 32, 32)).eval()
    assert enc(torch.randn(2, 1, 16, 32, 32)).shape == (2, 16)


def test_unprojected_encoder_gives_the_pooled_features(tmp_path):
    """model.image.project false: the classification layer is dropped, so the token is what that layer
    read; a fusion width other than the pooled width is refused with the width to set; the model saves and
    loads with it."""
    from clinfuse.errors import ClinfuseError

    torch.manual_seed(0)
    proj = ImageEncoder(ImageEncoderConfig(name="densenet_tiny"), 16, (32, 32)).eval()
    width = proj.net.class_layers.out.in_features
    raw = ImageEncoder(ImageEncoderConfig(name="densenet_tiny", project=False), width, (32, 32)).eval()
    head = {"class_layers.out.weight", "class_layers.out.bias"}
    raw.net.load_state_dict({k: v for k, v in proj.net.state_dict().items() if k not in head})
    x = torch.randn(2, 1, 32, 32)
    assert raw(x).shape == (2, width)
    torch.testing.assert_close(proj.net.class_layers.out(raw(x)), proj(x))
    with pytest.raises(ClinfuseError, match=f"model.fusion.dim={width}"):
        ImageEncoder(ImageEncoderConfig(name="densenet_tiny", project=False), 16, (32, 32))

    tok = build_tiny_tokenizer(CORPUS)
    hf = tiny_bert_config(len(tok))
    cfg = config_from_dict({"data": {"image_size": [32, 32]},
                            "model": {"image": {"name": "densenet_tiny", "project": False},
                                      "text": {"name_or_path": "tiny", "max_length": 16},
                                      "fusion": {"dim": width, "heads": 1, "kind": "image_only"}}})
    m = build_model(cfg, 1, hf).eval()
    save_model(m, tmp_path / "m", {"config": cfg.model_dump(mode="json"), "output_names": ["a"], "task": "binary"},
               tok, hf)
    m2, _, _ = load_model(tmp_path / "m")
    _, b = _batch(4, [(1, 1)])
    torch.testing.assert_close(m(*b)["logits"], m2(*b)["logits"])
    assert not any(isinstance(mod, torch.nn.Linear) for mod in m2.image_encoder.net.modules())


def test_unprojected_vit_counts_its_last_mlp_layer_as_backbone(tmp_path):
    """Without a classification layer, a weights file's coverage counts every backbone layer: ViT's last
    linear layer (in its last block) missing from the file is reported missing (it is not the head any more)."""
    from safetensors.torch import save_file

    enc = ImageEncoder(ImageEncoderConfig(name="vit", project=False), 192, (32, 32))
    last = [n for n, m in enc.net.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    state = {k: v.contiguous() for k, v in enc.net.state_dict().items() if not k.startswith(last + ".")}
    save_file(state, str(tmp_path / "w.safetensors"))
    rep = enc.load_local_weights(tmp_path / "w.safetensors")
    gone = sorted(f"{last}.{p}" for p, _ in enc.net.get_submodule(last).named_parameters())
    assert gone and rep.missing == gone and rep.fraction < 1.0


def test_local_image_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    from clinfuse.errors import ClinfuseError

    a = ImageEncoder(ImageEncoderConfig(name="densenet_tiny"), 16, (32, 32))
    save_file({k: v.contiguous() for k, v in a.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    b = ImageEncoder(ImageEncoderConfig(name="densenet_tiny"), 16, (32, 32))
    rep = b.load_local_weights(tmp_path / "w.safetensors")
    assert rep.unused == [] and rep.missing == [] and rep.fraction == 1.0
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    with pytest.raises(ClinfuseError, match="not found"):
        b.load_local_weights(tmp_path / "missing.pt")


def test_save_and_load_gives_identical_predictions(tmp_path):
    tok = build_tiny_tokenizer(CORPUS)
    hf = tiny_bert_config(len(tok))
    cfg = _cfg()
    m = build_model(cfg, 3, hf).eval()
    meta = {"config": cfg.model_dump(mode="json"), "output_names": ["a", "b", "c"], "task": "multilabel"}
    save_model(m, tmp_path / "m", meta, tok, hf)
    m2, meta2, tok2 = load_model(tmp_path / "m")
    _, b = _batch(4)
    torch.testing.assert_close(m(*b)["logits"], m2(*b)["logits"])
    assert tok2.tokenize("clear lungs") == tok.tokenize("clear lungs")
    with pytest.raises(ValueError, match="not a clinfuse model"):
        load_model(tmp_path)


def test_aux_heads_score_each_modality_from_its_own_features_only():
    from clinfuse.training.losses import build_loss
    from clinfuse.training.trainer import aux_loss

    m = _model(aux_weight=1.0).eval()
    tok, b = _batch(4, [(1, 1)])
    out = m(*b)
    assert out["aux_logits"].shape == (4, 2, 3) and out["present"].all()
    other_text = list(b)
    other_text[2] = torch.flip(b[2], [0])                 # change every report: the image head must not move
    assert torch.equal(m(*other_text)["aux_logits"][:, 0], out["aux_logits"][:, 0])
    assert not torch.equal(m(*other_text)["aux_logits"][:, 1], out["aux_logits"][:, 1])

    m.train()
    _, b = _batch(4, [(0, 1)])                              # no image in the batch at all
    out = m(*b)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    loss = aux_loss(build_loss(_cfg(aux_weight=1.0).loss, "multilabel", y, 3), out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert m.aux_heads[0].weight.grad is not None and m.aux_heads[0].weight.grad.abs().sum() == 0
    assert m.aux_heads[1].weight.grad.abs().sum() > 0


def test_aux_weight_needs_a_fused_kind():
    from clinfuse.errors import ClinfuseError

    with pytest.raises(ClinfuseError, match="aux_weight"):
        _model("mean_logits", aux_weight=0.5)
    assert _model("concat", aux_weight=0.5).aux_heads is not None


def test_damaged_weights_are_refused_by_their_checksum(tmp_path):
    import random

    from clinfuse.errors import ModelLoadError

    tok = build_tiny_tokenizer(CORPUS)
    m = _model()
    save_model(m, tmp_path / "m", {"config": _cfg().model_dump(mode="json"), "task": "multilabel",
                                   "output_names": ["a", "b", "c"], "class_names": ["a", "b", "c"],
                                   "label_columns": ["a", "b", "c"]}, tok, tiny_bert_config(len(tok)))
    good = (tmp_path / "m" / "model.safetensors").read_bytes()
    load_model(tmp_path / "m")
    rng = random.Random(0)
    for _ in range(30):  # bit flips anywhere in the file, the tensors' bytes included
        data = bytearray(good)
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        (tmp_path / "m" / "model.safetensors").write_bytes(bytes(data))
        with pytest.raises(ModelLoadError, match="checksum"):
            load_model(tmp_path / "m")
