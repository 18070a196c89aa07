"""Open-I reports study: real radiology text through clinfuse's report-only (image missing) path.

Questions (see README.md):
  1. 11 MeSH findings from FINDINGS + IMPRESSION: TF-IDF + logistic regression vs MiniLM vs tiny BERT.
  2. `abnormal` from INDICATION alone (no label leak): the same three models.
  3. The rarest findings: unweighted BCE vs focal + effective-number weights (the package default until 2026-12-06).
  4. Explanations of 20 test reports: top words and deletion faithfulness against random orders.
  5. Repeated splits: questions 1 and 2's TF-IDF baseline, MiniLM alone and MiniLM with clinfuse's lexical
     branch (model.text.lexical) over several split seeds (the model choice judged over splits, not one test
     split), with the mean of TF-IDF and MiniLM as a ten-line ensemble.
  6. Question 3 over the same split seeds, with focal loss and effective-number weights each alone beside
     the default (both) and unweighted BCE: the imbalance default judged over splits.

Every clinfuse model is trained with `train_and_audit`, so each run is in the study's MLflow store.

``--test-data CSV`` scores questions 1 and 2's models (trained by this command under --out on --data) and the
TF-IDF baseline on a second reports.csv of the same layout, every report a test report.

Usage: python studies/openi-reports/run.py [--data reports.csv] [--out runs/openi] [--questions 1 2 3 4 5 6]
           [--splits 0 1 2 3 4] [--test-data CSV]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import auprc, auroc, cell, labels_of, model_predictions, recall_at_specificity, split_rows, table  # noqa: E402
from prepare import DEFAULT_CSV, FINDINGS, from_csv, write_export  # noqa: E402

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort  # noqa: E402
from clinfuse.pipeline import train_and_audit  # noqa: E402

RARE = ["Pneumonia", "Nodule", "Airspace_Disease"]
QUESTIONS = {
    "q1": {"sections": ["FINDINGS", "IMPRESSION"], "task": "multilabel", "columns": FINDINGS},
    "q2": {"sections": ["INDICATION"], "task": "binary", "columns": ["abnormal"], "max_length": 32},
    "q3": {"sections": ["FINDINGS", "IMPRESSION"], "task": "multilabel", "columns": RARE},
}
ENCODERS = {  # name -> overrides (epochs set in main)
    "MiniLM (pretrained, fine-tuned)": ["model.text.name_or_path=minilm", "model.text.freeze_layers=4",
                                        "train.lr_text=1.0e-4"],  # top 2 of 6 layers trained: CPU budget
    "tiny BERT (from scratch)": ["model.text.name_or_path=tiny", "train.lr_text=1.0e-3"],
}


def overrides_for(q: str) -> list[str]:
    spec = QUESTIONS[q]
    return [f"cohort.reports.read_sections={json.dumps(spec['sections'])}", f"cohort.labels.task={spec['task']}",
            f"cohort.labels.columns={json.dumps(spec['columns'])}", f"model.text.max_length={spec.get('max_length', 128)}"]


DATA = DEFAULT_CSV  # --data


def make_cohort(out: Path, q: str, split_seed: int = 0) -> Path:
    """The question's cohort; `split_seed` other than 0 (the config's) gives another stratified split."""
    exp, coh = out / "export", out / (f"cohort-{q}" + (f"-split{split_seed}" if split_seed else ""))
    if not (exp / "labels.csv").is_file():
        if not DATA.is_file():
            sys.exit(f"openi study: {DATA} not found (the Open-I reports.csv; pass --data)")
        write_export(from_csv(DATA), exp, None)
    if not (coh / "cohort.json").is_file():
        build_cohort(None, exp / "reports.csv", exp / "labels.csv", coh, load_config(HERE / "config.yaml",
                     overrides_for(q) + [f"cohort.split.seed={split_seed}"]), progress=False)
    return coh


def tfidf_lr(cohort: Path, test_cohort: Path | None = None):
    """The ten-line baseline: TF-IDF (1-2 grams) + one logistic regression per label, on the same text;
    fitted on `cohort`'s training split, scored on the test split of `test_cohort` (default: `cohort`)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    tr, info = split_rows(cohort, "train")
    te, _ = split_rows(test_cohort or cohort, "test")
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr, xte = vec.fit_transform([r["report"] for r in tr]), vec.transform([r["report"] for r in te])
    ytr, yte = labels_of(tr, info), labels_of(te, info)
    p = np.zeros(yte.shape)
    for k in range(ytr.shape[1]):
        if ytr[:, k].min() == ytr[:, k].max():
            p[:, k] = ytr[:, k].mean()
            continue
        p[:, k] = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced").fit(xtr, ytr[:, k]).predict_proba(xte)[:, 1]
    return yte, p, [r["patient_id"] for r in te]


def train_model(cohort: Path, q: str, name: str, extra: list[str], out: Path, epochs: int,
                split_seed: int = 0) -> tuple[Path, float]:
    run = out / "runs" / (f"{q}-{name.split(' (')[0].replace(' ', '_').lower()}" + (f"-split{split_seed}" if split_seed else ""))
    cfg = load_config(HERE / "config.yaml", overrides_for(q) + extra + [f"train.epochs={epochs}",
                      f"tracking.tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}"])
    t0 = time.time()
    best = run / "best"
    if not (best / "model.json").is_file():
        train_and_audit(cohort, cfg, run, progress=False, log=lambda s: None)
    return best, time.time() - t0


def discrimination_table(results: dict, names: list[str], n_boot: int) -> str:
    header = ["label", "test +", *results]
    rows = []
    y0 = next(iter(results.values()))[0]
    for k, n in enumerate(names):
        rows.append([n, str(int(y0[:, k].sum()))] + [
            f"{auroc(y[:, k], p[:, k]):.3f} / {auprc(y[:, k], p[:, k]):.3f}" for y, p, g in results.values()])
    if len(names) > 1:
        rows.append(["macro", ""] + [f"{np.nanmean([auroc(y[:, k], p[:, k]) for k in range(len(names))]):.3f} / "
                                     f"{np.nanmean([auprc(y[:, k], p[:, k]) for k in range(len(names))]):.3f}"
                                     for y, p, g in results.values()])
    else:
        rows.append(["95% CI (AUROC)", ""] + [cell(auroc, y[:, 0], p[:, 0], g, n_boot).split(" ", 1)[1]
                                              for y, p, g in results.values()])
    return "cells: AUROC / AUPRC on the test split\n" + table(header, rows)


def question_1_2(out: Path, q: str, epochs: dict, n_boot: int) -> dict:
    coh = make_cohort(out, q)
    results, times = {}, {}
    t0 = time.time()
    results["TF-IDF + LR (baseline)"] = tfidf_lr(coh)
    times["TF-IDF + LR (baseline)"] = time.time() - t0
    for name, extra in ENCODERS.items():
        best, secs = train_model(coh, q, name, extra, out, epochs[name])
        y, p, g, _ = model_predictions(best, coh)
        results[name], times[name] = (y, p, g), secs
    names = QUESTIONS[q]["columns"]
    print(discrimination_table(results, names, n_boot))
    print("train time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), flush=True)
    return {"results": results, "cohort": coh}


def question_3(out: Path, epochs: int, n_boot: int) -> None:
    coh = make_cohort(out, "q3")
    conds = {c: IMBALANCE[c] for c in ("bce unweighted", "focal + effective weights (former default)")}
    enc = ENCODERS["tiny BERT (from scratch)"]
    rows = []
    for cname, extra in conds.items():
        best, _ = train_model(coh, "q3", f"tiny {cname.split(' (')[0].replace('+', 'and')}", enc + extra, out, epochs)
        y, p, g, _ = model_predictions(best, coh)
        for k, n in enumerate(RARE):
            rows.append([n, str(int(y[:, k].sum())), cname, cell(auprc, y[:, k], p[:, k], g, n_boot),
                         cell(lambda a, b: recall_at_specificity(a, b, 0.9), y[:, k], p[:, k], g, n_boot)])
    rows.sort(key=lambda r: RARE.index(r[0]))
    print("encoder: tiny BERT from scratch; 95% bootstrap intervals over patients")
    print(table(["finding", "test +", "loss", "AUPRC [95% CI]", "sensitivity @ spec 0.90 [95% CI]"], rows), flush=True)


def _lexical_scores(model_dir: Path, cohort: Path):
    """(y, p with the branch at the weight chosen on validation, p at weight 0.5, p of the network alone, the
    chosen weight, rows) on the test split: one trained model, scored three times (the branch is fitted after
    the network, so the network is the same in all three). A model trained before the weight was chosen
    (weight 0.5 then) gets it chosen here by the function ``clinfuse train`` calls (choose_weight, on the
    validation split); the temperature fitted afterwards does not move AUROC or AUPRC."""
    model = _with_chosen_weight(model_dir, cohort)
    head = model.network.lexical
    y, p_auto, _, rows = model_predictions(model, cohort)
    head.weight.fill_(0.5)
    p_half = model_predictions(model, cohort)[1]
    head.fitted.fill_(False)
    return y, p_auto, p_half, model_predictions(model, cohort)[1], model.meta["lexical"]["blend"]["weight"], rows


def _with_chosen_weight(model_dir: Path, cohort: Path):
    """The model with its lexical blend weight chosen on `cohort`'s validation split, as ``clinfuse train``
    chooses it (models trained before it did so carry 0.5)."""
    from clinfuse.inference import Model
    from clinfuse.training.lexical import choose_weight

    model = Model.load(model_dir)
    if model.meta.get("lexical", {}).get("blend", {}).get("chosen_on") != "val":
        choose_weight(model, split_rows(cohort, "val")[0], metric=model.config.train.early_stop_metric)
    return model


def question_5(out: Path, splits: list[int], epochs: int) -> None:
    """TF-IDF + LR vs MiniLM, MiniLM with clinfuse's lexical branch and the mean of TF-IDF and MiniLM, over
    split seeds, on questions 1 (macro over 11 findings) and 2."""
    name = "MiniLM (pretrained, fine-tuned)"
    models = ["TF-IDF + LR (baseline)", name, "MiniLM + lexical branch, weight 0.5",
              "MiniLM + lexical branch, weight on validation (clinfuse)", "mean of TF-IDF and MiniLM"]
    for q, what in (("q1", "11 findings, macro over labels"), ("q2", "abnormal from INDICATION")):
        per = {m: {"auroc": [], "auprc": []} for m in models}
        secs, weights = [], []
        for sd in splits:
            coh = make_cohort(out, q, sd)
            yb, pb, _ = tfidf_lr(coh)
            best, t = train_model(coh, q, "MiniLM lexical", ENCODERS[name] + ["model.text.lexical.enabled=true"], out,
                                  epochs, sd)
            secs.append(t)
            y, p_auto, p_half, p, w, rows = _lexical_scores(best, coh)
            weights.append(w)
            te, _ = split_rows(coh, "test")
            assert [r["study_id"] for r in rows] == [r["study_id"] for r in te], "the baseline and the model score one test split"
            for m, pp in zip(models, (pb, p, p_half, p_auto, (pb + p) / 2)):
                k = range(y.shape[1])
                per[m]["auroc"].append(float(np.nanmean([auroc(y[:, j], pp[:, j]) for j in k])))
                per[m]["auprc"].append(float(np.nanmean([auprc(y[:, j], pp[:, j]) for j in k])))
            print(f"  {q} split seed {sd}: " + ", ".join(f"{m.split(' (')[0]} {per[m]['auprc'][-1]:.3f}" for m in models)
                  + f" (AUPRC; blend weight chosen on validation {w:.1f}; MiniLM trained in {t:.0f} s)", flush=True)
        print(f"{what}: {len(splits)} stratified splits (split seeds {splits}), test 25% each; mean ± sd over splits; "
              "difference to the baseline: mean [95% t-interval over splits], splits where ahead")
        print(table(["model", "AUROC", "AUROC - baseline", "AUPRC", "AUPRC - baseline"],
                    paired_rows(per, models, ("auroc", "auprc"))))
        print("blend weight chosen on validation per split: " + ", ".join(f"{w:.1f}" for w in weights))
        print(f"MiniLM training s per split (network, lexical fit, calibration, test): {np.mean(secs):.0f} "
              "(0 where the split's model was already trained)", flush=True)


def paired_rows(per: dict, models: list[str], metrics: tuple[str, ...]) -> list[list[str]]:
    """Table rows over splits: per model and metric the mean ± sd over splits and, against the first model
    (the baseline), the paired difference: mean [95% t-interval over splits], splits where ahead."""
    from scipy import stats

    rows = []
    for m in models:
        row = [m]
        for met in metrics:
            v = np.array(per[m][met])
            n = len(v)
            row.append(f"{np.mean(v):.3f} ± {v.std(ddof=1) if n > 1 else 0:.3f}")
            if m == models[0]:
                row.append("")
                continue
            d = v - np.array(per[models[0]][met])
            half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
            row.append(f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}], ahead in {int((d > 0).sum())}/{n}")
        rows.append(row)
    return rows


IMBALANCE = {"bce unweighted": ["loss.name=bce", "loss.class_weights=none"],
             "focal + effective weights (former default)": ["loss.name=focal", "loss.class_weights=effective"],
             "focal unweighted": ["loss.name=focal", "loss.class_weights=none"],
             "bce effective weights": ["loss.name=bce", "loss.class_weights=effective"]}


def question_6(out: Path, splits: list[int], epochs: int) -> None:
    """Question 3 over split seeds: the rarest findings (3-label task, tiny BERT from scratch), unweighted BCE
    against focal + effective-number weights (the package default until 2026-12-06) and each half of it alone; per finding and
    macro, AUPRC and sensitivity at specificity 0.90, paired over the splits."""
    enc = ENCODERS["tiny BERT (from scratch)"]
    keys = [f"{n} {met}" for n in RARE + ["macro"] for met in ("AUPRC", "sens@spec0.90")]
    per = {c: {k: [] for k in keys} for c in IMBALANCE}
    for sd in splits:
        coh = make_cohort(out, "q3", sd)
        line = []
        for cname, extra in IMBALANCE.items():
            best, t = train_model(coh, "q3", f"tiny {cname.split(' (')[0].replace('+', 'and')}", enc + extra, out,
                                  epochs, sd)
            y, p, _, _ = model_predictions(best, coh)
            ap = [auprc(y[:, k], p[:, k]) for k in range(len(RARE))]
            se = [recall_at_specificity(y[:, k], p[:, k], 0.9) for k in range(len(RARE))]
            for n, a, r in zip(RARE + ["macro"], ap + [float(np.mean(ap))], se + [float(np.mean(se))]):
                per[cname][f"{n} AUPRC"].append(a)
                per[cname][f"{n} sens@spec0.90"].append(r)
            line.append(f"{cname.split(' (')[0]} {np.mean(ap):.3f} / {np.mean(se):.3f} ({t:.0f} s)")
        pos = ", ".join(f"{n} {int(y[:, k].sum())}" for k, n in enumerate(RARE))
        print(f"  split seed {sd} (test positives: {pos}): macro AUPRC / sensitivity: " + "; ".join(line), flush=True)
    print(f"rarest findings, tiny BERT from scratch: {len(splits)} stratified splits (split seeds {splits}); mean ± sd "
          "over splits; difference to unweighted BCE: mean [95% t-interval over splits], splits where ahead")
    for n in RARE + ["macro"]:
        print(f"\n{n}")
        print(table(["loss", "AUPRC", "AUPRC - bce", "sens@spec0.90", "sens - bce"],
                    paired_rows(per, list(IMBALANCE), (f"{n} AUPRC", f"{n} sens@spec0.90"))), flush=True)


def question_4(out: Path, coh: Path, n: int = 20) -> None:
    from clinfuse.inference import Model, explain_rows

    best = Model.load(out / "runs" / "q1-minilm" / "best")
    rows, info = split_rows(coh, "test")
    pos = [r for r in rows if any(int(float(r[c])) for c in FINDINGS)][:n]
    exps = explain_rows(best, pos, out / "explanations-q4", progress=False)
    table_rows, better, gains = [], 0, []
    for e in exps:
        f = e["report"]["faithfulness"] or {}
        words = sorted(e["report"]["words"], key=lambda w: -w[1])[:5]
        truth = [c for c in FINDINGS if int(float(next(r for r in pos if r["study_id"] == e["study_id"])[c]))]
        better += bool(f.get("better_than_random"))
        gains.append(f.get("faithfulness", float("nan")))
        table_rows.append([e["explained_output"], f"{e['probabilities'][e['explained_output']]:.2f}", ",".join(truth),
                           " ".join(w for w, _ in words), f"{f.get('deletion_area', float('nan')):.3f}",
                           f"{f.get('random_area', float('nan')):.3f}", "yes" if f.get("better_than_random") else "NO"])
    print(table(["explained finding", "p", "true findings", "top 5 words", "deletion area", "random area",
                 "better than random"], table_rows))
    print(f"better than every random order: {better}/{len(exps)}; mean faithfulness (random area - deletion area) "
          f"{np.nanmean(gains):.3f}", flush=True)


def hidden_evaluation(out: Path, test_csv: Path, n_boot: int) -> None:
    """Questions 1 and 2's models on a second reports.csv of the same layout, every report a test report:
    the TF-IDF baseline fitted on --data's training split, and each clinfuse model this command trained
    under --out (question 1/2's MiniLM and tiny BERT, question 5's MiniLM + lexical branch of split seed 0);
    a model not trained yet is named and skipped."""
    texp = out / "test-export"
    if not (texp / "labels.csv").is_file():
        if not test_csv.is_file():
            sys.exit(f"openi study: --test-data {test_csv} not found (a reports.csv with the columns of --data)")
        write_export(from_csv(test_csv), texp, None)
    runs = {"MiniLM (pretrained, fine-tuned)": "minilm", "tiny BERT (from scratch)": "tiny_bert",
            "MiniLM + lexical branch, weight on validation (clinfuse)": "minilm_lexical"}
    for q in ("q1", "q2"):
        coh, hidden = make_cohort(out, q), out / f"cohort-hidden-{q}"
        if not (hidden / "cohort.json").is_file():
            cfg = load_config(HERE / "config.yaml", overrides_for(q) + [
                "cohort.split.train=0", "cohort.split.val=0", "cohort.split.test=1"])
            build_cohort(None, texp / "reports.csv", texp / "labels.csv", hidden, cfg, progress=False)
        results = {"TF-IDF + LR (baseline)": tfidf_lr(coh, hidden)}
        for name, run in runs.items():
            best = out / "runs" / f"{q}-{run}" / "best"
            if not (best / "model.json").is_file():
                which = 5 if run == "minilm_lexical" else q[1]
                print(f"({name}: not trained under {out}; run question {which} first)")
                continue
            model = _with_chosen_weight(best, coh) if run == "minilm_lexical" else best
            y, p, g, _ = model_predictions(model, hidden)
            results[name] = (y, p, g)
        n = len(split_rows(hidden, "test")[0])
        print(f"{q} on {test_csv}: {n} reports, models trained on {DATA}")
        print(discrimination_table(results, QUESTIONS[q]["columns"], n_boot), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/openi"),
                    help="working folder; models already trained there are reused (default: %(default)s)")
    ap.add_argument("--questions", nargs="*", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4, 5, 6],
                    help="questions to run (default 1-4; 5, the repeated splits, trains one MiniLM per split and task; "
                    "6, question 3 over the same split seeds, trains four tiny BERTs per split; "
                    "none, with --test-data: only the hidden evaluation)")
    ap.add_argument("--splits", nargs="+", type=int, default=[0, 1, 2, 3, 4], metavar="SEED",
                    help="split seeds of questions 5 and 6 (default 0-4; 0 is the split of questions 1-3)")
    ap.add_argument("--data", type=Path, default=DEFAULT_CSV, help="the Open-I reports.csv (default: %(default)s)")
    ap.add_argument("--test-data", type=Path, metavar="CSV",
                    help="a second reports.csv of the same layout to score questions 1 and 2's models on")
    ap.add_argument("--epochs-minilm", type=int, default=3, help="fine-tuning epochs of MiniLM (questions 1, 2, 5)")
    ap.add_argument("--epochs-tiny", type=int, default=20, help="epochs of the tiny BERT from scratch (questions 1-3, 6)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of patients for the CIs")
    args = ap.parse_args(argv)
    global DATA
    DATA = args.data
    import torch

    torch.manual_seed(0)
    t0 = time.time()
    epochs = {"MiniLM (pretrained, fine-tuned)": args.epochs_minilm, "tiny BERT (from scratch)": args.epochs_tiny}
    q1 = None
    for q in args.questions:
        print(f"\n## Question {q}", flush=True)
        if q in (1, 2):
            r = question_1_2(args.out, f"q{q}", epochs, args.bootstrap)
            q1 = r["cohort"] if q == 1 else q1
        elif q == 3:
            question_3(args.out, args.epochs_tiny, args.bootstrap)
        elif q == 5:
            question_5(args.out, args.splits, args.epochs_minilm)
        elif q == 6:
            question_6(args.out, args.splits, args.epochs_tiny)
        else:
            question_4(args.out, q1 or make_cohort(args.out, "q1"))
    if args.test_data:
        print("\n## Hidden evaluation", flush=True)
        hidden_evaluation(args.out, args.test_data, args.bootstrap)
    print(f"\nseed 0; data {DATA}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
