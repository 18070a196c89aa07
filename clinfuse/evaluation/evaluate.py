"""Evaluating a model on a cohort split: calibration and operating points from validation,
metrics overall and per missingness pattern, with a modality hidden on purpose, plots, metrics.json.

``calibrate(model, cohort_dir, cfg)`` fits the temperature and the operating points on the
validation split and stores them with the model (the pipeline calls it on ``best/`` after training).
``evaluate(model, ...)`` uses what is stored and never re-fits on the split it scores. Both take a
:class:`clinfuse.Model` (or anything ``Model.load`` takes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ..config import EvalConfig
from ..data.cohort import read_cohort
from ..errors import ClinfuseError
from ..inference import Model, predict_rows
from ..models.model import probabilities
from .metrics import choose_threshold, fit_temperature, multi_report

__all__ = ["calibrate", "evaluate", "predict_split", "PATTERNS"]

PATTERNS = ("both", "image_only", "report_only")


def _labels(out: dict, task: str) -> np.ndarray:
    return out["labels"] if task == "multiclass" else out["labels"].reshape(len(out["labels"]), -1)


def _as_model(model) -> Model:
    return model if isinstance(model, Model) else Model.load(model)


def predict_split(model, cohort_dir, split: str, batch_size: int = 32, hide: str | None = None, rows=None) -> dict:
    """Raw model outputs on one split of a cohort (or on `rows`), see ``clinfuse.inference.run_inference``."""
    model = _as_model(model)
    if rows is None:
        rows = [r for r in read_cohort(cohort_dir)[0] if r["split"] == split]
    return predict_rows(model, rows, batch_size=batch_size, hide=hide)


def calibrate(model, cohort_dir: str | Path, cfg: EvalConfig | None = None) -> dict:
    """Fit temperature and operating points on the validation split; store them with the model.

    Returns the stored values. Without validation studies the defaults (T = 1, threshold 0.5) stay.
    """
    model = _as_model(model)
    cfg = cfg or model.config.eval
    rows, _ = read_cohort(cohort_dir)
    val = [r for r in rows if r["split"] == "val"]
    task = model.task
    values = {"temperature": 1.0, "thresholds": [0.5] * len(model.output_names),
              "operating_point": {"method": cfg.operating_point, "target": cfg.target, "fitted_on": "val",
                                  "n_val": len(val)}}
    if val:
        out = predict_rows(model, val)
        y = _labels(out, task)
        if cfg.calibrate:
            values["temperature"] = fit_temperature(out["logits"], y, task)
        probs = probabilities(out["logits"], task, values["temperature"]).numpy()
        onehot = np.eye(probs.shape[1], dtype=int)[y] if task == "multiclass" else y
        values["thresholds"] = [choose_threshold(onehot[:, k], probs[:, k], cfg.operating_point, cfg.target)
                                for k in range(probs.shape[1])]
    model.set_calibration(values["temperature"], values["thresholds"], values["operating_point"])
    return values


def _pattern_mask(out: dict, pattern: str) -> np.ndarray:
    ip, tp = out["image_present"].astype(bool), out["text_present"].astype(bool)
    return {"both": ip & tp, "image_only": ip & ~tp, "report_only": ~ip & tp}[pattern]


def evaluate(model, cohort_dir: str | Path, split: str = "test", out_dir: str | Path | None = None,
             cfg: EvalConfig | None = None, plots: bool = True) -> dict:
    """Score a saved model on a split with the stored temperature and thresholds.

    Returns (and writes to ``out_dir/metrics.json``) a dict with ``overall``, ``by_pattern`` (studies
    as they are), ``hidden`` (studies with both modalities, scored with the image or the report
    hidden on purpose; for a model that reads variables, studies with variables and another
    modality, scored with the variables hidden), the temperature, thresholds and model/cohort
    identifiers.
    """
    model = _as_model(model)
    cfg = cfg or model.config.eval
    task, names = model.task, model.output_names
    t, thresholds = model.temperature, model.thresholds
    rows, info = read_cohort(cohort_dir)
    part = [r for r in rows if r["split"] == split]
    if not part:
        raise ClinfuseError(f"{cohort_dir}: split '{split}' has no studies")
    kw = {"bins": cfg.ece_bins, "seed": cfg.seed}
    full = predict_rows(model, part)
    groups = [r["patient_id"] for r in part] if cfg.bootstrap_unit == "patient" else None
    y = _labels(full, task)
    probs = model.probabilities(full["logits"])
    result = {"split": split, "n": len(part), "task": task, "outputs": names, "temperature": t,
              "thresholds": thresholds, "operating_point": model.operating_point,
              "cohort_fingerprint": info["fingerprint"]["sha256"],
              "model_cohort_fingerprint": model.cohort_fingerprint,
              "bootstrap_unit": cfg.bootstrap_unit,
              "overall": multi_report(y, probs, task, names, thresholds, n_boot=cfg.bootstrap, groups=groups, **kw),
              "by_pattern": {}, "hidden": {}}
    for pattern in PATTERNS:
        m = _pattern_mask(full, pattern)
        if m.sum():
            result["by_pattern"][pattern] = {"n": int(m.sum()), **multi_report(y[m], probs[m], task, names,
                                                                                thresholds, **kw)}
    both = _pattern_mask(full, "both")
    if both.sum():
        result["hidden"]["none (both shown)"] = {"n": int(both.sum()), **multi_report(
            y[both], probs[both], task, names, thresholds, **kw)}
        for hide, label in (("image", "image hidden (report only)"), ("report", "report hidden (image only)")):
            o = predict_rows(model, part, hide=hide)
            pr = model.probabilities(o["logits"])
            result["hidden"][label] = {"n": int(both.sum()), **multi_report(y[both], pr[both], task, names,
                                                                             thresholds, **kw)}
    vp = full.get("variables_present")
    if vp is not None and len(vp):
        with_vars = vp.astype(bool) & (full["image_present"].astype(bool) | full["text_present"].astype(bool))
        if with_vars.sum():
            o = predict_rows(model, part, hide="variables")
            pr = model.probabilities(o["logits"])
            result["hidden"]["variables shown (same studies)"] = {"n": int(with_vars.sum()), **multi_report(
                y[with_vars], probs[with_vars], task, names, thresholds, **kw)}
            result["hidden"]["variables hidden"] = {"n": int(with_vars.sum()), **multi_report(
                y[with_vars], pr[with_vars], task, names, thresholds, **kw)}
    result["mean_modality_weights"] = {p: full["weights"][_pattern_mask(full, p)].mean(0).round(4).tolist()
                                       for p in PATTERNS if _pattern_mask(full, p).any()}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
        if plots:
            from .plots import write_plots

            result["plots"] = write_plots(out / "plots", y, probs, task, names, thresholds, result, cfg.ece_bins)
            (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def format_table(result: dict) -> str:
    """The table `clinfuse evaluate` prints."""
    lines = [f"split {result['split']}  n={result['n']}  temperature {result['temperature']:.3f}  "
             f"thresholds {[round(x, 3) for x in result['thresholds']]}", ""]
    head = f"{'subset':<42} {'n':>5} {'AUROC':>7} {'95% CI':>15} {'AUPRC':>7} {'sens':>6} {'spec':>6} {'ECE':>6}"
    lines += [head, "-" * len(head)]

    def row(name, rep, n):
        first = next(iter(rep["per_output"].values()))
        ci = first.get("auroc_ci95")
        ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not np.isnan(ci[0]) else ""
        src = rep.get("macro", first)
        lines.append(f"{name:<42} {n:>5} {src['auroc']:>7.3f} {ci_s:>15} {src['auprc']:>7.3f} "
                     f"{src['sensitivity']:>6.3f} {src['specificity']:>6.3f} {src['ece']:>6.3f}")

    row("all", result["overall"], result["n"])
    for p, rep in result["by_pattern"].items():
        row(f"as present: {p}", rep, rep["n"])
    for h, rep in result["hidden"].items():
        row(f"both present, {h}", rep, rep["n"])
    return "\n".join(lines)
