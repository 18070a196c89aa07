"""NIH chest X-ray study: real radiographs (pneumonia vs no finding) through the hospital path.

Questions (see README.md):
  1. MONAI encoders from scratch (ResNet18, DenseNet121) against logistic regression on 32x32 pixels
     and against the view position alone; overall and within AP and PA films (the label is
     confounded with the view).
  2. Shortcut detection through fusion: the real clinical context (age, sex, view) as a second
     modality; modality shares, the score with each modality hidden, and the change in probability
     when only the view word is flipped (AP <-> PA).
  3. Explanations on real images: deletion faithfulness against random orders for IG, Grad-CAM and
     Occlusion (black and blurred window, explain.occlusion_baseline) on 30 test images, with removed
     patches black and in-painted (explain.deletion_fill), and a figure of 6 overlays.
  4. The plain MONAI recipe (monai_recipe.py: MONAI alone, on the PNGs) against clinfuse's DenseNet121
     on the same split, with its settings and with the recipe's schedule (Adam-like 1e-4, 20 epochs).
  5. Model choice by cross-validation (issue #14): the candidates of `CANDIDATES` (ResNet18 and DenseNet121
     with the study config; DenseNet121 with unweighted BCE, the recipe's schedule, augmentation, intensity
     scaling and optimizer, step by step), each trained on k folds of the development patients
     (train + val; the test split is left out), chosen by validation AUROC over the folds; the plain
     MONAI recipe of question 4 in the same folds as a named baseline.
  6. Training seeds: the recipe and question 5's choice each trained with --seeds seeds on the same split,
     scored on the test split (mean, sd, and the paired difference with a t-interval over seeds).

``--test-data DIR`` scores the models this command trained on --data (question 1's ResNet18 and
DenseNet121, question 4's DenseNet121 with the recipe schedule, the MONAI recipe's saved weights) and the
pixel baseline on a second folder of the same layout (labels.csv + images/), every image a test image.

Usage: python studies/nih-cxr/run.py [--data ../shared/data/nih-cxr] [--out runs/nih] [--questions 1 2 3 4 5 6]
           [--encoder resnet18] [--cv-folds 4] [--seeds 5] [--only RUN ...] [--test-data DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import (DELETION_HEADER, IMAGE_METHODS, auprc, auroc, cell, deletion_summary, labels_of,  # noqa: E402
                     model_predictions, split_rows, table, use_image_method)
from prepare import DEFAULT_DATA, prepare  # noqa: E402

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort  # noqa: E402
from clinfuse.pipeline import train_and_audit  # noqa: E402

ENCODERS = {"ResNet18 (MONAI, from scratch)": "resnet18", "DenseNet121 (MONAI, from scratch)": "densenet121"}
NAMES = {"resnet18": "ResNet18", "densenet121": "DenseNet121"}


def cohorts(data: Path, out: Path) -> tuple[Path, Path]:
    exp = out / "export"
    if not (exp / "labels.csv").is_file():
        prepare(data, exp, progress=False)
    img, ctx = out / "cohort-image", out / "cohort-context"
    cfg = load_config(HERE / "config.yaml")
    if not (img / "cohort.json").is_file():
        build_cohort(exp / "dicom", None, exp / "labels.csv", img, cfg, progress=False)
    if not (ctx / "cohort.json").is_file():
        build_cohort(exp / "dicom", exp / "context.csv", exp / "labels.csv", ctx, cfg, progress=False)
    return img, ctx


def first_path(r: dict) -> str:
    import json

    paths = r["image_paths"]
    return (json.loads(paths) if isinstance(paths, str) else paths)[0]


def views(rows: list[dict]) -> np.ndarray:
    import pydicom

    return np.array([str(pydicom.dcmread(first_path(r), stop_before_pixels=True)
                         .get("ViewPosition", "")).upper() for r in rows])


def pixels(rows: list[dict], size: int = 32) -> np.ndarray:
    from PIL import Image

    from clinfuse.data.dicom import read_dicom

    out = []
    for r in rows:
        a = np.asarray(read_dicom(first_path(r)).pixels, np.float32).squeeze()
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
        out.append(np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)).ravel())
    return np.stack(out)


def baselines(cohort: Path) -> dict:
    """Logistic regression on 32x32 pixels (ten lines), and the view position alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, info = split_rows(cohort, "train")
    te, _ = split_rows(cohort, "test")
    ytr, yte = labels_of(tr, info)[:, 0], labels_of(te, info)
    lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000)).fit(pixels(tr), ytr)
    p_lr = lr.predict_proba(pixels(te))[:, 1:]
    vtr, vte = views(tr), views(te)
    rate = {v: ytr[vtr == v].mean() for v in set(vtr)}
    p_view = np.array([[rate.get(v, ytr.mean())] for v in vte])
    g = [r["patient_id"] for r in te]
    return {"LR on 32x32 pixels (baseline)": (yte, p_lr, g), "view position alone (baseline)": (yte, p_view, g)}


def train_model(cohort: Path, name: str, extra: list[str], out: Path) -> Path:
    run = out / "runs" / name
    if not (run / "best" / "model.json").is_file():
        cfg = load_config(HERE / "config.yaml", extra + [f"tracking.tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}"])
        t0 = time.time()
        train_and_audit(cohort, cfg, run, progress=False, log=lambda s: None)
        print(f"trained {name} in {time.time() - t0:.0f} s", flush=True)
    return run / "best"


def study_config(encoder: str, epochs: int) -> list[str]:
    """The overrides of an image-only model with the study config: what questions 1-5 train as `encoder`."""
    return [f"model.image.name={encoder}", f"train.epochs={epochs}"]


def encoder_suffix(encoder: str) -> str:
    """Folder suffix of questions 2 and 3's outputs: none for ResNet18 (the printed tables), else the encoder."""
    return "" if encoder == "resnet18" else f"-{encoder}"


def strat_rows(results: dict, v: np.ndarray, n_boot: int) -> list[list[str]]:
    rows = []
    for name, (y, p, g) in results.items():
        y, p, g = y[:, 0], p[:, 0], np.asarray(g)
        cells = [name, cell(auroc, y, p, g, n_boot), cell(auprc, y, p, g, n_boot)]
        for view in ("AP", "PA"):
            m = v == view
            cells.append(cell(auroc, y[m], p[m], g[m], n_boot))
        rows.append(cells)
    return rows


def question_1(img: Path, out: Path, n_boot: int, epochs: int) -> dict:
    te, _ = split_rows(img, "test")
    v = views(te)
    y = labels_of(te, _)[:, 0]
    results = baselines(img)
    for name, enc in ENCODERS.items():
        best = train_model(img, enc, study_config(enc, epochs), out)
        yy, p, g, _r = model_predictions(best, img)
        results[name] = (yy, p, g)
    print(f"test split: {len(te)} images of {len(set(r['patient_id'] for r in te))} patients; "
          f"AP {int((v == 'AP').sum())} ({int(y[v == 'AP'].sum())} pneumonia), "
          f"PA {int((v == 'PA').sum())} ({int(y[v == 'PA'].sum())} pneumonia); 95% bootstrap CIs over patients")
    print(table(["model", "AUROC", "AUPRC", "AUROC within AP", "AUROC within PA"], strat_rows(results, v, n_boot)),
          flush=True)
    return results


def flip_view(rows: list[dict]) -> list[dict]:
    swap = {"AP view": "PA view", "PA view": "AP view"}
    out = []
    for r in rows:
        t = r["report"]
        for a, b in swap.items():
            if a in t:
                t = t.replace(a, b)
                break
        out.append({**r, "report": t})
    return out


def question_2(ctx: Path, img: Path, out: Path, n_boot: int, epochs: int, encoder: str = "resnet18") -> None:
    from clinfuse.evaluation.evaluate import predict_split
    from clinfuse.inference import Model

    best = train_model(ctx, f"{encoder}+context", study_config(encoder, epochs) + ["model.fusion.kind=attention"], out)
    te, info = split_rows(ctx, "test")
    v = views(te)
    model = Model.load(best)

    def predict(rows, hide=None):
        o = predict_split(model, ctx, "test", batch_size=64, hide=hide, rows=rows)
        return model.probabilities(o["logits"]), o

    y = labels_of(te, info)
    g = [r["patient_id"] for r in te]
    p_both, o = predict(te)
    p_img, _ = predict(te, hide="report")
    p_txt, _ = predict(te, hide="image")
    p_flip, _ = predict(flip_view(te))
    results = {"fused: image + context": (y, p_both, g), "fused, context hidden (image only)": (y, p_img, g),
               "fused, image hidden (context only)": (y, p_txt, g), "fused, view word flipped": (y, p_flip, g)}
    yi, pi, gi, _ = model_predictions(train_model(img, encoder, study_config(encoder, epochs), out), img)
    results[f"image-only {NAMES[encoder]} (question 1)"] = (yi, pi, gi)
    print(table(["model", "AUROC", "AUPRC", "AUROC within AP", "AUROC within PA"], strat_rows(results, v, n_boot)))
    w = np.asarray(o["weights"])
    d = (p_flip - p_both)[:, 0]
    thr = model.thresholds[0]
    crossed = ((p_flip[:, 0] >= thr) != (p_both[:, 0] >= thr)).mean()
    print(f"mean attention weight: image {w[:, 0].mean():.3f}, context {w[:, 1].mean():.3f}")
    print(f"mean |p(both) - p(context hidden)| = {np.abs(p_both - p_img).mean():.3f}; "
          f"mean |p(both) - p(image hidden)| = {np.abs(p_both - p_txt).mean():.3f}")
    print(f"flipping only the view word: AP->PA mean change in p {d[v == 'AP'].mean():+.3f}, "
          f"PA->AP {d[v == 'PA'].mean():+.3f}; decisions changed at the stored threshold: {crossed:.1%}", flush=True)
    shortcut_in_explanations(best, te, info, v, out, encoder_suffix(encoder))


def shortcut_in_explanations(best: Path, te: list[dict], info: dict, v: np.ndarray, out: Path, suffix: str = "",
                             n: int = 60) -> None:
    """What the explanations a reviewer sees say about the view: the context's Shapley share, and how much of
    the Grad-CAM map lies in the image border (markers, collimation, shoulders) rather than the chest, by view."""
    from clinfuse.inference import Model, explain_rows

    d = out / f"explanations-fused-gradcam{suffix}"
    es = explain_rows(Model.load(best), te[:n], d, method="gradcam", progress=False)
    share = np.array([e["modalities"]["share"]["report"] for e in es])
    border = []
    for e in es:
        a = np.abs(np.load(d / e["study_id"] / e["image"]["file"]).astype(float)).squeeze()
        h, w = a.shape
        bh, bw = round(0.15 * h), round(0.15 * w)
        border.append(1 - a[bh:h - bh, bw:w - bw].sum() / max(a.sum(), 1e-12))
    border, vv = np.array(border), v[:len(es)]
    rows = [[view, str(int((vv == view).sum())), f"{share[vv == view].mean():.3f}", f"{border[vv == view].mean():.3f}"]
            for view in ("AP", "PA")]
    print(f"explanations of the fused model on the first {len(es)} test images (Grad-CAM; border = outer 15% of each side, "
          f"{1 - 0.7 ** 2:.0%} of the area)")
    print(table(["view", "images", "context Shapley share", "Grad-CAM mass in the border"], rows), flush=True)


def question_3(img: Path, out: Path, epochs: int, encoder: str = "resnet18", n: int = 30) -> None:
    from clinfuse.inference import Model, explain_rows

    best = Model.load(train_model(img, encoder, study_config(encoder, epochs), out))
    suffix = encoder_suffix(encoder)
    te, info = split_rows(img, "test")
    rows = te[:n]
    summary, exps = [], {}
    for fill in ("zero", "inpaint"):
        best.config.explain.deletion_fill = fill
        for name in IMAGE_METHODS:
            t0 = time.time()
            folder = f"explanations-{name}{'' if fill == 'zero' else '-' + fill}{suffix}"
            es = explain_rows(best, rows, out / folder, method=use_image_method(best, name), progress=False)
            if fill == "zero" and name != "occlusion-blur":
                exps[name] = es
            summary.append([name, fill] + deletion_summary([e["image"]["faithfulness"] for e in es],
                                                             time.time() - t0))
    print(table(["method", "removed patch"] + DELETION_HEADER, summary))
    print(f"{NAMES[encoder]} of question 1, the first {len(rows)} test images")
    figure(exps, out, HERE / "img" / "overlays.png" if encoder == "resnet18" else out / f"overlays{suffix}.png", suffix)


def figure(exps: dict, out: Path, dst: Path, suffix: str = "") -> None:
    """Two test images (one pneumonia, one not) x three methods = six overlays, in one PNG."""
    from PIL import Image, ImageDraw

    ig = exps["ig"]
    pos = next(e for e in ig if e["probabilities"]["pneumonia"] >= 0.5)
    neg = next(e for e in ig if e["probabilities"]["pneumonia"] < 0.5)
    tiles = []
    for e in (pos, neg):
        for method in ("ig", "gradcam", "occlusion"):
            im = Image.open(out / f"explanations-{method}{suffix}" / e["study_id"] / "overlay.png").convert("RGB")
            im.thumbnail((300, 300))
            canvas = Image.new("RGB", (300, 320), "white")
            canvas.paste(im, (0, 20))
            ImageDraw.Draw(canvas).text((4, 4), f"{method}  p(pneumonia)={e['probabilities']['pneumonia']:.2f}", fill="black")
            tiles.append(canvas)
    sheet = Image.new("RGB", (900, 640), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % 3) * 300, (i // 3) * 320))
    dst.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dst, optimize=True)
    print(f"figure: {dst}")


def train_seconds(run: Path) -> float:
    """Seconds of the training loop (all epochs with their validation), from the run's metrics.jsonl."""
    import json

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return sum(x.get("train_seconds", 0) + x.get("val_seconds", 0) for x in lines)


def png_items(coh: Path, split: str, data: Path) -> tuple[list[dict], list[tuple[str, int]]]:
    """The cohort rows of `split` and, for the plain MONAI recipe, their original PNGs with 0/1 labels."""
    rows, info = split_rows(coh, split)
    y = labels_of(rows, info)[:, 0]
    items = [(str(data / "images" / f"{Path(first_path(r)).stem}.png"), int(t)) for r, t in zip(rows, y)]
    missing = [p for p, _ in items if not Path(p).is_file()]
    if missing:
        sys.exit(f"nih study: {len(missing)} PNGs of the cohort are not under {data}/images (first: {missing[0]})")
    return rows, items


def cached_recipe(train: list, val: list, test: list, cache: Path, save: Path | None = None, seed: int = 0) -> dict:
    """The plain MONAI recipe (`monai_recipe.train_recipe`) on (png, label) lists: its results with arrays as
    lists, trained once and kept in `cache`; `save` keeps its best weights."""
    import json

    if not cache.is_file():
        import torch

        from monai_recipe import train_recipe

        torch.manual_seed(seed)
        r = train_recipe(train, val, test, seed=seed, log=lambda s: print(s, flush=True),
                         save=str(save) if save else None)
        cache.write_text(json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}))
    return json.loads(cache.read_text())


RECIPE_SETTINGS = ["model.image.name=densenet121", "train.epochs=20", "train.lr_image=1.0e-4", "train.lr_head=1.0e-4",
                   "train.patience=0"]
BCE = ["loss.name=bce", "loss.class_weights=none"]  # the package's default loss since 2026-12-06 (docs/model.md)
RECIPE_AUGMENT = ["data.rotate_degrees=15", "data.scale=0.1"]  # the recipe's rotation and zoom ranges
FLIP = ["data.flip=0.5"]  # the recipe's RandFlip(prob=0.5): left-right on its PNG arrays (PILReader gives W first)
PLAIN_AUGMENT = ["data.contrast=0", "data.noise_std=0"]  # the recipe has no gamma and no noise
ADAM = ["train.weight_decay=0", "train.warmup=0", "train.schedule=constant", "train.grad_clip=0"]  # its plain Adam
# its head: one linear layer on DenseNet121's 1024 pooled features, no dropout (clinfuse's default projects
# them to model.fusion.dim and puts a dropout and a linear head on that)
HEAD = ["model.image.project=false", "model.fusion.dim=1024", "model.fusion.dropout=0"]
# how it draws rotation and zoom: RandRotate and RandZoom, p 0.5 each on its own, uncovered pixels from the edge
DRAWS = ["data.affine=independent", "data.padding=border"]
RECIPE = "MONAI recipe (plain MONAI, PNG)"
RECIPE_RUN = "monai-recipe"  # its run name for --only
# question 5's candidates: name -> (run name, config overrides for --epochs); the recipe is the named baseline
CANDIDATES = {
    "ResNet18, study config": ("resnet18", lambda ep: study_config("resnet18", ep)),
    "DenseNet121, study config": ("densenet121", lambda ep: study_config("densenet121", ep)),
    "DenseNet121, recipe schedule": ("densenet121-recipe", lambda ep: RECIPE_SETTINGS),
    "DenseNet121, BCE": ("densenet121-bce", lambda ep: study_config("densenet121", ep) + BCE),
    "DenseNet121, BCE, recipe schedule + rotation/zoom": (
        "densenet121-bce-recipe", lambda ep: RECIPE_SETTINGS + BCE + RECIPE_AUGMENT),
    "DenseNet121, BCE, recipe schedule + rotation/zoom + min-max": (
        "densenet121-bce-recipe-minmax", lambda ep: RECIPE_SETTINGS + BCE + RECIPE_AUGMENT + ["data.intensity=minmax"]),
    "DenseNet121, BCE, recipe schedule + rotation/zoom + flip": (
        "densenet121-bce-recipe-flip", lambda ep: RECIPE_SETTINGS + BCE + RECIPE_AUGMENT + FLIP),
    "DenseNet121, BCE, recipe schedule + the recipe's augmentation only": (
        "densenet121-bce-recipe-aug",
        lambda ep: RECIPE_SETTINGS + BCE + RECIPE_AUGMENT + FLIP + PLAIN_AUGMENT),
    "DenseNet121, BCE, the recipe's schedule, augmentation and optimizer": (
        "densenet121-bce-recipe-all", lambda ep: RECIPE_SETTINGS + BCE + RECIPE_AUGMENT + FLIP + PLAIN_AUGMENT + ADAM),
    "DenseNet121, BCE, the recipe's schedule, augmentation, optimizer and head": (
        "densenet121-bce-recipe-head",
        lambda ep: RECIPE_SETTINGS + BCE + RECIPE_AUGMENT + FLIP + PLAIN_AUGMENT + ADAM + HEAD),
    "DenseNet121, BCE, the recipe's schedule, augmentation as it draws it, optimizer and head": (
        "densenet121-bce-recipe-draws",
        lambda ep: RECIPE_SETTINGS + BCE + RECIPE_AUGMENT + FLIP + PLAIN_AUGMENT + ADAM + HEAD + DRAWS),
    RECIPE: (RECIPE_RUN, None),
}
CHOSEN = "DenseNet121, BCE, the recipe's schedule, augmentation as it draws it, optimizer and head"  # question 5's choice; question 4 scores it


def question_4(img: Path, data: Path, out: Path, n_boot: int, epochs: int, only: set[str] | None = None) -> None:
    """The MONAI tutorial recipe, written with MONAI alone on the original PNGs, against clinfuse's DenseNet121
    on the same patient split: the study config, the recipe's schedule, and the config question 5 chose by
    cross-validation (`CHOSEN`); every model's epoch chosen by validation AUROC (the test split only reports).
    `only`: run names to train and report (default all)."""
    import json

    (tr_rows, tr), (va_rows, va), (te_rows, te) = (png_items(img, s, data) for s in ("train", "val", "test"))
    y = np.array([t for _, t in te])[:, None]
    g = [r["patient_id"] for r in te_rows]
    yv = np.array([t for _, t in va])
    results, facts = {}, []
    if only is None or RECIPE_RUN in only:
        rec = cached_recipe(tr, va, te, out / "monai-recipe.json", save=out / "monai-recipe.pt")
        results[RECIPE] = (y, np.array(rec["p_test"])[:, None], g)
        facts.append([RECIPE, "20", str(rec["best_epoch"]), f"{rec['val_auroc']:.3f}", f"{rec['seconds']:.0f}"])
    for cand in ("DenseNet121, study config", "DenseNet121, recipe schedule", CHOSEN):
        run, extra = CANDIDATES[cand]
        if only is not None and run not in only:
            continue
        name = f"clinfuse {cand}" + (" (question 5's choice)" if cand == CHOSEN else "")
        n_ep = load_config(HERE / "config.yaml", extra(epochs)).train.epochs
        best = train_model(img, run, extra(epochs), out)
        yy, p, gg, _ = model_predictions(best, img)
        _, pv, _, _ = model_predictions(best, img, "val")
        results[name] = (yy, p, gg)
        meta = json.loads((best / "model.json").read_text())
        facts.append([name, str(n_ep), str(meta.get("epoch", "?")), f"{auroc(yv, pv[:, 0]):.3f}",
                      f"{train_seconds(out / 'runs' / run):.0f}"])
    v = views(te_rows)
    print(f"test split: {len(te)} images; image size 128; 95% bootstrap CIs over patients")
    print(table(["model", "AUROC", "AUPRC", "AUROC within AP", "AUROC within PA"], strat_rows(results, v, n_boot)))
    print(table(["model", "epochs", "best epoch", "val AUROC (chooses)", "train s"], facts), flush=True)


def seeded(name: str, seed: int) -> str:
    """The run (or cache) name of `name` trained with `seed`: seed 0 is the name itself (questions 4 and 5's runs)."""
    return name if seed == 0 else f"{name}-seed{seed}"


def question_6(img: Path, data: Path, out: Path, epochs: int, seeds: int) -> None:
    """Training seeds on the test split: the recipe and question 5's choice (`CHOSEN`), each trained with seeds
    0..seeds-1 on the same split (the split's seed stays 0), scored on the same test images. The test split
    chooses nothing here: it measures how far one training's score moves with the seed alone."""
    (_, tr), (_, va), (te_rows, te) = (png_items(img, s, data) for s in ("train", "val", "test"))
    y = np.array([t for _, t in te])
    v = views(te_rows)
    run, extra = CANDIDATES[CHOSEN]
    metrics = {"AUROC": auroc, "AUPRC": auprc,
               "AUROC within AP": lambda yy, pp: auroc(yy[v == "AP"], pp[v == "AP"]),
               "AUROC within PA": lambda yy, pp: auroc(yy[v == "PA"], pp[v == "PA"])}
    score = {RECIPE: [], CHOSEN: []}
    rows = []
    for s in range(seeds):
        rec = cached_recipe(tr, va, te, out / f"{seeded(RECIPE_RUN, s)}.json",
                            save=out / f"{seeded(RECIPE_RUN, s)}.pt", seed=s)
        best = train_model(img, seeded(run, s), extra(epochs) + [f"train.seed={s}"], out)
        yy, p, _, rows_p = model_predictions(best, img)
        if [r["patient_id"] for r in rows_p] != [r["patient_id"] for r in te_rows] or not np.array_equal(yy[:, 0], y):
            sys.exit("nih study: the clinfuse test rows are not the recipe's (question 6 pairs them by position)")
        for name, prob in ((RECIPE, np.array(rec["p_test"])), (CHOSEN, p[:, 0])):
            score[name].append([f(y, prob) for f in metrics.values()])
            rows.append([str(s), name] + [f"{x:.3f}" for x in score[name][-1]])
        print(f"  seed {s}: recipe within PA {score[RECIPE][-1][3]:.3f}, clinfuse {score[CHOSEN][-1][3]:.3f}",
              flush=True)
    print(f"test split: {len(te)} images (AP {int((v == 'AP').sum())}, PA {int((v == 'PA').sum())}); "
          f"{seeds} training seeds each; the split's seed 0")
    print(table(["seed", "model"] + list(metrics), rows), flush=True)
    if seeds < 2:
        return
    from scipy import stats

    a, b = np.array(score[CHOSEN]), np.array(score[RECIPE])
    d = a - b
    half = stats.t.ppf(0.975, seeds - 1) * d.std(0, ddof=1) / np.sqrt(seeds)
    summary = [[m, f"{b[:, i].mean():.3f} ± {b[:, i].std(ddof=1):.3f}", f"{a[:, i].mean():.3f} ± {a[:, i].std(ddof=1):.3f}",
                f"{d[:, i].mean():+.3f} [{d[:, i].mean() - half[i]:+.3f}, {d[:, i].mean() + half[i]:+.3f}]",
                f"{int((d[:, i] > 0).sum())}/{seeds}"] for i, m in enumerate(metrics)]
    print(table(["metric", "recipe mean ± sd", "clinfuse mean ± sd", "clinfuse - recipe (95% t-interval over seeds)",
                 "clinfuse ahead"], summary), flush=True)


def cv_cohort(img: Path, out: Path, fold: int, k: int, seed: int = 0) -> Path:
    """A copy of the image cohort for model choice: its test split left out entirely, its train and val
    patients cut into `k` label-stratified folds (:func:`_common.patient_folds`, the same on every rerun);
    fold `fold` is the validation split, the others train."""
    import json

    from _common import derived_cohort, original_keys, patient_folds

    original = original_keys(img)
    info = json.loads((img / "cohort.json").read_text())  # what labels_of needs: task, columns, classes

    def edit(rows):
        rows[:] = [r for r in rows if r["split"] != "test"]
        fold_of = patient_folds(rows, labels_of(rows, info)[:, 0], original, k, seed)
        for r in rows:
            r["split"] = "val" if fold_of[r["patient_id"]] == fold else "train"

    return derived_cohort(img, out / "cohorts-cv" / f"fold{fold + 1}", edit,
                          f"fold {fold + 1} of {k} of train+val, test left out (nih-cxr model choice)")


def question_5(img: Path, data: Path, out: Path, n_boot: int, epochs: int, k: int, only: set[str] | None = None) -> None:
    """Model choice by k-fold cross-validation on the development patients (train + val); the test split is
    neither trained on nor scored. Each candidate is trained k times, each fold's patients validating once;
    the epoch is chosen inside each fold on its validation part, as every question does. The plain MONAI
    recipe of question 4 runs in the same folds as a named baseline (not a candidate). `only`: run names
    of the candidates to train and report (default all; a deterministic trainer gives the others' rows
    unchanged, so a new candidate can be added without retraining them)."""
    candidates = {n: c for n, c in CANDIDATES.items() if only is None or c[0] in only}
    folds = [cv_cohort(img, out, f, k) for f in range(k)]
    per_fold: dict[str, list[float]] = {n: [] for n in candidates}
    pooled: dict[str, list] = {n: [] for n in candidates}
    secs: dict[str, list[float]] = {n: [] for n in candidates}
    for f, coh in enumerate(folds):
        va, info = split_rows(coh, "val")
        v = views(va)
        for name, (run, extra) in candidates.items():
            if name == RECIPE:  # the recipe: trained on the fold's train split, its best epoch chosen on val
                rec = cached_recipe(png_items(coh, "train", data)[1], png_items(coh, "val", data)[1], [],
                                    out / f"monai-recipe-cv{f + 1}.json")
                p, sec = np.array(rec["p_val"])[:, None], rec["seconds"]
                y, g = labels_of(va, info), [r["patient_id"] for r in va]
            else:
                best = train_model(coh, f"cv{f + 1}-{run}", extra(epochs), out)
                y, p, g, _ = model_predictions(best, coh, "val")
                sec = train_seconds(out / "runs" / f"cv{f + 1}-{run}")
            per_fold[name].append(auroc(y[:, 0], p[:, 0]))
            pooled[name].append((y, p, g, v))
            secs[name].append(sec)
            print(f"  fold {f + 1}/{k} {name}: val AUROC {per_fold[name][-1]:.3f} ({len(va)} images)", flush=True)
    results = {n: tuple(np.concatenate([x[i] for x in pooled[n]]) for i in range(3)) for n in candidates}
    v = np.concatenate([x[3] for x in next(iter(pooled.values()))])  # every development image, once
    print(f"model choice: {k}-fold cross-validation by patient on the {len(v)} development images (train + val); "
          f"test split untouched; pooled out-of-fold predictions, 95% bootstrap CIs over patients")
    print(table(["candidate", "AUROC (pooled)", "AUPRC (pooled)", "AUROC within AP", "AUROC within PA"],
                strat_rows(results, v, n_boot)))
    ref = next((n for n in ("DenseNet121, study config", RECIPE) if n in candidates), None)
    rows = []
    for name in candidates:
        a = np.array(per_fold[name])
        vs = "-"
        if ref is not None and name != ref:
            d = a - np.array(per_fold[ref])
            vs = f"{d.mean():+.3f}, ahead {int((d > 0).sum())}/{k}"
        rows.append([name, " ".join(f"{x:.3f}" for x in a), f"{a.mean():.3f} ± {a.std(ddof=1):.3f}", vs,
                     f"{np.mean(secs[name]):.0f}"])
    print(table(["candidate", "val AUROC per fold", "mean ± sd", f"vs {ref or 'nothing'}", "train s (mean)"],
                rows))
    mine = [n for n in candidates if n != RECIPE]
    if mine:
        chosen = max(mine, key=lambda n: np.mean(per_fold[n]))
        print(f"chosen by mean validation AUROC over the {k} folds{' (of these candidates)' if only else ''}: "
              f"{chosen}", flush=True)


def hidden_evaluation(img: Path, data: Path, test_data: Path, out: Path, n_boot: int) -> None:
    """The trained models and the pixel baseline on a second folder: prepared and built like --data,
    every image in the test split; models that this command has not trained yet are named and skipped."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    texp, hidden = out / "test-export", out / "cohort-hidden"
    if not (texp / "labels.csv").is_file():
        prepare(test_data, texp, progress=False)
    if not (hidden / "cohort.json").is_file():
        cfg = load_config(HERE / "config.yaml", ["cohort.split.train=0", "cohort.split.val=0", "cohort.split.test=1"])
        build_cohort(texp / "dicom", None, texp / "labels.csv", hidden, cfg, progress=False)
    te, info = split_rows(hidden, "test")
    y = labels_of(te, info)
    g = [r["patient_id"] for r in te]
    tr, tinfo = split_rows(img, "train")
    lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000)).fit(pixels(tr), labels_of(tr, tinfo)[:, 0])
    results = {"LR on 32x32 pixels (baseline)": (y, lr.predict_proba(pixels(te))[:, 1:], g)}
    recipe = out / "monai-recipe.pt"
    if recipe.is_file():
        from monai_recipe import predict_recipe

        results["MONAI recipe (plain MONAI, PNG)"] = (y, predict_recipe(
            recipe, [str(test_data / "images" / f"{Path(first_path(r)).stem}.png") for r in te])[:, None], g)
    else:
        print(f"(MONAI recipe: no saved weights {recipe}: question 4 writes them when it trains the recipe; "
              f"delete {out / 'monai-recipe.json'} to retrain it)")
    for name, run in (("ResNet18 (MONAI, from scratch)", "resnet18"), ("DenseNet121 (MONAI, from scratch)", "densenet121"),
                      ("clinfuse DenseNet121, recipe schedule", "densenet121-recipe"),
                      (f"clinfuse {CHOSEN} (question 5's choice)", CANDIDATES[CHOSEN][0])):
        best = out / "runs" / run / "best"
        if not (best / "model.json").is_file():
            print(f"({name}: not trained under {out}; run the question that trains it first)")
            continue
        yy, p, gg, _ = model_predictions(best, hidden)
        results[name] = (yy, p, gg)
    torch.manual_seed(0)
    v = views(te)
    print(f"hidden evaluation on {test_data}: {len(te)} images of {len(set(g))} patients; "
          f"AP {int((v == 'AP').sum())}, PA {int((v == 'PA').sum())}; models trained on {data}")
    print(table(["model", "AUROC", "AUPRC", "AUROC within AP", "AUROC within PA"], strat_rows(results, v, n_boot)),
          flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the NIH chest X-ray folder (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("runs/nih"),
                    help="working folder: export, cohorts, runs, mlflow.db; models already trained there are reused "
                    "(default: %(default)s)")
    ap.add_argument("--questions", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3, 4, 5, 6],
                    help="questions to run (default 1-3; 4: the plain MONAI recipe against three clinfuse configs, about "
                    "30 min on 2 CPU cores; 5: model choice by cross-validation, "
                    f"{len(CANDIDATES) - 1} candidates and the recipe in four folds, about 4 h from scratch; --only runs a subset; 6: the recipe and question 5's choice "
                    "with --seeds training seeds on the test split, about 13.5 min a seed)")
    ap.add_argument("--test-data", type=Path, help="a second folder of the same layout to score the trained models on")
    ap.add_argument("--epochs", type=int, default=12,
                    help="epochs of the study-config models (questions 1, 2, 4, 5; the recipe schedule keeps 20)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of patients for the CIs")
    ap.add_argument("--encoder", default="resnet18", choices=list(NAMES),
                    help="image encoder of questions 2 and 3 (default resnet18, as their printed tables; question 5 "
                    "chooses densenet121)")
    ap.add_argument("--cv-folds", type=int, default=4, help="question 5: folds of the development patients (default 4)")
    ap.add_argument("--seeds", type=int, default=5,
                    help="question 6: training seeds 0..N-1 of the recipe and question 5's choice (default 5; seed 0 "
                    "is question 4's training, reused)")
    ap.add_argument("--only", nargs="+", metavar="RUN", choices=sorted({c[0] for c in CANDIDATES.values()}),
                    help="questions 4 and 5: train and report only these models, by run name (default all): "
                    + "; ".join(f"{c[0]} = {n}" for n, c in CANDIDATES.items()))
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1 (question 6's mean and interval need 2)")
    if not (args.data / "labels.csv").is_file():
        sys.exit(f"nih study: {args.data}/labels.csv not found; pass --data (the NIH chest X-ray folder)")
    import torch

    torch.manual_seed(0)
    t0 = time.time()
    only = set(args.only) if args.only else None
    img, ctx = cohorts(args.data, args.out)
    for q in args.questions:
        print(f"\n## Question {q}", flush=True)
        if q == 1:
            question_1(img, args.out, args.bootstrap, args.epochs)
        elif q == 2:
            question_2(ctx, img, args.out, args.bootstrap, args.epochs, args.encoder)
        elif q == 3:
            question_3(img, args.out, args.epochs, args.encoder)
        elif q == 4:
            question_4(img, args.data, args.out, args.bootstrap, args.epochs, only)
        elif q == 5:
            question_5(img, args.data, args.out, args.bootstrap, args.epochs, args.cv_folds, only)
        else:
            question_6(img, args.data, args.out, args.epochs, args.seeds)
    if args.test_data:
        if not (args.test_data / "labels.csv").is_file():
            sys.exit(f"nih study: {args.test_data}/labels.csv not found (--test-data needs the layout of --data)")
        print("\n## Hidden evaluation", flush=True)
        hidden_evaluation(img, args.data, args.test_data, args.out, args.bootstrap)
    print(f"\nseed 0; data {args.data}; image size 128; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
