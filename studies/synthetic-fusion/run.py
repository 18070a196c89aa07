"""Synthetic fusion study: what fusion, missing-modality handling and imbalance handling buy.

On cohorts from `clinfuse synth` (the Bayes-optimal answer is known from truth.csv):
  1. image-only vs text-only vs concatenation vs attention fusion, next to the Bayes optimum;
  2. missing modality: training missingness 0/20/50%, with and without modality dropout (and with the
     auxiliary unimodal loss), scored on both / image only / report only (the other modality hidden),
     against dedicated unimodal models;
  3. imbalance at 20%, 5% and 1% prevalence: each loss/sampler option, AUPRC and recall at 90% specificity;
  4. explanations: share of image attribution mass inside the planted opacity (pointing game) for IG,
     Grad-CAM and Occlusion (black and blurred window), trained vs randomised model;
  5. whole studies: a frontal and a lateral view and structured variables (`synth --views 2
     --variables 4`): the model with both image slots and the variables token against the same model on
     the frontal view and the report only and against the Bayes optimum, overall and per pattern.

Every model is trained with `train_and_audit` (one MLflow run each, in OUT/mlflow.db).
Usage: python studies/synthetic-fusion/run.py [--out runs/synthetic-fusion] [--questions 1 2 3 4 5] [--seeds 0 1 2 3]
(question 3 uses the first two seeds: it trains 15 models per seed on 2,400-study cohorts; question 5
uses --q5-studies studies (default 4,000) and the first three seeds)
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import (IMAGE_METHODS, auprc, auprc_ties_random, auroc, derived_cohort,  # noqa: E402
                     model_predictions, recall_at_specificity, split_rows, table)

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort  # noqa: E402
from clinfuse.data.synth import FINDINGS, SynthSpec, synthesize  # noqa: E402
from clinfuse.evaluation.bayes import truth_rows  # noqa: E402
from clinfuse.pipeline import train_and_audit  # noqa: E402


def cohort(out: Path, name: str, spec: SynthSpec) -> tuple[Path, Path]:
    exp, coh = out / "data" / name / "export", out / "data" / name / "cohort"
    if not (coh / "cohort.json").is_file():
        synthesize(exp, spec, progress=False)
        build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", coh,
                     load_config(HERE / "config.yaml", [f"cohort.split.seed={spec.seed}"]), progress=False)
    return coh, exp / "truth.csv"


def train(out: Path, coh: Path, name: str, overrides: list[str], seed: int) -> Path:
    run = out / "runs" / name
    if not (run / "best" / "model.json").is_file():
        cfg = load_config(HERE / "config.yaml", overrides + [f"train.seed={seed}",
                          f"tracking.tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}"])
        train_and_audit(coh, cfg, run, progress=False, log=lambda s: None)
    return run / "best"


def truth_for(coh: Path, truth_csv: Path, rows: list[dict]) -> list[dict]:
    return truth_rows(truth_csv, coh, [r["study_id"] for r in rows])


def mean_sd(v) -> str:
    v = np.asarray(v, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def q1_spec(studies: int, seed: int) -> SynthSpec:
    return SynthSpec(studies=studies, seed=seed, size=64, missing_image=0, missing_report=0, lateral=0)


def question_1(out: Path, seeds: list[int], studies: int) -> None:
    kinds = ["image_only", "text_only", "concat", "mean_logits", "attention"]
    res = {k: {"auroc": [], "auprc": []} for k in kinds}
    bayes = {w: {"auroc": [], "auprc": []} for w in ("image", "report", "both")}
    for seed in seeds:
        coh, truth = cohort(out, f"q1-s{seed}", q1_spec(studies, seed))
        for k in kinds:
            y, p, _, rows = model_predictions(train(out, coh, f"q1-s{seed}-{k}", [f"model.fusion.kind={k}"], seed), coh)
            res[k]["auroc"].append(auroc(y[:, 0], p[:, 0]))
            res[k]["auprc"].append(auprc(y[:, 0], p[:, 0]))
        t = truth_for(coh, truth, rows)
        for w in bayes:
            pb = np.array([float(r[f"p_{w}_label"]) for r in t])
            bayes[w]["auroc"].append(auroc(y[:, 0], pb))
            bayes[w]["auprc"].append(auprc_ties_random(y[:, 0], pb))  # 9 distinct values: ties in random order
    rows = [[k, mean_sd(v["auroc"]), mean_sd(v["auprc"]),
             f"{100 * np.mean(np.array(v['auroc']) / np.array(bayes['both']['auroc'])):.1f}%"] for k, v in res.items()]
    rows += [[f"Bayes optimum, {w}", mean_sd(v["auroc"]), mean_sd(v["auprc"]), ""] for w, v in bayes.items()]
    print(f"{studies} studies per seed, both modalities always present, test split; mean ± sd over seeds {seeds}")
    print(table(["model", "AUROC", "AUPRC", "% of Bayes AUROC (both)"], rows), flush=True)


def hide_in_training(base: Path, dst: Path, missing: float, seed: int) -> Path:
    """A copy of cohort ``base`` where a share ``missing`` of the train and val studies lose one modality
    (half the image, half the report); the test split is left whole, so every condition is scored on the
    very same test studies. cohort.json gets the new missingness and a fingerprint of the changed table."""

    def edit(rows):
        rng = np.random.default_rng(seed)
        for r in rows:
            if r["split"] == "test" or rng.random() >= missing:
                continue
            if rng.random() < 0.5:
                r.update(image_present="0", image_paths="[]", n_images="0")
            else:
                r.update(report_present="0", report="")

    return derived_cohort(base, dst, edit, f"{missing:.0%} of train/val hidden (synthetic-fusion study)")


def aux_head_scores(best: Path, coh: Path, modality: int) -> np.ndarray:
    """Test-split scores of a model's auxiliary head for one modality (0 image, 1 report) on its own."""
    import torch

    from clinfuse.inference import Model

    m = Model.load(best)
    model = m.network
    rows, info = split_rows(coh, "test")
    loader = torch.utils.data.DataLoader(m.dataset(rows), batch_size=128)
    scores = []
    with torch.no_grad():
        for b in loader:
            o = model(b["image"], b["image_present"], b["input_ids"], b["attention_mask"], b["text_present"])
            scores.append(o["aux_logits"][:, modality, 0])
    return torch.cat(scores).numpy()


def question_2(out: Path, seeds: list[int], studies: int) -> None:
    cells: dict[str, dict[str, list]] = {}
    heads: dict[str, dict[str, list]] = {}
    for seed in seeds:
        base, _ = cohort(out, f"q2-s{seed}-m0", SynthSpec(studies=studies, seed=seed, size=64, missing_image=0,
                                                           missing_report=0, lateral=0))
        for miss in (0.0, 0.2, 0.5):
            coh = base if miss == 0 else hide_in_training(base, out / "data" / f"q2-s{seed}-m{int(miss * 100)}" / "cohort",
                                                          miss, seed)
            conds = {f"attention, {int(miss * 100)}% missing, no dropout": ["model.fusion.modality_dropout=0.0"],
                     f"attention, {int(miss * 100)}% missing, dropout 0.3": ["model.fusion.modality_dropout=0.3"],
                     f"attention, {int(miss * 100)}% missing, dropout 0.3 + aux 0.5": [
                         "model.fusion.modality_dropout=0.3", "model.fusion.aux_weight=0.5"]}
            if miss == 0.0:
                conds["dedicated image-only model"] = ["model.fusion.kind=image_only"]
                conds["dedicated text-only model"] = ["model.fusion.kind=text_only"]
            for name, ov in conds.items():
                best = train(out, coh, f"q2-s{seed}-m{int(miss * 100)}-" + name.split(", ")[-1].replace(" ", "_")
                             .replace("%", "") + ("" if "dedicated" not in name else name.split()[1]), ov, seed)
                y, p, _, rows = model_predictions(best, coh)
                assert all(r["image_present"] and r["report_present"] for r in rows), "test split must be whole"
                c = cells.setdefault(name, {"both": [], "image only": [], "report only": []})
                if "image-only" not in name:
                    _, pt, _, _ = model_predictions(best, coh, hide="image")
                    c["report only"].append(auroc(y[:, 0], pt[:, 0]))
                if "text-only" not in name:
                    _, pi, _, _ = model_predictions(best, coh, hide="report")
                    c["image only"].append(auroc(y[:, 0], pi[:, 0]))
                if "dedicated" not in name:
                    c["both"].append(auroc(y[:, 0], p[:, 0]))
                if "aux" in name:
                    heads.setdefault(name, {"image": [], "report": []})
                    for m, key in ((0, "image"), (1, "report")):
                        heads[name][key].append(auroc(y[:, 0], aux_head_scores(best, coh, m)))
    print(f"{studies} studies per seed; training missingness applied to train/val only; the same whole test studies for "
          f"every row, scored as they are or with one modality hidden; "
          f"AUROC mean ± sd over seeds {seeds}")
    print(table(["model (training missingness, modality dropout)", "both", "image only", "report only"],
                [[k, *(mean_sd(v[c]) if v[c] else "-" for c in ("both", "image only", "report only"))]
                 for k, v in cells.items()]), flush=True)
    print("\nthe auxiliary heads alone (each modality's encoder and its linear head, as trained inside the fused model):")
    print(table(["model", "image head AUROC", "report head AUROC"],
                [[k, mean_sd(v["image"]), mean_sd(v["report"])] for k, v in heads.items()]), flush=True)


def question_3(out: Path, seeds: list[int], studies: int) -> None:
    conds = {"bce unweighted": ["loss.name=bce", "loss.class_weights=none"],
             "bce effective weights": ["loss.name=bce", "loss.class_weights=effective"],
             "focal + effective weights (former default)": ["loss.name=focal", "loss.class_weights=effective"],
             "logit adjusted": ["loss.name=logit_adjusted", "loss.class_weights=none"],
             "balanced sampler + bce": ["loss.name=bce", "loss.class_weights=none", "loss.sampler=balanced"]}
    rows = []
    for prev in (0.2, 0.05, 0.01):
        acc = {c: {"auprc": [], "rec": []} for c in conds}
        npos = []
        for seed in seeds:
            coh, _ = cohort(out, f"q3-s{seed}-p{prev}", SynthSpec(studies=studies, seed=seed, size=64, prevalence=prev,
                                                                   lateral=0))
            for c, ov in conds.items():
                y, p, _, _ = model_predictions(train(out, coh, f"q3-s{seed}-p{prev}-{c.split(' (')[0].replace(' ', '_').replace('+', 'and')}", ov, seed), coh)
                acc[c]["auprc"].append(auprc(y[:, 0], p[:, 0]))
                acc[c]["rec"].append(recall_at_specificity(y[:, 0], p[:, 0], 0.9))
            npos.append(int(y[:, 0].sum()))
        for c in conds:
            rows.append([f"{prev:.0%}", f"{np.mean(npos):.0f}", c, mean_sd(acc[c]["auprc"]), mean_sd(acc[c]["rec"])])
    print(f"{studies} studies per seed; mean ± sd over seeds {seeds}")
    print(table(["prevalence", "test positives", "loss / sampler", "AUPRC", "recall @ spec 0.90"], rows), flush=True)


def question_4(out: Path, seeds: list[int], studies: int, n: int = 30) -> None:
    import torch

    from clinfuse.explain.attributions import StudyInput, explain_study
    from clinfuse.inference import Model

    zy, zx = FINDINGS[0].zone
    res: dict[tuple[str, str], list[float]] = {}
    total = 0
    for seed in seeds:
        coh, truth = cohort(out, f"q1-s{seed}", q1_spec(studies, seed))
        best = train(out, coh, f"q1-s{seed}-attention", ["model.fusion.kind=attention"], seed)
        loaded = Model.load(best)
        model, tok = loaded.network, loaded.tokenizer
        rnd = Model.load(best).network
        torch.manual_seed(123 + seed)
        for m in rnd.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        rnd.eval()
        rows, info = split_rows(coh, "test")
        t = truth_for(coh, truth, rows)
        pick = [i for i, r in enumerate(t) if int(r["image_cue_pneumonia"]) > 0 and int(r["has_image"])][:n]
        total += len(pick)
        ds = loaded.dataset([rows[i] for i in pick])
        for name, (method, window) in IMAGE_METHODS.items():
            for which, mdl in (("trained", model), ("randomised", rnd)):
                shares = res.setdefault((name, which), [])
                for i in range(len(ds)):
                    x = StudyInput.from_item(ds[i])
                    a = explain_study(mdl, x, task="binary", tokenizer=tok, image_method=method, steps=32,
                                      occlusion_baseline=window).image_map
                    a = np.abs(np.asarray(a, float)).squeeze()
                    h, w = a.shape
                    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
                    region = (yy - zy) ** 2 + (xx - zx) ** 2 < 0.15 ** 2
                    shares.append(a[region].sum() / max(a.sum(), 1e-12))
    area = float(np.pi * 0.15 ** 2)
    print(f"{total} test studies with a planted opacity (faint or dense; up to {n} per seed, seeds {seeds}); region: a disc "
          f"of radius 0.15 image widths around the planted centre = {area:.1%} of the image (the share a uniform map "
          f"would give); mean ± sd over studies")
    print(table(["method", "trained: mass in region", "randomised: mass in region", "pointing hits (trained)"],
                [[m, mean_sd(res[(m, 'trained')]), mean_sd(res[(m, 'randomised')]),
                  f"{sum(s > area for s in res[(m, 'trained')])}/{total}"] for m in IMAGE_METHODS]),
          flush=True)

def q5_spec(studies: int, seed: int) -> SynthSpec:
    return SynthSpec(studies=studies, seed=seed, size=64, views=2, variables=4, missing_image=0.1, missing_report=0.1,
                     missing_view=0.2, missing_variable=0.15)


def q5_cohort(out: Path, studies: int, seed: int) -> tuple[Path, Path]:
    exp, coh = out / "data" / f"q5-s{seed}" / "export", out / "data" / f"q5-s{seed}" / "cohort"
    if not (coh / "cohort.json").is_file():
        synthesize(exp, q5_spec(studies, seed), progress=False)
        build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", coh,
                     load_config(HERE / "config.yaml", [f"cohort.split.seed={seed}", "cohort.dicom.view_policy=all"]),
                     progress=False, variables=exp / "variables.csv")
    return coh, exp / "truth.csv"


def frontal_only(base: Path, dst: Path) -> Path:
    """A copy of cohort ``base`` whose studies keep their frontal views only (a study with only a lateral
    view becomes image-less): what the first version's model reads."""
    import json

    def edit(rows):
        for r in rows:
            paths, views = json.loads(r["image_paths"]), json.loads(r["image_views"] or "[]")
            keep = [i for i, v in enumerate(views) if v in ("PA", "AP")]
            r.update(image_paths=json.dumps([paths[i] for i in keep]), image_views=json.dumps([views[i] for i in keep]),
                     n_images=str(len(keep)), image_present="1" if keep else "0")

    return derived_cohort(base, dst, edit, "frontal views only (synthetic-fusion study)")


def question_5(out: Path, seeds: list[int], studies: int) -> None:
    conds = {"frontal + report (two tokens)": (["model.image.max_images=1", "model.variables.enabled=false"], True),
             "frontal + lateral + report": (["model.image.max_images=2", "model.variables.enabled=false"], False),
             "frontal + lateral + report + variables": (["model.image.max_images=2"], False)}
    sees = {"frontal + report (two tokens)": ("frontal", "report"),
            "frontal + lateral + report": ("frontal", "lateral", "report"),
            "frontal + lateral + report + variables": ("frontal", "lateral", "report", "variables")}
    res: dict[str, dict[str, list]] = {}
    bayes_all: dict[str, list] = {}
    times: dict[str, list] = {}
    for seed in seeds:
        base, truth_csv = q5_cohort(out, studies, seed)
        for name, (ov, frontal) in conds.items():
            coh = frontal_only(base, out / "data" / f"q5-s{seed}" / "frontal") if frontal else base
            t0 = time.time()
            best = train(out, coh, f"q5-s{seed}-" + name.split(" (")[0].replace(" + ", "-"),
                         ov + ["cohort.dicom.view_policy=all"], seed)
            times.setdefault(name, []).append(time.time() - t0)
            y, p, _, rows = model_predictions(best, base)
            t = truth_for(base, truth_csv, rows)
            y = y[:, 0]

            def limit(r, groups):
                have = {"frontal": r["has_frontal"], "lateral": r["has_lateral"], "report": r["has_report"],
                        "variables": str(int(int(r["n_variables"]) > 0))}
                shown = [g for g in groups if have[g] == "1"]
                return float(r[f"p_{'+'.join(shown)}_label"]) if shown else float("nan")

            pb = np.array([limit(r, sees[name]) for r in t])
            pb = np.where(np.isnan(pb), q5_spec(studies, seed).prevalence, pb)  # nothing seen: the prior
            lat = np.array([r["has_lateral"] == "1" for r in t])
            var = np.array([int(r["n_variables"]) > 0 for r in t])
            cells = {"all test studies": np.ones_like(y, bool), "with a lateral view": lat,
                     "frontal missing": np.array([r["has_frontal"] == "0" for r in t]),
                     "with variables": var, "no report": np.array([r["has_report"] == "0" for r in t])}
            c = res.setdefault(name, {})
            for cell, m in cells.items():
                c.setdefault(cell, []).append(auroc(y[m], p[m, 0]))
                c.setdefault(f"{cell} (Bayes, what it sees)", []).append(auroc(y[m], pb[m]))
            if name == next(iter(conds)):  # the same test studies for every model: once per seed
                full = np.array([float(r["p_available_label"]) for r in t])
                for cell, m in cells.items():
                    bayes_all.setdefault(cell, []).append(auroc(y[m], full[m]))
    cells = ["all test studies", "with a lateral view", "frontal missing", "with variables", "no report"]
    rows = []
    for name, c in res.items():
        rows.append([name, *(mean_sd(c[k]) for k in cells)])
        rows.append(["  its Bayes limit (the same inputs)", *(mean_sd(c[f"{k} (Bayes, what it sees)"]) for k in cells)])
    rows.append(["Bayes optimum (everything present)", *(mean_sd(bayes_all[k]) for k in cells)])
    print(f"{studies} studies per seed (views 2, 4 variables + sex, missing: image 10%, one view 20%, report 10%, each "
          f"variable 15%); test split; AUROC mean ± sd over seeds {seeds}")
    print(table(["model", *cells], rows), flush=True)
    full = res["frontal + lateral + report + variables"]["all test studies"]
    bayes = bayes_all["all test studies"]
    print(f"\nwhole-study model: {100 * np.mean(np.array(full) / np.array(bayes)):.1f}% of the Bayes AUROC (all test "
          "studies); training seconds per model: " + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in times.items()),
          flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/synthetic-fusion"),
                    help="working folder; cohorts and models already there are reused (default: %(default)s)")
    ap.add_argument("--questions", nargs="+", type=int, default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5],
                    help="questions to run (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3],
                    help="one synthetic cohort and training per seed (question 3 takes the first two, question 5 the "
                    "first three)")
    ap.add_argument("--studies", type=int, default=1200, help="studies per synthetic cohort, questions 1-4 (default 1,200)")
    ap.add_argument("--q5-studies", type=int, default=4000, help="studies per seed of question 5 (default 4,000)")
    args = ap.parse_args(argv)
    t0 = time.time()
    for q in args.questions:
        print(f"\n## Question {q}", flush=True)
        t = time.time()
        if q == 1:
            question_1(args.out, args.seeds, args.studies)
        elif q == 2:
            question_2(args.out, args.seeds, args.studies)
        elif q == 3:
            question_3(args.out, args.seeds[:2], args.studies * 2)  # 30 models per seed at 2,400 studies: two seeds
        elif q == 4:
            question_4(args.out, args.seeds, args.studies)
        else:
            question_5(args.out, args.seeds[:3], args.q5_studies)
        print(f"(question {q}: {time.time() - t:.0f} s)", flush=True)
    print(f"\nseeds {args.seeds}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
