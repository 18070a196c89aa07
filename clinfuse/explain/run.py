"""Explaining the studies of a cohort split (or given files) with a saved model."""

from __future__ import annotations

import json
from pathlib import Path


from ..config import Config
from ..data.cohort import read_cohort
from ..data.dataset import StudyDataset
from ..models.model import load_model
from .attributions import StudyInput, explain_study
from .faithfulness import image_deletion, text_deletion
from .render import write_explanation

__all__ = ["explain_rows", "explain_cohort", "summary_line", "EXPLANATION_FORMAT"]

EXPLANATION_FORMAT = "clinfuse-explanation/1"


def explain_rows(model_dir: str | Path, rows: list[dict], info: dict, out_dir: str | Path, *,
                 method: str = "ig", steps: int = 32, target: int | None = None, model_ref: dict | None = None,
                 progress: bool = True) -> list[dict]:
    """Explain cohort rows; one folder per study under `out_dir`. Returns the explanations."""
    from tqdm.auto import tqdm

    model, meta, tok = load_model(model_dir)
    cfg = Config.model_validate(meta["config"])
    ds = StudyDataset(rows, info, cfg, tok)
    t = float(meta.get("temperature", 1.0))
    names = meta["output_names"]
    thresholds = meta.get("thresholds", [0.5] * len(names))
    out = Path(out_dir)
    results = []
    for i in tqdm(range(len(ds)), desc="explain", unit="study", disable=None if progress else True):
        item = ds[i]
        x = StudyInput.from_item(item)
        a = explain_study(model, x, task=meta["task"], tokenizer=tok, target=target, image_method=method,
                          steps=steps, temperature=t)
        fi = image_deletion(model, x, a, meta["task"], t)
        ft = text_deletion(model, x, a, meta["task"], tok, t)
        sh = a.shapley
        tot = abs(sh["image"]) + abs(sh["report"])
        both = bool(x.image_present[0]) and bool(x.text_present[0])
        exp = {
            "format": EXPLANATION_FORMAT,
            "study_id": item["study_id"],
            "model": model_ref or {"dir": str(model_dir), "version": None},
            "task": meta["task"],
            "explained_output": names[a.target],
            "probabilities": {n: float(p) for n, p in zip(names, a.probabilities)},
            "predicted": {n: bool(p >= th) for n, p, th in zip(names, a.probabilities, thresholds)},
            "thresholds": {n: float(th) for n, th in zip(names, thresholds)},
            "modalities": {
                "present": {"image": bool(x.image_present[0]), "report": bool(x.text_present[0])},
                "attention": {"image": a.attention_weights[0], "report": a.attention_weights[1]},
                "shapley": {"image": sh["image"], "report": sh["report"]},
                "share": {"image": abs(sh["image"]) / tot if tot else 0.0, "report": abs(sh["report"]) / tot if tot else 0.0},
                # the explained probability with one present modality hidden and the other kept: how far this
                # prediction depends on it (the Shapley value also averages in its effect when shown alone)
                "p_without": {"image": sh["v_report_only"] if both else None,
                              "report": sh["v_image_only"] if both else None},
            },
            "image": {"method": a.image_method, "file": "image_attribution.npy" if a.image_map is not None else None,
                      "overlay": "overlay.png" if a.image_map is not None else None, "faithfulness": fi},
            "report": {"words": [[w, float(s)] for w, s in a.tokens], "faithfulness": ft},
            "convergence_delta": a.convergence_delta,
            "logit": a.logit,
            "baseline_logit": a.baseline_logit,
        }
        img = item["image"].numpy()[0] if bool(x.image_present[0]) else None
        write_explanation(out / item["study_id"], exp, img, a.image_map)
        results.append(exp)
    (out / "index.json").write_text(json.dumps(
        [{"study_id": e["study_id"], "explained_output": e["explained_output"],
          "probability": e["probabilities"][e["explained_output"]],
          "image_better_than_random": (e["image"]["faithfulness"] or {}).get("better_than_random"),
          "report_better_than_random": (e["report"]["faithfulness"] or {}).get("better_than_random")}
         for e in results], indent=2))
    return results


def explain_cohort(model_dir: str | Path, cohort_dir: str | Path, out_dir: str | Path, *, split: str = "test",
                   limit: int | None = None, **kw) -> list[dict]:
    """Explain the first `limit` studies of a split (in cohort order)."""
    rows, info = read_cohort(cohort_dir)
    part = [r for r in rows if r["split"] == split][: limit or None]
    if not part:
        raise ValueError(f"{cohort_dir}: split '{split}' has no studies")
    return explain_rows(model_dir, part, info, out_dir, **kw)


def summary_line(e: dict) -> str:
    """One line per explanation: probability, modality shares and the faithfulness verdict of each map."""
    t = e["explained_output"]
    flags = [f"{w} map {'ok' if (e[w]['faithfulness'] or {}).get('better_than_random') else 'NOT better than random'}"
             for w in ("image", "report") if e[w]["faithfulness"]]
    return (f"{e['study_id']}  p({t}) = {e['probabilities'][t]:.3f}  shares image {e['modalities']['share']['image']:.0%}"
            f" / report {e['modalities']['share']['report']:.0%}  " + "; ".join(flags))
