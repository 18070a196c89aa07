"""covid-notes study: does fusing a real radiograph with its real clinical notes beat each alone?

On the only data here where a real image and real clinical text belong to the same case
(``../shared/data/covid-notes``: 480 radiographs of 289 patients; ICU admission stated for 215 of them),
with patient-level k-fold cross-validation (each patient is tested exactly once; one model per fold
and condition; intervals from a bootstrap over patients of the pooled out-of-fold predictions):

  1. image only, notes only, concatenation and attention fusion (MiniLM for the notes, DenseNet121
     from scratch for the image), against the ten-line baselines: TF-IDF + logistic regression on the
     notes, logistic regression on 32x32 pixels, and the mean of the two;
  2. leakage: notes-only and attention models, and TF-IDF, trained and scored on the notes with every
     sentence naming an outcome removed (prepare.OUTCOME_WORDS);
  3. missing notes: the attention model on test studies with notes, the notes hidden, against the
     image-only model on the same studies;
  4. explanations: for 10 test studies (fold 1) the top words and the image map with their deletion
     faithfulness;
  5. the lexical branch of the report path (model.text.lexical, its blend weight chosen on each fold's
     validation split) in the notes-only and the attention model, against both without it;
  6. image explanations: Integrated Gradients, Grad-CAM and Occlusion on every fold-1 test study with an
     image, by deletion faithfulness (how the default image method was chosen).

``--test-data DIR`` scores the fold-1 models and baselines of each outcome on a second folder of the
same layout (hidden evaluation; every study there is a test study).

Usage: python studies/covid-notes/run.py [--data ../shared/data/covid-notes] [--out runs/covid-notes]
           [--outcomes went_icu intubated] [--folds 5] [--questions 1 2 3 4 5 6] [--test-data DIR]
           [--only-folds F ...] [--set KEY=VALUE ...]
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

from _common import (DELETION_HEADER, IMAGE_METHODS, auprc, auroc, bootstrap_ci, deletion_summary,  # noqa: E402
                     derived_cohort, labels_of, model_predictions, original_keys, patient_folds, split_rows, table,
                     use_image_method)
from prepare import DEFAULT_DATA, OUTCOMES, prepare  # noqa: E402

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort  # noqa: E402
from clinfuse.pipeline import train_and_audit  # noqa: E402

KINDS = {"image only (DenseNet121)": "image_only", "notes only (MiniLM)": "text_only",
         "concatenation": "concat", "attention fusion (clinfuse)": "attention"}


def base_cohort(exp: Path, out: Path, outcome: str, notes: str, split: str = "0.6,0.2,0.2") -> Path:
    tr, va, te = split.split(",")
    coh = out / "cohorts" / f"{outcome}-{Path(notes).stem}" if split == "0.6,0.2,0.2" else out
    if not (coh / "cohort.json").is_file():
        cfg = load_config(HERE / "config.yaml", [f"cohort.labels.columns=[{outcome}]", f"cohort.split.train={tr}",
                                                 f"cohort.split.val={va}", f"cohort.split.test={te}"])
        build_cohort(exp / "dicom", exp / notes, exp / f"labels_{outcome}.csv", coh, cfg, progress=False)
    return coh


def refold(base: Path, dst: Path, fold: int, k: int, seed: int = 0) -> Path:
    """A copy of cohort `base` whose split is fold `fold` of a patient-level, label-stratified k-fold:
    that fold is the test split, the next one the validation split, the rest training."""
    col = json.loads((base / "cohort.json").read_text())["label_columns"][0]
    original = original_keys(base)

    def edit(rows):
        fold_of = patient_folds(rows, [r[col] for r in rows], original, k, seed)
        for r in rows:
            f = fold_of[r["patient_id"]]
            r["split"] = "test" if f == fold else "val" if f == (fold + 1) % k else "train"

    return derived_cohort(base, dst, edit, f"fold {fold + 1} of {k} (covid-notes study)")


EXTRA: list[str] = []  # --set key=value, for every model of the run
WEIGHTS: dict[str, list[float]] = {}  # question 5: the lexical blend weight each fold's model chose on validation
ONLY: list[int] = []  # --only-folds: score these folds only (their patients are still each tested once)


def train(out: Path, coh: Path, name: str, overrides: list[str]) -> Path:
    run = out / "runs" / name
    if not (run / "best" / "model.json").is_file():
        cfg = load_config(HERE / "config.yaml", overrides + EXTRA + [
            f"tracking.tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}"])
        t0 = time.time()
        train_and_audit(coh, cfg, run, progress=False, log=lambda s: None)
        print(f"  trained {name} in {time.time() - t0:.0f} s", flush=True)
    return run / "best"


def pixels(rows: list[dict], size: int = 32) -> np.ndarray:
    from PIL import Image

    from clinfuse.data.dicom import read_dicom

    out = []
    for r in rows:
        if not r["image_present"]:
            out.append(np.zeros(size * size, np.float32))
            continue
        a = np.asarray(read_dicom(r["image_paths"][0]).pixels, np.float32).squeeze()
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
        out.append(np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)).ravel())
    return np.stack(out)


def baselines(train_rows: list[dict], test_rows: list[dict], info: dict) -> dict[str, np.ndarray]:
    """The ten-line baselines, fitted on train + val: TF-IDF + LR on the notes, LR on 32x32 pixels, their mean."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = labels_of(train_rows, info)[:, 0]
    text = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced"))
    text.fit([r["report"] for r in train_rows], y)
    img = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000, class_weight="balanced"))
    img.fit(pixels(train_rows), y)
    pt = text.predict_proba([r["report"] for r in test_rows])[:, 1]
    pi = img.predict_proba(pixels(test_rows))[:, 1]
    return {"TF-IDF + LR on the notes (baseline)": pt, "LR on 32x32 pixels (baseline)": pi,
            "mean of the two (ten-line fusion)": (pt + pi) / 2}


def cell(y, p, g, fn, n_boot=1000) -> str:
    lo, hi = bootstrap_ci(y, p, fn, n_boot, 0, g)
    return f"{fn(y, p):.3f} [{lo:.3f}, {hi:.3f}]"


def report(title: str, pooled: dict, per_fold: dict, what: str = "AUROC (pooled out-of-fold, 95% CI)") -> None:
    rows = []
    for name, (y, p, g) in pooled.items():
        folds = per_fold.get(name, [])
        rows.append([name, cell(y, p, g, auroc), cell(y, p, g, auprc),
                     f"{np.mean(folds):.3f} ± {np.std(folds, ddof=1):.3f}" if len(folds) > 1 else "-"])
    print(title)
    print(table(["model", what, "AUPRC (95% CI)", "AUROC per fold, mean ± sd"], rows), flush=True)


def run_folds(out: Path, base: Path, outcome: str, tag: str, kinds: dict, k: int, hide: str | None = None,
              with_baselines: bool = True, only_with_notes: bool = False):
    """Pooled out-of-fold predictions (y, p, patient) and per-fold AUROC of each condition."""
    pooled: dict[str, list] = {}
    per_fold: dict[str, list] = {}
    for fold in range(k):
        if ONLY and fold + 1 not in ONLY:
            continue
        coh = refold(base, out / "folds" / f"{outcome}-{tag}-f{fold + 1}", fold, k)
        tr = [r for r in split_rows(coh, "train")[0] + split_rows(coh, "val")[0]]
        te, info = split_rows(coh, "test")
        keep = np.array([bool(r["report_present"]) for r in te]) if only_with_notes else np.ones(len(te), bool)
        preds = {}
        if with_baselines:
            preds.update(baselines(tr, te, info))
        for name, (kind, h, *lexical) in kinds.items():
            extra, run = (["model.text.lexical.enabled=true"], f"{kind}_lexical") if lexical else ([], kind)
            best = train(out, coh, f"{outcome}-{tag}-{run}-f{fold + 1}",
                         [f"cohort.labels.columns=[{outcome}]", f"model.fusion.kind={kind}"] + extra)
            y, p, g, _ = model_predictions(best, coh, hide=h)
            preds[name] = p[:, 0]
            if lexical:
                from clinfuse.inference import Model

                WEIGHTS.setdefault(name, []).append(Model.load(best).meta["lexical"]["blend"]["weight"])
        y = labels_of(te, info)[:, 0]
        g = np.array([f"f{fold}-{r['patient_id']}" for r in te])
        for name, p in preds.items():
            acc = pooled.setdefault(name, [[], [], []])
            acc[0].append(y[keep])
            acc[1].append(p[keep])
            acc[2].append(g[keep])
            if 0 < y[keep].sum() < keep.sum():
                per_fold.setdefault(name, []).append(auroc(y[keep], p[keep]))
    return {n: tuple(np.concatenate(v) for v in acc) for n, acc in pooled.items()}, per_fold


def describe(base: Path, outcome: str) -> str:
    rows, info = split_rows(base, "train")
    allr = rows + split_rows(base, "val")[0] + split_rows(base, "test")[0]
    y = labels_of(allr, info)[:, 0]
    return (f"{outcome}: {len(allr)} labelled images of {len({r['patient_id'] for r in allr})} patients, "
            f"{int(y.sum())} yes / {int(len(y) - y.sum())} no, {sum(bool(r['report_present']) for r in allr)} with notes")


def question_1(out, exp, outcome, k):
    base = base_cohort(exp, out, outcome, "reports.csv")
    print(describe(base, outcome) + f"; {k}-fold cross-validation by patient"
          + (f", folds {ONLY} only" if ONLY else ""))
    pooled, per_fold = run_folds(out, base, outcome, "notes", {n: (kd, None) for n, kd in KINDS.items()}, k)
    report(f"\n{outcome}: all labelled images (a study without notes is image-only for every model)", pooled, per_fold)
    return pooled


def question_2(out, exp, outcome, k):
    base = base_cohort(exp, out, outcome, "reports_no_outcome.csv")
    kinds = {"notes only (MiniLM), outcome sentences removed": ("text_only", None),
             "attention fusion, outcome sentences removed": ("attention", None)}
    pooled, per_fold = run_folds(out, base, outcome, "no-outcome", kinds, k)
    def renamed(d):
        return {(f"{k2}, outcome sentences removed" if "TF-IDF" in k2 or "mean of" in k2 else k2): v
                for k2, v in d.items() if "pixels" not in k2}

    pooled, per_fold = renamed(pooled), renamed(per_fold)
    report(f"\n{outcome}: the same folds, notes without any sentence naming an outcome", pooled, per_fold)


def question_3(out, exp, outcome, k):
    base = base_cohort(exp, out, outcome, "reports.csv")
    kinds = {"attention fusion, notes shown": ("attention", None), "attention fusion, notes hidden": ("attention", "report"),
             "image-only model": ("image_only", None)}
    pooled, per_fold = run_folds(out, base, outcome, "notes", kinds, k, with_baselines=False, only_with_notes=True)
    report(f"\n{outcome}: test studies that have notes, scored with the notes shown or hidden", pooled, per_fold)


def question_5(out, exp, outcome, k):
    """The lexical branch (model.text.lexical, blend weight chosen on each fold's validation split) in the
    notes-only and the attention model, against the same models without it, on question 1's folds."""
    WEIGHTS.clear()
    base = base_cohort(exp, out, outcome, "reports.csv")
    kinds = {"notes only (MiniLM)": ("text_only", None), "notes only + lexical branch": ("text_only", None, True),
             "attention fusion (clinfuse)": ("attention", None),
             "attention fusion + lexical branch": ("attention", None, True)}
    pooled, per_fold = run_folds(out, base, outcome, "notes", kinds, k)
    pooled = {n: v for n, v in pooled.items() if "pixels" not in n}
    report(f"\n{outcome}: question 1's folds, with and without the lexical branch", pooled, per_fold)
    for name, ws in WEIGHTS.items():
        print(f"{name}: blend weight chosen on validation per fold: {', '.join(f'{w:.1f}' for w in ws)}")


def question_4(out, exp, outcome, k, n=10):
    from clinfuse.inference import Model

    base = base_cohort(exp, out, outcome, "reports.csv")
    coh = refold(base, out / "folds" / f"{outcome}-notes-f1", 0, k)
    best = train(out, coh, f"{outcome}-notes-attention-f1", [f"cohort.labels.columns=[{outcome}]",
                                                             "model.fusion.kind=attention"])
    m = Model.load(best)
    te, _ = split_rows(coh, "test")
    pick = [r for r in te if r["image_present"] and r["report_present"]][:n]
    rows = []
    for e in (m.explain_item(_batch(m, r), method=meth) for r in pick for meth in ("gradcam",)):
        words = sorted((w for w in e["report"]["words"] if any(c.isalnum() for c in w[0])), key=lambda w: -w[1])[:5]
        fi, ft = e["image"]["faithfulness"] or {}, e["report"]["faithfulness"] or {}
        rows.append([e["study_id"][:10], f"{e['probabilities'][e['explained_output']]:.2f}",
                     f"{e['modalities']['share']['image']:.0%}/{e['modalities']['share']['report']:.0%}",
                     ", ".join(w for w, _ in words), f"{ft.get('faithfulness', float('nan')):+.3f}"
                     + ("" if ft.get("better_than_random") else " (not > random)"),
                     f"{fi.get('faithfulness', float('nan')):+.3f}" + ("" if fi.get("better_than_random") else " (not > random)")])
    print(f"\n{outcome}: {len(rows)} test studies of fold 1 with image and notes, attention model; Grad-CAM image map, "
          "Integrated Gradients word scores; faithfulness = random deletion area - map's deletion area")
    print(table(["study", "p(yes)", "share image/notes", "top 5 words", "words faithfulness", "image faithfulness"], rows),
          flush=True)


def question_6(out, exp, outcome, k):
    """Image explanation methods on real radiographs: Integrated Gradients, Grad-CAM and Occlusion (black and
    blurred window) on every fold-1 test study with an image, the fold-1 attention model (question 1's), by
    deletion faithfulness with the removed patches black and in-painted (explain.deletion_fill)."""
    from clinfuse.inference import Model

    base = base_cohort(exp, out, outcome, "reports.csv")
    coh = refold(base, out / "folds" / f"{outcome}-notes-f1", 0, k)
    best = train(out, coh, f"{outcome}-notes-attention-f1", [f"cohort.labels.columns=[{outcome}]",
                                                             "model.fusion.kind=attention"])
    m = Model.load(best)
    pick = [r for r in split_rows(coh, "test")[0] if r["image_present"]]
    rows = []
    for fill in ("zero", "inpaint"):
        m.config.explain.deletion_fill = fill
        for name in IMAGE_METHODS:
            t0 = time.time()
            method = use_image_method(m, name)
            f = [m.explain_item(_batch(m, r), method=method)["image"]["faithfulness"] for r in pick]
            rows.append([name, fill] + deletion_summary(f, time.time() - t0))
    print(f"\n{outcome}: {len(pick)} fold-1 test studies with an image, attention model of fold 1; image map's "
          "deletion faithfulness (random deletion area - map's deletion area)")
    print(table(["method", "removed patch"] + DELETION_HEADER, rows), flush=True)


def _batch(m, r):
    import torch

    return torch.utils.data.default_collate([m.dataset([r])[0]])


def hidden_evaluation(out, exp, test_data: Path, outcome: str, k: int):
    """Score fold-1 models and baselines (trained by this command on --data) on a second folder."""
    texp = out / "test-export"
    if not (texp / f"labels_{outcome}.csv").is_file():
        prepare(test_data, texp, progress=False)
    hidden = base_cohort(texp, out / "cohorts" / f"hidden-{outcome}", outcome, "reports.csv", split="0,0,1")
    coh = refold(base_cohort(exp, out, outcome, "reports.csv"), out / "folds" / f"{outcome}-notes-f1", 0, k)
    te, info = split_rows(hidden, "test")
    y = labels_of(te, info)[:, 0]
    g = np.array([r["patient_id"] for r in te])
    tr = split_rows(coh, "train")[0] + split_rows(coh, "val")[0]
    preds = baselines(tr, te, info)
    for name, kind in KINDS.items():
        best = train(out, coh, f"{outcome}-notes-{kind}-f1", [f"cohort.labels.columns=[{outcome}]",
                                                              f"model.fusion.kind={kind}"])
        _, p, _, _ = model_predictions(best, hidden)
        preds[name] = p[:, 0]
    report(f"\n{outcome}: hidden evaluation on {test_data} ({len(te)} labelled images), models of fold 1",
           {n: (y, p, g) for n, p in preds.items()}, {}, "AUROC (95% CI over patients)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the covid-notes folder (default: %(default)s)")
    ap.add_argument("--test-data", type=Path, help="a second folder of the same layout to score the models on")
    ap.add_argument("--out", type=Path, default=Path("runs/covid-notes"),
                    help="working folder; models already trained there are reused (default: %(default)s)")
    ap.add_argument("--outcomes", nargs="+", default=list(OUTCOMES), choices=list(OUTCOMES),
                    help="outcomes to study, each its own cohort and table (default: all)")
    ap.add_argument("--folds", type=int, default=5, help="patient-level folds k (default 5): each fold tests once")
    ap.add_argument("--questions", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4, 5, 6],
                    help="questions to run (default 1-4; 5: the lexical branch in the notes-only and attention models; "
                    "6: the image explanation methods compared)")
    ap.add_argument("--only-folds", nargs="+", type=int, metavar="F",
                    help="run and score only these folds (1-based): a partial run, its patients each tested once")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every model (e.g. train.epochs=20); use another --out")
    args = ap.parse_args(argv)
    EXTRA.extend(args.overrides)
    ONLY.extend(args.only_folds or [])
    if args.folds < 3:
        sys.exit("covid-notes: --folds must be at least 3 (one fold tests, the next validates, the rest train)")
    if not (args.data / "labels.csv").is_file():
        sys.exit(f"covid-notes: {args.data}/labels.csv not found; pass --data (the covid-notes folder)")
    t0 = time.time()
    exp = args.out / "export"
    if not (exp / "labels_went_icu.csv").is_file():
        s = prepare(args.data, exp, progress=False)
        print(f"prepare: {s['images']} images, {s['with_notes']} with notes, {s['sentences_dropped']} outcome sentences "
              f"removed for question 2; labelled {s['labelled']}")
    for outcome in args.outcomes:
        for q in args.questions:
            print(f"\n## {outcome}, question {q}", flush=True)
            t = time.time()
            (question_1, question_2, question_3, question_4, question_5, question_6)[q - 1](args.out, exp, outcome, args.folds)
            print(f"({outcome} question {q}: {time.time() - t:.0f} s)", flush=True)
        if args.test_data:
            hidden_evaluation(args.out, exp, args.test_data, outcome, args.folds)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
