"""One study's explanation as an object: the JSON of the design's contract plus the arrays behind it.

``build_explanation(network, batch, ...)`` runs the attributions (:mod:`.attributions`) and their
faithfulness checks (:mod:`.faithfulness`) on a study given in the batch contract (a batch of 1) and
returns an :class:`Explanation`, which renders itself (``.html()``), serialises (``.to_json()``)
and writes its folder (``.save(dir)``: explanation.json, image_attribution.npy, overlay.png,
explanation.html).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attributions import StudyInput, explain_study
from .faithfulness import image_deletion, text_deletion
from .render import explanation_html, overlay_of, write_explanation

__all__ = ["Explanation", "build_explanation", "EXPLANATION_FORMAT", "summary_line"]

EXPLANATION_FORMAT = "clinfuse-explanation/1"


@dataclass
class Explanation:
    """An explanation: ``data`` is the JSON contract; ``image`` and ``image_map`` the arrays ([*S]).

    Reads like the dict it wraps (``e["probabilities"]``)."""

    data: dict
    image: np.ndarray | None = None
    image_map: np.ndarray | None = None

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def study_id(self) -> str:
        return self.data["study_id"]

    def to_json(self, **kw) -> str:
        return json.dumps(self.data, **({"indent": 2} | kw))

    def html(self) -> str:
        """The self-contained page (overlay inlined)."""
        return explanation_html(self.data, overlay_of(self.data, self.image, self.image_map))

    def overlay_png(self) -> bytes | None:
        return overlay_of(self.data, self.image, self.image_map)

    def save(self, out_dir: str | Path) -> list[str]:
        """Write the study's folder; returns the file names."""
        return write_explanation(Path(out_dir), self.data, self.image, self.image_map)

    def summary(self) -> str:
        return summary_line(self.data)


def build_explanation(network, batch: dict, *, task: str, tokenizer, output_names: list[str],
                      thresholds: list[float], temperature: float = 1.0, method: str = "ig", steps: int = 32,
                      target: int | None = None, model_ref: dict | None = None) -> Explanation:
    """Attributions, modality Shapley values and faithfulness of one study (a batch of 1)."""
    x = StudyInput(batch["image"][:1], batch["image_present"][:1].reshape(1).bool(), batch["input_ids"][:1],
                   batch["attention_mask"][:1], batch["text_present"][:1].reshape(1).bool())
    study_id = batch["study_id"][0] if isinstance(batch["study_id"], (list, tuple)) else batch["study_id"]
    a = explain_study(network, x, task=task, tokenizer=tokenizer, target=target, image_method=method,
                      steps=steps, temperature=temperature)
    fi = image_deletion(network, x, a, task, temperature)
    ft = text_deletion(network, x, a, task, tokenizer, temperature)
    sh = a.shapley
    tot = abs(sh["image"]) + abs(sh["report"])
    both = bool(x.image_present[0]) and bool(x.text_present[0])
    exp = {
        "format": EXPLANATION_FORMAT,
        "study_id": study_id,
        "model": model_ref or {"dir": None, "version": None},
        "task": task,
        "explained_output": output_names[a.target],
        "probabilities": {n: float(p) for n, p in zip(output_names, a.probabilities)},
        "predicted": {n: bool(p >= th) for n, p, th in zip(output_names, a.probabilities, thresholds)},
        "thresholds": {n: float(th) for n, th in zip(output_names, thresholds)},
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
    img = x.image[0, 0].numpy() if bool(x.image_present[0]) else None
    return Explanation(exp, img, a.image_map)


def summary_line(e: dict) -> str:
    """One line per explanation: probability, modality shares and the faithfulness verdict of each map."""
    e = e.data if isinstance(e, Explanation) else e
    t = e["explained_output"]
    flags = [f"{w} map {'ok' if (e[w]['faithfulness'] or {}).get('better_than_random') else 'NOT better than random'}"
             for w in ("image", "report") if e[w]["faithfulness"]]
    return (f"{e['study_id']}  p({t}) = {e['probabilities'][t]:.3f}  shares image {e['modalities']['share']['image']:.0%}"
            f" / report {e['modalities']['share']['report']:.0%}  " + "; ".join(flags))
