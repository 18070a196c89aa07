"""The lexical branch of the report path (model.text.lexical): TF-IDF of the report's tokens through a
logistic regression, fitted after the network, blended where a report is present, explained exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinfuse.config import LexicalConfig
from clinfuse.models.lexical import LexicalHead, body_mask
from tests.conftest import synthetic_cohort, tiny_config


def test_body_mask_drops_cls_sep_and_padding():
    mask = torch.tensor([[[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]])
    assert body_mask(mask).int().tolist() == [[[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]]]


def test_counts_vector_and_token_scores_add_up():
    head = LexicalHead(LexicalConfig(enabled=True, buckets=1024, weight=0.5), vocab_size=50, n_outputs=2)
    ids = torch.tensor([[[2, 7, 8, 7, 3, 0]]])  # [CLS] 7 8 7 [SEP] pad
    mask = torch.tensor([[[1, 1, 1, 1, 1, 0]]])
    c = head.counts(ids, mask)[0]
    assert c[7] == 2 and c[8] == 1 and c[2] == 0 and c[3] == 0  # specials are not counted
    assert c[50:].sum() == 2  # two bigrams: (7, 8), (8, 7)
    torch.manual_seed(0)
    head.idf.copy_(torch.rand(head.n_features) + 0.5)
    head.coef.copy_(torch.randn(2, head.n_features))
    head.bias.copy_(torch.tensor([0.3, -0.2]))
    head.fitted.fill_(True)
    x = head.vector(head.counts(ids, mask))
    assert float(x.norm()) == pytest.approx(1.0, abs=1e-6)
    logit = head(ids, mask)[0]
    for t in range(2):
        s = head.token_scores(ids, mask, t)[0]
        assert s[0, 0] == 0 and s[0, 4] == 0 and s[0, 5] == 0  # [CLS], [SEP], padding get nothing
        assert float(s.sum()) == pytest.approx(0.5 * float(logit[t] - head.bias[t]), abs=1e-5)


def _sklearn_reference(model, train_rows, test_rows):
    """TF-IDF by scikit-learn over the same tokens and hashed pairs, and its logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from clinfuse.data.tokens import tokenize_reports

    head, cfg = model.network.lexical, model.config.model.text

    def analyzer(text):
        ids, mask = tokenize_reports(model.tokenizer, [text], cfg)
        feat, valid = head.occurrences(ids, mask)
        return [str(int(f)) for f in feat[0][valid[0]]]

    vec = TfidfVectorizer(analyzer=analyzer, sublinear_tf=True, min_df=2)
    xtr = vec.fit_transform([r["report"] for r in train_rows])
    y = np.array([int(float(r["label"])) for r in train_rows])
    lr = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced").fit(xtr, y)
    return lr.decision_function(vec.transform([r["report"] for r in test_rows]))


@pytest.fixture(scope="module")
def lexical_run(tmp_path_factory):
    from clinfuse.pipeline import train_and_audit

    d = tmp_path_factory.mktemp("lexical")
    coh = synthetic_cohort(d, studies=80, seed=1, size=32)
    cfg = tiny_config(train={"epochs": 1}, tracking={"enabled": False})
    cfg.model.text.lexical.enabled = True
    train_and_audit(coh, cfg, d / "run", progress=False, log=lambda s: None)
    return coh, d / "run" / "best"


def test_fitted_branch_is_scikit_learns_tfidf_logistic_regression(lexical_run):
    from clinfuse.data.cohort import read_cohort
    from clinfuse.inference import Model

    coh, best = lexical_run
    model = Model.load(best)
    head = model.network.lexical
    assert head.is_fitted and model.meta["lexical"]["fitted_on"] == "train"
    rows, _ = read_cohort(coh)
    train = [r for r in rows if r["split"] == "train" and r["report"].strip()]
    test = [r for r in rows if r["split"] == "test" and r["report"].strip()]
    assert model.meta["lexical"]["n_reports"] == len(train)
    want = _sklearn_reference(model, train, test)
    from clinfuse.data.tokens import tokenize_reports

    ids, mask = tokenize_reports(model.tokenizer, [r["report"] for r in test], model.config.model.text)
    got = head(ids, mask)[:, 0].numpy()
    assert np.abs(got - want).max() < 2e-3
    assert np.corrcoef(got, want)[0, 1] > 0.999


def test_blend_only_where_the_report_is_present(lexical_run):
    from clinfuse.data.cohort import read_cohort
    from clinfuse.inference import Model
    from clinfuse.inference.model import _collate

    coh, best = lexical_run
    model = Model.load(best)
    rows, _ = read_cohort(coh)
    test = [r for r in rows if r["split"] == "test" and r["report"].strip()][:6]
    batch = _collate([model.dataset(test)[i] for i in range(len(test))])
    with torch.no_grad():
        blended = model.forward_batch(batch)
        net = model.network
        lex = net.lexical_logits(batch["input_ids"], batch["attention_mask"])
        net.lexical.weight.fill_(0.5)  # whatever validation chose for this tiny model
        blended = model.forward_batch(batch)
        net.lexical.fitted.fill_(False)
        alone = model.forward_batch(batch)
    w = net.lexical.blend
    assert torch.allclose(blended["logits"], (1 - w) * alone["logits"] + w * lex, atol=1e-5)
    assert not torch.allclose(blended["logits"], alone["logits"])
    # with the report hidden the network alone speaks: the branch reads the report only
    assert torch.allclose(blended["logits_without_report"], alone["logits_without_report"], atol=1e-6)


def test_explained_words_carry_the_lexical_share(lexical_run):
    from clinfuse.data.cohort import read_cohort
    from clinfuse.inference import Model

    coh, best = lexical_run
    model = Model.load(best)
    rows, _ = read_cohort(coh)
    row = next(r for r in rows if r["split"] == "test" and r["report"].strip())
    from clinfuse.inference.model import _collate

    batch = _collate([model.dataset([row])[0]])
    model.network.lexical.weight.fill_(0.5)  # whatever validation chose for this tiny model
    e = model.explain_item(batch, method="ig")
    with_branch = sum(s for _, s in e["report"]["words"])
    model.network.lexical.fitted.fill_(False)
    e0 = model.explain_item(batch, method="ig")
    without = sum(s for _, s in e0["report"]["words"])
    from clinfuse.data.tokens import tokenize_reports

    ids, mask = tokenize_reports(model.tokenizer, [row["report"]], model.config.model.text)
    model.network.lexical.fitted.fill_(True)
    share = float(model.network.lexical.token_scores(ids[:, :], mask, 0).sum())
    assert abs(share) > 1e-4
    # the words' total is the network's IG (scaled by the blend) plus the branch's exact share
    w = model.network.lexical.blend
    assert with_branch == pytest.approx((1 - w) * without + share, abs=0.05 * (abs(without) + abs(share)) + 1e-3)


def test_model_saved_without_the_branch_loads_as_the_network_alone(tmp_path, lexical_run):
    import shutil

    from clinfuse.inference import Model
    from clinfuse.models.model import load_model, save_model

    _, best = lexical_run
    net, meta, tok = load_model(best)
    net.lexical = None  # a model from before the branch: no lexical.* tensors
    old = tmp_path / "old"
    save_model(net, old, {k: v for k, v in meta.items() if k not in ("format", "weights_sha256")}, tok,
               net.text_encoder.bert.config)
    stored = json.loads((old / "model.json").read_text())
    assert stored["config"]["model"]["text"]["lexical"]["enabled"] is True
    m = Model.load(old)
    assert m.network.lexical is None
    shutil.rmtree(old)


def test_blend_weight_is_chosen_on_validation_and_saved(lexical_run):
    from clinfuse.data.cohort import read_cohort
    from clinfuse.inference import Model
    from clinfuse.inference.run import predict_rows
    from clinfuse.training.lexical import WEIGHTS
    from clinfuse.training.trainer import _auroc

    coh, best = lexical_run
    model = Model.load(best)
    blend = model.meta["lexical"]["blend"]
    assert blend["chosen_on"] == "val" and blend["metric"] == "auroc"
    scores = {float(k): v for k, v in blend["scores"].items()}
    assert sorted(scores) == list(WEIGHTS)
    top = max(scores.values())
    assert blend["weight"] == min(w for w, v in scores.items() if v >= top - 1e-9)  # ties to the smaller
    assert model.network.lexical.blend == pytest.approx(blend["weight"])  # stored in the weights, loaded back
    rows, _ = read_cohort(coh)
    val = [r for r in rows if r["split"] == "val"]
    assert blend["n_val"] == len(val)
    for w in (0.0, 1.0):  # the recorded scores are the blended model's own validation AUROC
        model.network.lexical.weight.fill_(w)
        out = predict_rows(model, val)
        assert scores[w] == pytest.approx(_auroc(out["labels"].reshape(len(val), -1), out["logits"], "binary"),
                                          abs=1e-6)


def test_a_branch_that_hurts_gets_weight_zero(lexical_run):
    from clinfuse.data.cohort import read_cohort
    from clinfuse.inference import Model
    from clinfuse.training.lexical import choose_weight

    coh, best = lexical_run
    model = Model.load(best)
    head = model.network.lexical
    rows, _ = read_cohort(coh)
    val = [r for r in rows if r["report"].strip()]  # the tiny cohort's 8 validation studies are too few to rank
    head.coef.mul_(-1)  # the branch now ranks the studies backwards
    head.bias.mul_(-1)
    got = choose_weight(model, val, metric="auroc")
    assert got["weight"] == 0.0 and head.blend == 0.0
    assert got["scores"]["1.0"] < got["scores"]["0.0"]
    loss = choose_weight(model, val, metric="loss")  # by log loss too
    assert loss["weight"] < 0.5 and loss["metric"] == "loss"
    assert choose_weight(model, [], metric="auroc")["chosen_on"] is None  # no validation: left as it is


def test_model_saved_before_the_weight_was_stored_blends_half(tmp_path, lexical_run):
    from clinfuse.inference import Model
    from clinfuse.models.model import load_model, save_model

    _, best = lexical_run
    net, meta, tok = load_model(best)
    del net.lexical._buffers["weight"]  # a model from before the blend weight was a tensor
    old = tmp_path / "old"
    save_model(net, old, {k: v for k, v in meta.items() if k not in ("format", "weights_sha256")}, tok,
               net.text_encoder.bert.config)
    m = Model.load(old)
    assert m.network.lexical.is_fitted and m.network.lexical.blend == 0.5


def test_weight_is_auto_or_a_number_from_0_to_1():
    from pydantic import ValidationError

    assert LexicalConfig().weight == "auto"
    assert LexicalConfig(weight=0.3).weight == 0.3
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(ValidationError):
            LexicalConfig(weight=bad)
