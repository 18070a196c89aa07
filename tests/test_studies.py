"""The studies' prepare steps: real Open-I labels re-derived from MeSH, the full-download XML path, and
NIH PNGs wrapped into DICOM that the cohort builder splits by patient; the NIH study's plain MONAI recipe."""

from __future__ import annotations

import csv
import importlib.util
import sys

import numpy as np
import pytest
import torch

from .conftest import REPO, SHARED


def _load(folder: str, name: str):
    path = REPO / "studies" / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"study_{folder.replace('-', '_')}_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.parent))
    before = set(sys.modules)
    spec.loader.exec_module(mod)
    # a study's run.py imports its siblings by plain name (`from prepare import ...`): forget them, or the
    # next study's `prepare` would be this one's
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(path.parent)):
            del sys.modules[name]
    return mod


def _shared(path: str):
    p = SHARED / path
    if not p.exists():
        pytest.skip(f"{p} not found (the ../shared checkout is absent); set CLINFUSE_SHARED to run this test")
    return p


def test_openi_labels_from_mesh_match_every_shared_row():
    prep = _load("openi-reports", "prepare")
    rows = list(csv.DictReader(open(_shared("openi/reports.csv"), encoding="utf-8")))
    for r in rows:
        want = {"abnormal": int(r["abnormal"]), **{k: int(r[k]) for k in prep.FINDINGS}}
        assert prep.labels_from_mesh(r["mesh"]) == want, r["mesh"]
    assert len(rows) == 3080


def test_openi_full_download_becomes_a_two_modality_cohort(tmp_path):
    from PIL import Image

    from clinfuse.config import load_config
    from clinfuse.data.cohort import build_cohort, read_cohort

    prep = _load("openi-reports", "prepare")
    xml, png = tmp_path / "ecgen-radiology", tmp_path / "png"
    xml.mkdir()
    png.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        mesh = "<major>normal</major>" if i % 2 else "<major>Pulmonary Atelectasis/base</major><major>Nodule/lung</major>"
        (xml / f"{i}.xml").write_text(
            f'<eCitation><uId id="CXR{i}"/><MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="INDICATION">Cough {i}.</AbstractText>'
            f'<AbstractText Label="FINDINGS">Finding text {i}.</AbstractText>'
            f'<AbstractText Label="IMPRESSION">Impression {i}.</AbstractText>'
            f'</Abstract></Article></MedlineCitation><MeSH>{mesh}</MeSH>'
            f'<parentImage id="CXR{i}_IM-1"><caption>PA chest</caption></parentImage>'
            f'<parentImage id="CXR{i}_IM-2"><caption>Lateral chest</caption></parentImage></eCitation>')
        for k in (1, 2):
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(png / f"CXR{i}_IM-{k}.png")
    rows = prep.from_xml(xml, png)
    assert rows[1]["labels"]["abnormal"] == 0 and rows[0]["labels"]["Atelectasis"] == rows[0]["labels"]["Nodule"] == 1
    stats = prep.write_export(rows, tmp_path / "export", png)
    assert stats == {"studies": 12, "images": 24, "missing_png": 0}
    cfg = load_config(REPO / "studies/openi-reports/config.yaml",
                      ['cohort.labels.task=multilabel', 'cohort.labels.columns=["Atelectasis", "Nodule"]'])
    build_cohort(tmp_path / "export/dicom", tmp_path / "export/reports.csv", tmp_path / "export/labels.csv",
                 tmp_path / "c", cfg, progress=False)
    got, _ = read_cohort(tmp_path / "c")
    assert len(got) == 12 and all(r["image_present"] and r["report_present"] for r in got)
    assert all(r["n_images"] == 1 for r in got)  # the frontal view only; the lateral is set aside by policy


def test_nih_plain_monai_recipe_trains_on_real_pngs_and_its_saved_weights_score_the_same(tmp_path):
    """The MONAI tutorial baseline of the NIH study (MONAI alone, on the PNGs): one epoch on 12 real images;
    the saved best weights give the test probabilities it returned."""
    rec = _load("nih-cxr", "monai_recipe")
    data = _shared("nih-cxr")
    rows = list(csv.DictReader(open(data / "labels.csv", newline="")))
    pos = [(str(data / r["file"]), 1) for r in rows if r["label"] == "pneumonia"][:8]
    neg = [(str(data / r["file"]), 0) for r in rows if r["label"] != "pneumonia"][:8]
    items = [x for pair in zip(pos, neg) for x in pair]  # both classes in every part
    r = rec.train_recipe(items[:8], items[8:12], items[12:], epochs=1, batch_size=4, log=lambda s: None,
                         save=str(tmp_path / "w.pt"))
    assert r["best_epoch"] == 1 and r["p_test"].shape == (4,) and ((r["p_test"] > 0) & (r["p_test"] < 1)).all()
    again = rec.predict_recipe(str(tmp_path / "w.pt"), [p for p, _ in items[12:]], batch_size=4)
    np.testing.assert_allclose(again, r["p_test"], atol=1e-5)


def test_nih_prepare_wraps_pngs_with_their_metadata(tmp_path):
    import pydicom

    prep = _load("nih-cxr", "prepare")
    data = _shared("nih-cxr")
    sub = tmp_path / "nih"
    (sub / "images").mkdir(parents=True)
    rows = list(csv.DictReader(open(data / "labels.csv", newline="")))[:6]
    with open(sub / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(r)
            (sub / r["file"]).write_bytes((data / r["file"]).read_bytes())
    s = prep.prepare(sub, tmp_path / "export", progress=False)
    assert s["images"] == 6 and not s["skipped"]
    r = rows[0]
    ds = pydicom.dcmread(next((tmp_path / "export/dicom" / r["patient_id"]).glob("*.dcm")))
    assert (ds.ViewPosition, ds.PatientSex, ds.PatientID) == (r["view_position"], r["sex"], r["patient_id"])
    assert ds.PatientAge == f"{int(float(r['age'])):03d}Y" and ds.pixel_array.shape == (256, 256)
    ctx = list(csv.DictReader(open(tmp_path / "export/context.csv")))
    assert ctx[0]["report"] == prep.context_text(r["age"], r["sex"], r["view_position"])
    assert f"{r['view_position']} view" in ctx[0]["report"]


def test_synthetic_fusion_hides_modalities_in_training_only(tmp_path):
    from clinfuse.data.cohort import read_cohort

    from .conftest import synthetic_cohort

    study = _load("synthetic-fusion", "run")
    base = synthetic_cohort(tmp_path, studies=120, seed=5, size=32, missing_image=0, missing_report=0, lateral=0)
    derived = study.hide_in_training(base, tmp_path / "m50", 0.5, seed=0)
    (b, binfo), (d, dinfo) = read_cohort(base), read_cohort(derived)
    assert [r["study_id"] for r in b] == [r["study_id"] for r in d]
    test = [r for r in d if r["split"] == "test"]
    assert test and all(r["image_present"] and r["report_present"] for r in test)
    fit = [r for r in d if r["split"] != "test"]
    hidden_img = sum(not r["image_present"] for r in fit)
    hidden_txt = sum(not r["report_present"] for r in fit)
    assert 0.3 < (hidden_img + hidden_txt) / len(fit) < 0.7 and hidden_img and hidden_txt
    assert not any(not r["image_present"] and not r["report_present"] for r in d)
    assert dinfo["missingness"]["both"] == len(d) - hidden_img - hidden_txt
    assert dinfo["missingness"]["report_only"] == hidden_img
    assert dinfo["fingerprint"]["sha256"] != binfo["fingerprint"]["sha256"]


def test_nih_model_choice_folds_leave_the_test_split_out_and_recount_the_cohort(tmp_path):
    from clinfuse.data.cohort import read_cohort

    from .conftest import synthetic_cohort

    study = _load("nih-cxr", "run")
    base = synthetic_cohort(tmp_path, studies=120, seed=5, size=32, lateral=0)
    rows, _ = read_cohort(base)
    dev = {r["study_id"] for r in rows if r["split"] != "test"}
    validated: dict[str, list[int]] = {}
    for f in range(3):
        d, info = read_cohort(study.cv_cohort(base, tmp_path / "cv", f, 3))
        assert {r["study_id"] for r in d} == dev  # the test split is left out, nothing else
        val = [r for r in d if r["split"] == "val"]
        train = [r for r in d if r["split"] == "train"]
        assert val and train and len(val) + len(train) == len(d)
        assert not {r["patient_id"] for r in val} & {r["patient_id"] for r in train}
        for p in {r["patient_id"] for r in val}:
            validated.setdefault(p, []).append(f)
        # cohort.json describes the derived table, not its base
        assert info["counts"]["studies"] == len(d) and info["splits"]["test"]["studies"] == 0
        for split, part in (("train", train), ("val", val)):
            s = info["splits"][split]
            assert s["studies"] == len(part) and s["patients"] == len({r["patient_id"] for r in part})
            y = study.labels_of(part, info)[:, 0]
            assert s["prevalence"][info["classes"][-1]] == pytest.approx(y.mean())
            assert sum(s["missingness"].values()) == len(part)
    assert sorted(validated) == sorted({r["patient_id"] for r in rows if r["study_id"] in dev})
    assert all(len(v) == 1 for v in validated.values())  # every development patient validates exactly once


def test_covid_notes_prepare_and_patient_folds(tmp_path):
    """Real covid-notes rows: PNG -> DICOM with the case's metadata, notes as the report, outcome
    sentences removed for the leakage question, unknown outcomes set aside by the cohort builder with
    their value named, and k folds in which every patient is tested exactly once."""
    import shutil

    import pydicom

    from clinfuse.config import load_config
    from clinfuse.data.cohort import build_cohort, read_cohort

    src = _shared("covid-notes")
    prep = _load("covid-notes", "prepare")
    run = _load("covid-notes", "run")
    rows = list(csv.DictReader(open(src / "labels.csv", newline="", encoding="utf-8")))
    known = [r for r in rows if r["went_icu"] in ("Y", "N") and r["clinical_notes"].strip()][:30]
    odd = [r for r in rows if r["went_icu"] not in ("Y", "N")][:4]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    with open(data / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in known + odd:
            shutil.copy(src / r["file"], data / r["file"])
            w.writerow(r)
    exp = tmp_path / "export"
    s = prep.prepare(data, exp, progress=False)
    assert s["images"] == 34 and s["labelled"]["went_icu"] == 30
    first = next((exp / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(first)
    assert ds.PatientID.startswith("covid-") and ds.ViewPosition in ("PA", "AP", "") and len(ds.AccessionNumber) <= 16
    assert prep.without_outcome("Bilateral opacities. She was admitted to the ICU. Intubated on day 3. Fever.") == (
        "Bilateral opacities. Fever.", 2)
    clean = {r["AccessionNumber"]: r["report"] for r in csv.DictReader(open(exp / "reports_no_outcome.csv"))}
    assert not any(prep._WORDS.search(t) for t in clean.values())
    cfg = load_config(REPO / "studies" / "covid-notes" / "config.yaml")
    summary = build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels_went_icu.csv", tmp_path / "c", cfg,
                           progress=False)
    assert summary.n_studies == 30
    reasons = open(tmp_path / "c" / "quarantine.csv", encoding="utf-8").read()
    assert reasons.count("no valid label for this AccessionNumber") == len(odd)  # each unknown outcome named
    assert all(f"unknown class in column 'went_icu': {r['went_icu']!r}" in reasons for r in odd if r["went_icu"])
    pats = {}
    for fold in range(3):
        coh = run.refold(tmp_path / "c", tmp_path / f"f{fold}", fold, 3)
        got, _ = read_cohort(coh)
        for r in got:
            if r["split"] == "test":
                assert pats.setdefault(r["patient_id"], fold) == fold  # tested once
        assert {r["split"] for r in got} == {"train", "val", "test"}
    assert set(pats) == {r["patient_id"] for r in read_cohort(tmp_path / "c")[0]}
    # a second build draws another salt, so other pseudonyms; the folds hold the same studies all the same
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels_went_icu.csv", tmp_path / "c2", cfg, progress=False)

    def tested(c, fold):
        keys = {r["study_id"]: r["AccessionNumber"] for r in csv.DictReader(open(c / "private" / "key_map.csv"))}
        got, _ = read_cohort(run.refold(c, tmp_path / f"{c.name}-again-f{fold}", fold, 3))
        return sorted(keys[r["study_id"]] for r in got if r["split"] == "test")

    assert read_cohort(tmp_path / "c2")[0][0]["study_id"] != read_cohort(tmp_path / "c")[0][0]["study_id"]
    assert all(tested(tmp_path / "c", f) == tested(tmp_path / "c2", f) for f in range(3))
    # and the fold cohorts' fingerprints are the same too (what `clinfuse reproduce` compares), also from a
    # copy of the export in another folder; another fold has another
    import shutil

    shutil.copytree(exp, tmp_path / "elsewhere")
    build_cohort(tmp_path / "elsewhere" / "dicom", exp / "reports.csv", exp / "labels_went_icu.csv", tmp_path / "c3",
                 cfg, progress=False)

    def fingerprint(c, fold):
        return read_cohort(tmp_path / f"{c}-again-f{fold}")[1]["fingerprint"]["sha256"]

    tested(tmp_path / "c3", 0)
    assert fingerprint("c", 0) == fingerprint("c2", 0) == fingerprint("c3", 0) != fingerprint("c", 1)


def _covid_folder(dst, rows, src):
    import shutil

    (dst / "images").mkdir(parents=True)
    with open(dst / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            shutil.copy(src / r["file"], dst / r["file"])
            w.writerow(r)


@pytest.mark.slow
def test_covid_notes_hidden_evaluation_scores_fold_1_models_on_a_second_folder(tmp_path, capsys):
    """`run.py --test-data DIR`: the study's own command, trained on one folder of real covid-notes rows
    (tiny models, one epoch, fold 1 only), scores its fold-1 models and the baselines on a second folder
    of the same layout, holding other patients, without code changes."""
    src = _shared("covid-notes")
    run = _load("covid-notes", "run")
    rows = [r for r in csv.DictReader(open(src / "labels.csv", newline="", encoding="utf-8"))
            if r["went_icu"] in ("Y", "N") and r["clinical_notes"].strip()]
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    yes = [p for p, rs in by_patient.items() if rs[0]["went_icu"] == "Y"]
    no = [p for p, rs in by_patient.items() if rs[0]["went_icu"] == "N"]
    train_p, hidden_p = yes[:9] + no[:9], yes[9:14] + no[9:14]
    _covid_folder(tmp_path / "data", [r for p in train_p for r in by_patient[p]], src)
    hidden_rows = [r for p in hidden_p for r in by_patient[p]]
    _covid_folder(tmp_path / "hidden", hidden_rows, src)
    tiny = ["model.image.name=densenet_tiny", "model.text.name_or_path=tiny", "train.epochs=1",
            "data.image_size=[32, 32]", "model.fusion.dim=32"]
    run.EXTRA.clear()
    run.ONLY.clear()
    try:
        run.main(["--data", str(tmp_path / "data"), "--test-data", str(tmp_path / "hidden"), "--out",
                  str(tmp_path / "out"), "--outcomes", "went_icu", "--folds", "3", "--questions", "1",
                  "--only-folds", "1"] + [a for o in tiny for a in ("--set", o)])
    finally:
        run.EXTRA.clear()
        run.ONLY.clear()
    out = capsys.readouterr().out
    hidden = out[out.index("hidden evaluation on"):]
    assert f"({len(hidden_rows)} labelled images), models of fold 1" in hidden
    for name in ["TF-IDF + LR on the notes (baseline)", "LR on 32x32 pixels (baseline)", *run.KINDS]:
        line = next(ln for ln in hidden.splitlines() if ln.startswith(f"| {name}"))
        auroc = float(line.split("|")[2].split()[0])
        assert 0.0 <= auroc <= 1.0, line
    # the second folder was prepared on its own, through the study's prepare step: its images, not the first's
    assert len(list((tmp_path / "out/test-export/dicom").rglob("*.dcm"))) == len(hidden_rows)
    assert len(list((tmp_path / "out/export/dicom").rglob("*.dcm"))) == sum(len(by_patient[p]) for p in train_p)


def test_imbalance_study_prints_the_bayes_limit_of_the_same_test_studies(tmp_path, capsys):
    """The limit line scores truth.csv's posterior on exactly the test studies the model was scored on:
    the generator's labels joined through the cohort's key map must equal the cohort's labels, and
    `--set` must reach every condition's config."""
    import json

    import yaml
    from sklearn.metrics import roc_auc_score

    from clinfuse.evaluation.bayes import truth_rows

    imb = _load("imbalance", "run")
    out = tmp_path / "imb"
    imb.main(["--studies", "160", "--prevalence", "0.25", "--seeds", "3", "--conditions", "baseline",
              "--set", "train.epochs=1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "seed 3  bayes-optimal (the limit)" in printed and "overrides=['train.epochs=1']" in printed
    res = json.loads((out / "results.json").read_text())
    base, lim = res["bce unweighted (baseline)"][0], res[imb.LIMIT][0]
    assert (lim["test_pos"], lim["test_n"]) == (base["test_pos"], base["test_n"]) and lim["test_pos"] > 0
    cfg = yaml.safe_load((out / "seed3" / "bce_unweighted" / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["seed"] == 3
    coh = out / "seed3" / "cohort"
    test = [r for r in csv.DictReader(open(coh / "cohort.csv", encoding="utf-8")) if r["split"] == "test"]
    truth = truth_rows(out / "seed3" / "export" / "truth.csv", coh, [r["study_id"] for r in test])
    y = [int(next(v for k, v in t.items() if k.startswith("y_"))) for t in truth]
    assert y == [int(float(r["label"])) for r in test]
    assert lim["auroc"] == pytest.approx(roc_auc_score(y, [float(t["p_available_label"]) for t in truth]))


def test_nih_candidates_are_valid_configs_and_only_selects_them():
    """Every question 5 candidate's overrides load against the study config (a misspelt key would only show
    after a long run), run names are unique, the flip candidates set what their names say, and --only
    refuses a run name that is not a candidate."""
    from clinfuse.config import load_config

    study = _load("nih-cxr", "run")
    runs = [run for run, _ in study.CANDIDATES.values()]
    assert len(runs) == len(set(runs)) and study.RECIPE_RUN in runs
    assert study.CHOSEN in study.CANDIDATES and study.CHOSEN != study.RECIPE
    cfgs = {name: load_config(study.HERE / "config.yaml", extra(12))
            for name, (_, extra) in study.CANDIDATES.items() if extra is not None}
    assert {c.model.image.name for n, c in cfgs.items() if n.startswith("DenseNet121")} == {"densenet121"}
    flip = cfgs["DenseNet121, BCE, recipe schedule + rotation/zoom + flip"]
    assert (flip.data.flip, flip.data.contrast, flip.train.epochs, flip.loss.name) == (0.5, 0.3, 20, "bce")
    aug = cfgs["DenseNet121, BCE, recipe schedule + the recipe's augmentation only"]
    assert (aug.data.flip, aug.data.contrast, aug.data.noise_std, aug.data.rotate_degrees) == (0.5, 0, 0, 15)
    adam = cfgs["DenseNet121, BCE, the recipe's schedule, augmentation and optimizer"]
    assert (adam.train.weight_decay, adam.train.warmup, adam.train.schedule, adam.train.grad_clip,
            adam.data.flip, adam.data.contrast) == (0, 0, "constant", 0, 0.5, 0)
    assert cfgs["DenseNet121, study config"].data.flip == 0 and cfgs["ResNet18, study config"].train.epochs == 12
    head = cfgs["DenseNet121, BCE, the recipe's schedule, augmentation, optimizer and head"]
    from clinfuse.models.model import build_model
    from clinfuse.models.text import tiny_bert_config

    net = build_model(head, 1, tiny_bert_config(64))  # the recipe's head: one linear layer on the 1024 pooled features
    assert not any(isinstance(m, torch.nn.Linear) for m in net.image_encoder.modules())
    assert net.heads[0][-1].in_features == 1024 and net.heads[0][0].p == 0
    draws = cfgs["DenseNet121, BCE, the recipe's schedule, augmentation as it draws it, optimizer and head"]
    assert (draws.data.affine, draws.data.padding, draws.model.image.project, draws.data.flip) == (
        "independent", "border", False, 0.5)
    with pytest.raises(SystemExit):
        study.main(["--only", "densenet999", "--questions", "5"])
