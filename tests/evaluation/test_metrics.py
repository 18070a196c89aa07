"""Metrics against hand-computed values; calibration; operating points."""

import numpy as np
import pytest

from clinfuse.evaluation.metrics import (auprc_ties_random, binary_report, bootstrap_ci, brier, choose_threshold,
                                         expected_calibration_error, fit_temperature, multi_report,
                                         threshold_metrics)

Y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05])


def test_threshold_metrics_by_hand():
    m = threshold_metrics(Y, P, 0.5)  # predicted positive: 0.9, 0.6, 0.7 -> TP 2, FP 1, FN 1, TN 4
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 4)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(4 / 6) and m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_auroc_auprc_brier_ece_by_hand():
    r = binary_report(Y, P, 0.5, bins=2)
    # AUROC: of 15 positive-negative pairs the positive scores higher in 5 (0.9) + 4 (0.6) + 3 (0.3)
    assert r["auroc"] == pytest.approx(12 / 15)
    # AP: ranks 1 (pos, prec 1), 2 neg, 3 (pos, prec 2/3), 4 neg, 5 (pos, prec 3/5); mean over positives
    assert r["auprc"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert r["brier"] == pytest.approx(np.mean((P - Y) ** 2))
    # ECE, 2 bins: [0, .5): p = .3 .4 .2 .1 .05 (labels 1 0 0 0 0); [.5, 1]: p = .9 .6 .7 (labels 1 1 0)
    low = abs(1 / 5 - np.mean([0.3, 0.4, 0.2, 0.1, 0.05]))
    high = abs(2 / 3 - np.mean([0.9, 0.6, 0.7]))
    assert expected_calibration_error(Y, P, bins=2) == pytest.approx(5 / 8 * low + 3 / 8 * high)
    assert brier([1, 0], [1.0, 0.0]) == 0


def test_operating_points():
    # J at >= 0.9: 1/3 + 1 - 1; at >= 0.6: 2/3 + 4/5 - 1 = 0.467; at >= 0.3: 1 + 3/5 - 1 = 0.6 (the maximum)
    assert choose_threshold(Y, P, "youden") == pytest.approx(0.3)
    t = choose_threshold(Y, P, "sensitivity", 0.99)
    assert threshold_metrics(Y, P, t)["sensitivity"] == 1 and t == pytest.approx(0.3)
    t = choose_threshold(Y, P, "specificity", 0.8)
    assert threshold_metrics(Y, P, t)["specificity"] >= 0.8 and t == pytest.approx(0.6)
    assert choose_threshold(np.zeros(4), np.ones(4)) == 0.5


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    over = 4.0 * true_logit  # an over-confident model: right ranking, logits 4x too large
    t = fit_temperature(over[:2000, None], y[:2000, None], "binary")
    assert 3.0 < t < 5.0
    before = expected_calibration_error(y[2000:], 1 / (1 + np.exp(-over[2000:])))
    after = expected_calibration_error(y[2000:], 1 / (1 + np.exp(-over[2000:] / t)))
    assert after < before / 2
    # multi-class
    zs = rng.normal(0, 1, (3000, 3))
    ys = np.array([rng.choice(3, p=np.exp(z) / np.exp(z).sum()) for z in zs])
    assert 2.0 < fit_temperature(3 * zs, ys, "multiclass") < 4.0


def test_bootstrap_interval_covers_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    from clinfuse.evaluation.metrics import auroc

    lo, hi = bootstrap_ci(y, p, auroc, n=300, seed=0)
    assert lo < auroc(y, p) < hi and hi - lo < 0.2


def test_multi_report_multiclass_and_multilabel():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    y = np.array([0, 1, 2, 1])
    r = multi_report(y, probs, "multiclass", ["a", "b", "c"], [0.5] * 3)
    assert r["accuracy"] == pytest.approx(0.75) and set(r["per_output"]) == {"a", "b", "c"}
    ml = multi_report(np.array([[1, 0], [0, 1], [1, 1], [0, 0]]), probs[:, :2], "multilabel", ["x", "y"], [0.5, 0.5])
    assert "macro" in ml and "micro" in ml


def test_bootstrap_by_patient_widens_the_interval_when_studies_repeat_a_patient():
    from clinfuse.evaluation.metrics import auroc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = np.clip(y * 0.3 + rng.random(60) * 0.7, 0, 1)
    # one study per patient: resampling patients is resampling studies
    assert bootstrap_ci(y, p, auroc, n=200, seed=3) == bootstrap_ci(y, p, auroc, n=200, seed=3, groups=np.arange(60))
    # each patient seen five times: the per-study interval is too narrow, the per-patient one is not
    y5, p5, g5 = np.repeat(y, 5), np.repeat(p, 5), np.repeat(np.arange(60), 5)
    lo_s, hi_s = bootstrap_ci(y5, p5, auroc, n=300, seed=0)
    lo_p, hi_p = bootstrap_ci(y5, p5, auroc, n=300, seed=0, groups=g5)
    assert hi_p - lo_p > 1.7 * (hi_s - lo_s)


def test_recall_at_specificity_reads_the_threshold_from_the_negatives():
    from clinfuse.evaluation.metrics import recall_at_specificity

    y = np.array([0] * 10 + [1] * 4)
    p = np.array([0.1 * i for i in range(10)] + [0.95, 0.85, 0.5, 0.05])
    # specificity 0.9 -> threshold at the 9th negative (0.8): positives above it are 0.95 and 0.85
    assert recall_at_specificity(y, p, 0.9) == 0.5
    assert np.isnan(recall_at_specificity(np.zeros(5), np.arange(5)))


def test_auprc_with_ties_in_random_order_matches_enumeration_of_every_order():
    import itertools

    from sklearn.metrics import average_precision_score

    y = np.array([1, 0, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.2, 0.2])
    exact = []
    tied_mid, tied_low = [1, 2, 3], [4, 5, 6]
    for a in itertools.permutations(tied_mid):
        for b in itertools.permutations(tied_low):
            order = [0, *a, *b]                      # one way of breaking the ties
            score = np.empty(len(y))
            score[order] = np.arange(len(y))[::-1]
            exact.append(average_precision_score(y, score))
    want = float(np.mean(exact))
    got = auprc_ties_random(y, p, draws=3000)
    assert got == pytest.approx(want, abs=0.01)
    assert average_precision_score(y, p) < want - 0.02     # sklearn's one step per block understates it
    q = np.array([0.9, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])        # no ties: the plain value
    assert auprc_ties_random(y, q) == average_precision_score(y, q)


def test_bayes_table_flags_small_subsets_as_noise():
    from clinfuse.evaluation.bayes import format_bayes_table

    row = {"subset": "all", "n": 93, "positives": 34, "model_auroc": 0.8, "bayes_auroc": 0.82, "auroc_ratio": 0.8 / 0.82,
           "model_auprc": 0.7, "bayes_auprc": 0.75}
    big = format_bayes_table([row])
    assert "*" not in big and "97.6%" in big
    small = format_bayes_table([row, {**row, "subset": "image only", "n": 8, "auroc_ratio": 1.43}])
    lines = small.splitlines()
    assert "143.0%*" in lines[3] and lines[-1].startswith("* fewer than 30 studies")
    assert len(lines[2]) == len(lines[3])                  # the flag does not shift the columns


def test_bootstrap_by_patient_does_not_depend_on_the_pseudonyms():
    """Patient pseudonyms change with a cohort's salt; the interval must not (it did: clusters were numbered
    by sorted name, so every rebuild of a study's cohort printed other intervals)."""
    from clinfuse.evaluation.metrics import auroc

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 90)
    p = np.clip(y * 0.3 + rng.random(90) * 0.7, 0, 1)
    patients = rng.integers(0, 40, 90)
    names_a = np.array([f"p-{hash(('a', int(x))) & 0xffffff:06x}" for x in patients])
    names_b = np.array([f"p-{hash(('b', int(x))) & 0xffffff:06x}" for x in patients])
    assert sorted(set(names_a)) != sorted(set(names_b))
    assert bootstrap_ci(y, p, auroc, n=200, seed=0, groups=names_a) == \
        bootstrap_ci(y, p, auroc, n=200, seed=0, groups=names_b) == \
        bootstrap_ci(y, p, auroc, n=200, seed=0, groups=patients + 1000)
