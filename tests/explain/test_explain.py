"""Attributions with known answers, completeness, Shapley, randomisation sanity, faithfulness, CLI output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from clinfuse.cli import main
from clinfuse.config import config_from_dict
from clinfuse.data.cohort import read_cohort
from clinfuse.data.dataset import StudyDataset
from clinfuse.explain.attributions import StudyInput, explain_study, merge_wordpieces
from clinfuse.explain.faithfulness import image_deletion
from clinfuse.models.model import load_model
from clinfuse.data.tokens import tokenize_reports
from clinfuse.models.text import build_tiny_tokenizer
from clinfuse.training.trainer import train

from ..conftest import synthetic_cohort, tiny_config

CORPUS = ["INDICATION: fever, concern for pneumonia. FINDINGS: heart size is normal.",
          "FINDINGS: no pneumothorax. IMPRESSION: pneumonia."]  # words seen twice enter the tiny vocabulary


class _Bert(nn.Module):
    def __init__(self, vocab: int, h: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)

    def get_input_embeddings(self):
        return self.emb


class ToyModel(nn.Module):
    """logit = 2 * sum(image[:, :, 4:8, 4:8]) + sum over tokens (embedding . v) * mask: the answer is known."""

    def __init__(self, vocab: int):
        super().__init__()
        self.text_encoder = nn.Module()
        self.text_encoder.bert = _Bert(vocab)
        self.v = torch.tensor([1.0, -0.5, 0.25, 2.0])

    def forward(self, image, image_present, input_ids, attention_mask, text_present, inputs_embeds=None):
        e = self.text_encoder.bert.emb(input_ids) if inputs_embeds is None else inputs_embeds
        text = ((e @ self.v) * attention_mask).sum((1, 2)) * text_present.float()
        img = 2.0 * image[:, :, 4:8, 4:8].sum((1, 2, 3)) * image_present.float()
        logit = (img + text)[:, None]
        w = torch.stack([image_present.float(), text_present.float()], 1)
        return {"logits": logit, "modality_weights": w / w.sum(1, keepdim=True).clamp(min=1)}


def _toy_input(tok):
    cfg = config_from_dict({"model": {"text": {"max_length": 32}}}).model.text
    ids, mask = tokenize_reports(tok, [CORPUS[0]], cfg)
    torch.manual_seed(0)
    return StudyInput(torch.rand(1, 1, 16, 16), torch.tensor([True]), ids, mask, torch.tensor([True]))


def test_known_answer_on_a_linear_toy_model():
    tok = build_tiny_tokenizer(CORPUS)
    model = ToyModel(len(tok)).eval()
    x = _toy_input(tok)
    a = explain_study(model, x, task="binary", tokenizer=tok, steps=16)
    amap = a.image_map
    expected = np.zeros((16, 16), np.float32)
    expected[4:8, 4:8] = 2.0 * x.image[0, 0, 4:8, 4:8].numpy()  # IG of a linear function: (x - 0) * weight
    np.testing.assert_allclose(amap, expected, atol=1e-5)
    emb = model.text_encoder.bert.emb.weight.detach()
    pad = tok.pad_token_id
    words = dict(a.tokens)
    i = tok.convert_tokens_to_ids("pneumonia")
    assert words["pneumonia"] == pytest.approx(float((emb[i] - emb[pad]) @ model.v), rel=1e-4)
    assert a.convergence_delta < 1e-4
    assert a.logit - a.baseline_logit == pytest.approx(amap.sum() + sum(words.values()), rel=1e-4)


@pytest.mark.parametrize("fill", ["zero", "inpaint"])
def test_faithfulness_flags_a_wrong_map(fill):
    tok = build_tiny_tokenizer(CORPUS)
    model = ToyModel(len(tok)).eval()
    x = _toy_input(tok)
    # a bright finding where the model looks, on a dark background: in-painting removes it, as zeroing does
    x.image = 0.05 * x.image
    x.image[:, :, 4:8, 4:8] = 0.9
    a = explain_study(model, x, task="binary", tokenizer=tok, steps=8)
    good = image_deletion(model, x, a, "binary", fill=fill)
    assert good["better_than_random"] and good["faithfulness"] > 0 and good["fill"] == fill
    a.image_map = -a.image_map  # the opposite map: deleting its "top" regions first removes nothing that matters
    bad = image_deletion(model, x, a, "binary", fill=fill)
    assert not bad["better_than_random"] and bad["faithfulness"] < good["faithfulness"]
    with pytest.raises(ValueError, match="fill must be one of zero, inpaint"):
        image_deletion(model, x, a, "binary", fill="blur")


class BrightnessModel(ToyModel):
    """logit = 20 * (mean brightness - 0.5): reads no region, so removing patches at random should not move it."""

    def forward(self, image, image_present, input_ids, attention_mask, text_present, inputs_embeds=None):
        toy = super().forward(image, image_present, input_ids, attention_mask, text_present, inputs_embeds)
        logit = 20.0 * (image.mean((1, 2, 3)) - 0.5)[:, None] + 0.0 * toy["logits"]  # (keeps the text's graph)
        return {"logits": logit, "modality_weights": torch.ones(len(image), 2) / 2}


def test_inpainted_deletion_keeps_the_brightness_that_zeroed_holes_take_away():
    """The NIH DenseNet121 read zeroed patches as evidence (studies/nih-cxr): random removal of 10% of the
    patches moved p by -0.38. In-painting keeps each region's brightness, so on a model that reads only
    brightness random removal barely moves p, where zeroed holes move it a lot."""
    tok = build_tiny_tokenizer(CORPUS)
    model = BrightnessModel(len(tok)).eval()
    x = _toy_input(tok)
    x.image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    a = explain_study(model, x, task="binary", tokenizer=tok, image_method="occlusion")
    zero = image_deletion(model, x, a, "binary", fill="zero")
    inpaint = image_deletion(model, x, a, "binary", fill="inpaint")
    assert zero["random_first_step"] < -0.2
    assert abs(inpaint["random_first_step"]) < 0.02


def test_blurred_occlusion_window_is_not_read_as_a_dark_finding():
    """A black Occlusion window moves a brightness-reading model wherever it slides (every region looks
    important); the blurred window keeps the local brightness, so the map stays near zero there, while on a
    model that reads a region it still marks that region."""
    tok = build_tiny_tokenizer(CORPUS)
    x = _toy_input(tok)
    x.image = 0.5 + 0.02 * torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    bright = BrightnessModel(len(tok)).eval()
    black = explain_study(bright, x, task="binary", tokenizer=tok, image_method="occlusion",
                          occlusion_baseline="zero").image_map
    blur = explain_study(bright, x, task="binary", tokenizer=tok, image_method="occlusion",
                         occlusion_baseline="blur").image_map
    assert np.abs(blur).max() < 0.05 * np.abs(black).max()
    x.image[:, :, 4:8, 4:8] = 0.9  # a small bright finding where ToyModel looks
    amap = explain_study(ToyModel(len(tok)).eval(), x, task="binary", tokenizer=tok, image_method="occlusion",
                         occlusion_window=4, occlusion_baseline="blur").image_map
    assert np.unravel_index(amap.argmax(), amap.shape)[0] in range(4, 8) and amap[4:8, 4:8].mean() > 0
    assert amap[4:8, 4:8].mean() > 20 * np.abs(amap[32:, 32:]).mean()


@pytest.mark.parametrize("shape", [(64, 64), (20, 32, 32)])
def test_inpainter_fills_a_removed_finding_from_its_surroundings(shape):
    from clinfuse.explain.faithfulness import Inpainter

    p = 4 if len(shape) == 2 else 2
    image = torch.full((1, 2, *shape), 0.3)
    image[:, 1] = 0.6  # channels are filled each from its own surroundings
    spot = (slice(None), slice(None), *[slice(2 * p, 5 * p)] * len(shape))
    image[spot] = 0.9
    grid = tuple(-(-s // p) for s in shape)
    keep = torch.ones(grid, dtype=torch.bool)
    keep[tuple([slice(2, 5)] * len(shape))] = False
    inp = Inpainter(image, p)
    filled = inp.fill(keep)
    assert filled.shape == image.shape
    # the removed finding takes the brightness around it; the kept pixels are untouched
    assert torch.allclose(filled[spot][:, 0], torch.tensor(0.3), atol=1e-5)
    assert torch.allclose(filled[spot][:, 1], torch.tensor(0.6), atol=1e-5)
    outside = torch.ones_like(image, dtype=torch.bool)
    outside[spot] = False
    assert torch.equal(filled[outside], image[outside])
    # nothing kept: the image's mean brightness; everything kept: the image itself
    none = inp.fill(torch.zeros(grid, dtype=torch.bool))
    assert torch.allclose(none, image.mean(dim=tuple(range(2, image.ndim)), keepdim=True).expand_as(image), atol=1e-5)
    assert torch.equal(inp.fill(torch.ones(grid, dtype=torch.bool)), image)


def test_inpainter_on_a_large_volume_grid_takes_the_one_kept_patch_everywhere():
    """16,383 removed patches (the conjugate-gradient path): with one patch kept, the harmonic fill is that
    patch's mean everywhere else."""
    from clinfuse.explain.faithfulness import Inpainter

    image = torch.rand(1, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    inp = Inpainter(image, 2)
    keep = torch.zeros(inp.grid, dtype=torch.bool)
    keep[3, 7, 9] = True
    filled = inp.fill(keep)
    kept = image[0, 0, 6:8, 14:16, 18:20]
    assert torch.equal(filled[0, 0, 6:8, 14:16, 18:20], kept)
    out = filled.clone()
    out[0, 0, 6:8, 14:16, 18:20] = kept.mean()
    assert torch.allclose(out, kept.mean().expand_as(out), atol=1e-4)


def test_wordpieces_merge_into_words():
    tok = build_tiny_tokenizer(["clear lungs", "clear"])  # 'clear' is a word, 'zebra' only characters
    cfg = config_from_dict({"model": {"text": {"max_length": 16}}}).model.text
    ids, mask = tokenize_reports(tok, ["clear zebra"], cfg)
    scores = torch.arange(16, dtype=torch.float32)[None]
    words, pos = merge_wordpieces(tok, ids[0], mask[0], scores)
    assert [w for w, _ in words] == ["clear", "zebra"]
    assert words[1][1] == sum(range(2, 2 + len(tok.tokenize("zebra"))))  # pieces summed
    assert len(pos[1]) == len(tok.tokenize("zebra"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    synthetic_cohort(d, studies=160, seed=31, size=40, lateral=0, prevalence=0.4)
    train(d / "c", tiny_config(train={"epochs": 6, "batch_size": 16}), d / "run", progress=False)
    model, meta, tok = load_model(d / "run/best")
    rows, info = read_cohort(d / "c")
    both = [r for r in rows if r["image_present"] and r["report_present"]][:6]
    ds = StudyDataset(both, info, config_from_dict(meta["config"]), tok)
    return d, model, meta, tok, ds


def test_completeness_and_shapley_efficiency_on_the_real_model(trained):
    _, model, meta, tok, ds = trained
    for i in range(3):
        x = StudyInput.from_item(ds[i])
        a = explain_study(model, x, task="binary", tokenizer=tok, steps=64)
        total = float(a.image_map.sum() + sum(s for _, s in a.tokens))
        assert total == pytest.approx(a.logit - a.baseline_logit, abs=0.05 + 0.05 * abs(a.logit - a.baseline_logit))
        sh = a.shapley
        assert sh["image"] + sh["report"] == pytest.approx(sh["v_both"] - sh["v_none"], abs=1e-9)
        assert sh["v_both"] == pytest.approx(a.probabilities[0], abs=1e-6)  # batch of 4 vs batch of 1 in float32
        off = torch.zeros_like(x.image_present)
        with torch.no_grad():  # v(image only) is the model with the report hidden, and the other way round
            img_only = model(x.image, x.image_present, x.input_ids, x.attention_mask, off)["logits"][0, 0]
            txt_only = model(x.image, off, x.input_ids, x.attention_mask, x.text_present)["logits"][0, 0]
        assert sh["v_image_only"] == pytest.approx(float(torch.sigmoid(img_only.double())), abs=1e-6)
        assert sh["v_report_only"] == pytest.approx(float(torch.sigmoid(txt_only.double())), abs=1e-6)


def test_default_steps_keep_the_convergence_delta_small(trained):
    _, model, meta, tok, ds = trained
    deltas, spans = [], []
    for i in range(len(ds)):
        a = explain_study(model, StudyInput.from_item(ds[i]), task="binary", tokenizer=tok)  # 32 steps
        deltas.append(a.convergence_delta)
        spans.append(abs(a.logit - a.baseline_logit))
    assert np.median(np.array(deltas) / np.maximum(spans, 0.1)) < 0.05, deltas


def test_model_randomisation_changes_the_maps(trained):
    """Adebayo et al. 2018: maps of the trained model and of the same model with random weights differ."""
    from scipy.stats import spearmanr

    _, model, meta, tok, ds = trained
    random_model, _, _ = load_model(trained[0] / "run/best")
    torch.manual_seed(123)
    for m in random_model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    random_model.eval()
    rhos = []
    for i in range(len(ds)):
        x = StudyInput.from_item(ds[i])
        a = explain_study(model, x, task="binary", tokenizer=tok, steps=16).image_map
        b = explain_study(random_model, x, task="binary", tokenizer=tok, steps=16).image_map
        rhos.append(spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0])
    assert np.mean(rhos) < 0.5, rhos  # the bound stated in docs/explanations.md


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_other_image_methods(trained, method):
    _, model, meta, tok, ds = trained
    a = explain_study(model, StudyInput.from_item(ds[0]), task="binary", tokenizer=tok, image_method=method)
    assert a.image_map.shape == (32, 32) and np.isfinite(a.image_map).all() and np.abs(a.image_map).sum() > 0
    if method == "gradcam":
        assert (a.image_map >= 0).all()


def test_explain_and_predict_cli_outputs_without_identifiers(trained, tmp_path, capsys):
    from clinfuse.tracking.phi import PhiGuard

    d = trained[0]
    rc = main(["explain", "--model", str(d / "run/best"), "--cohort", str(d / "c"), "--limit", "3",
               "--out", str(tmp_path / "x"), "--no-progress", "--no-mlflow", "--deletion-fill", "inpaint",
               "--method", "occlusion", "--occlusion-baseline", "blur"])
    assert rc == 0 and "explanation(s)" in capsys.readouterr().out
    folders = [p for p in (tmp_path / "x").iterdir() if p.is_dir()]
    assert len(folders) == 3
    for f in folders:
        e = json.loads((f / "explanation.json").read_text())
        assert {"study_id", "model", "probabilities", "predicted", "modalities", "image", "report",
                "convergence_delta"} <= set(e)
        if e["modalities"]["present"]["image"]:
            assert (f / "overlay.png").is_file() and np.load(f / "image_attribution.npy").shape == (32, 32)
            assert "better_than_random" in e["image"]["faithfulness"]
            assert e["image"]["faithfulness"]["fill"] == "inpaint"  # --deletion-fill reached the test
            assert e["image"]["method"] == "occlusion" and e["image"]["occlusion_baseline"] == "blur"
        page = (f / "explanation.html").read_text()
        assert "data:image/png;base64," in page or not e["modalities"]["present"]["image"]
        assert "Image (occlusion, blurred window)" in page or not e["modalities"]["present"]["image"]
        assert "http://" not in page and "https://" not in page and "<script" not in page
    guard = PhiGuard.from_cohort(d / "c")
    assert len(guard) > 0
    guard.check_file(tmp_path / "x")  # raises on any identifier
    assert main(["predict", "--model", str(d / "run/best"), "--cohort", str(d / "c"), "--out",
                 str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    rows, _ = read_cohort(d / "c")
    assert len(lines) == 1 + sum(r["split"] == "test" for r in rows)
    assert lines[0].startswith("study_id,status,reason,p_positive,pred_positive,w_image,w_report")
    guard.check_file(tmp_path / "p.csv")


def test_html_renders_in_headless_chromium(trained, tmp_path):
    from ..browser import Page, chromium_path

    if chromium_path() is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium when apt-get works)")
    d = trained[0]
    assert main(["explain", "--model", str(d / "run/best"), "--cohort", str(d / "c"), "--limit", "6",
                 "--out", str(tmp_path / "x"), "--no-progress", "--no-mlflow"]) == 0
    folder = next(f for f in sorted((tmp_path / "x").iterdir())
                  if f.is_dir() and (f / "overlay.png").is_file()
                  and json.loads((f / "explanation.json").read_text())["report"]["words"])
    page = Page()
    try:
        page.load((folder / "explanation.html").as_uri())
        size = page.evaluate("(() => {const r = document.querySelector('img').getBoundingClientRect();"
                             " return [r.width, r.height, document.querySelector('img').naturalWidth]})()")
        words = page.evaluate("document.querySelectorAll('span[title]').length")
        shot = page.screenshot(tmp_path / "page.png")
    finally:
        page.close()
    assert page.errors == []
    assert size[0] > 50 and size[1] > 50 and size[2] > 0, "the heatmap image is shown"
    assert words > 3, "the report words are coloured"
    assert len(shot) > 20_000


@pytest.mark.parametrize("method", ["ig", "gradcam", "occlusion"])
def test_volumes_are_explained_too(method, tmp_path):
    from clinfuse.explain.render import overlay_png
    from clinfuse.models.model import build_model
    from clinfuse.models.text import tiny_bert_config

    cfg = config_from_dict({"data": {"image_size": [16, 32, 32]},
                            "model": {"image": {"name": "densenet_tiny", "spatial_dims": 3},
                                      "text": {"name_or_path": "tiny", "max_length": 16},
                                      "fusion": {"dim": 16, "heads": 2}}})
    tok = build_tiny_tokenizer(CORPUS)
    torch.manual_seed(0)
    model = build_model(cfg, 1, tiny_bert_config(len(tok))).eval()
    ids, mask = tokenize_reports(tok, [CORPUS[0]], cfg.model.text)
    x = StudyInput(torch.rand(1, 1, 16, 32, 32), torch.tensor([True]), ids, mask, torch.tensor([True]))
    a = explain_study(model, x, task="binary", tokenizer=tok, image_method=method, steps=8)
    assert a.image_map.shape == (16, 32, 32) and np.isfinite(a.image_map).all()
    assert image_deletion(model, x, a, "binary")["curve"]
    assert overlay_png(x.image[0, 0].numpy(), a.image_map, method, "volume")[:4] == b"\x89PNG"


def test_auto_method_is_occlusion_in_2d_and_gradcam_for_volumes():
    """explain.image_method 'auto' (the default, chosen by faithfulness on real radiographs: docs/explanations.md)."""
    from clinfuse.config import Config
    from clinfuse.explain.attributions import auto_image_method
    from clinfuse.models.model import build_model
    from clinfuse.models.text import tiny_bert_config

    assert Config().explain.image_method == "auto"
    tok = build_tiny_tokenizer(CORPUS)
    ids, mask = tokenize_reports(tok, [CORPUS[0]], config_from_dict({}).model.text)
    assert Config().explain.deletion_fill == "inpaint" and Config().explain.occlusion_baseline == "blur"
    for dims, size, name, want in ((2, [32, 32], "densenet_tiny", "occlusion"), (3, [16, 32, 32], "densenet_tiny", "gradcam"),
                                   (3, [16, 32, 32], "vit", "occlusion")):
        cfg = config_from_dict({"data": {"image_size": size},
                                "model": {"image": {"name": name, "spatial_dims": dims},
                                          "text": {"name_or_path": "tiny", "max_length": 16},
                                          "fusion": {"dim": 16, "heads": 2}}})
        torch.manual_seed(0)
        model = build_model(cfg, 1, tiny_bert_config(len(tok))).eval()
        x = StudyInput(torch.rand(1, 1, *size), torch.tensor([True]), ids[:, :, :16], mask[:, :, :16],
                       torch.tensor([True]))
        assert auto_image_method(model, x) == want, (dims, name)
        if name != "vit":  # the attribution itself (a ViT occlusion at 16x32x32 is slow and adds nothing here)
            a = explain_study(model, x, task="binary", tokenizer=tok, image_method="auto", steps=8)
            assert a.image_method == want and a.image_map.shape == tuple(size) and a.tokens  # words by IG still


def test_explain_one_study_given_as_files(trained, tmp_path, capsys):
    import pydicom

    d = trained[0]
    dcm = next(p for p in sorted((d / "c-export" / "dicom").rglob("*.dcm"))
               if pydicom.dcmread(p, stop_before_pixels=True).get("ViewPosition") in ("PA", "AP"))
    report = tmp_path / "report.txt"
    report.write_text("INDICATION: Fever and productive cough, clinical concern for pneumonia.\n"
                      "FINDINGS: Heart size is normal.")
    rc = main(["explain", "--model", str(d / "run/best"), "--dicom", str(dcm), "--report", str(report),
               "--out", str(tmp_path / "one"), "--no-progress", "--no-mlflow"])
    assert rc == 0, capsys.readouterr().err
    e = json.loads((tmp_path / "one/s-input/explanation.json").read_text())
    assert e["modalities"]["present"] == {"image": True, "report": True}
    w, sh = e["modalities"]["p_without"], e["modalities"]["shapley"]
    # exact for two modalities: phi(report) - phi(image) = p(without image) - p(without report)
    assert sh["report"] - sh["image"] == pytest.approx(w["image"] - w["report"], abs=1e-9)
    assert "without the report" in (tmp_path / "one/s-input/explanation.html").read_text()
    words = [w for w, _ in e["report"]["words"]]
    assert "pneumonia" in words and "indication" in words
    assert (tmp_path / "one/s-input/overlay.png").is_file()
    rc = main(["explain", "--model", str(d / "run/best"), "--dicom", str(tmp_path / "missing.dcm"),
               "--out", str(tmp_path / "two"), "--no-progress"])
    assert rc == 2 and "DICOM file not found" in capsys.readouterr().err


def test_the_page_says_when_random_removal_alone_moves_the_probability():
    from clinfuse.explain.render import _faith_line

    f = {"deletion_area": 0.1, "random_area": 0.12, "faithfulness": 0.02, "better_than_random": True,
         "fill": "zero", "random_first_step": -0.38}
    line = _faith_line("image map", f)
    assert "blacked out" in line and "already moves p by -0.38" in line
    steady = _faith_line("image map", {**f, "fill": "inpaint", "random_first_step": 0.01})
    assert "in-painted" in steady and "already moves" not in steady
    old = {k: v for k, v in f.items() if k not in ("fill", "random_first_step")}  # explanations written before
    assert "already moves" not in _faith_line("image map", old)
    words = {k: v for k, v in f.items() if k != "fill"}  # the report's deletion test removes words, not patches
    assert "already moves" not in _faith_line("report words", words)
