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

__all__ = ["train_and_audit", "AuditedRun", "environment_tags"]


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
