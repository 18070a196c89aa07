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

from .attributions import StudyInput, explain_study, p_without
from .faithfulness import image_deletion, text_deletion
from .render import explanation_html, main_overlay, overlays_of, write_explanation

__all__ = ["Explanation", "build_explanation", "EXPLANATION_FORMAT", "summary_line"]

EXPLANATION_FORMAT = "clinfuse-explanation/1"


@dataclass
class Explanation:
    """An explanation: ``data`` is the JSON contract; ``image`` and ``image_map`` the arrays ([*S]).

    Reads like the dict it wraps (``e["probabilities"]``)."""

    data: dict
    image: np.ndarray | None = None
    image_map: np.ndarray | None = None
    images: dict | None = None  # slot -> image [*S], for a study of several images
    image_maps: dict | None = None  # slot -> map [*S]

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
        return explanation_html(self.data, *overlays_of(self.data, self.image, self.image_map, self.images,
                                                        self.image_maps))

    def overlay_png(self) -> bytes | None:
        return main_overlay(self.data, self.image, self.image_map, self.images, self.image_maps)

    def save(self, out_dir: str | Path) -> list[str]:
        """Write the study's folder; returns the file names."""
        return write_explanation(Path(out_dir), self.data, self.image, self.image_map, self.images, self.image_maps)

    def summary(self) -> str:
        return summary_line(self.data)


def build_explanation(network, batch: dict, *, task: str, tokenizer, output_names: list[str],
                      thresholds: list[float], temperature: float = 1.0, method: str = "ig", steps: int = 32,
                      target: int | None = None, model_ref: dict | None = None,
                      deletion_fill: str = "inpaint", occlusion_baseline: str = "blur") -> Explanation:
    """Attributions, modality Shapley values and faithfulness of one study (a batch of 1).

    For a model with several image slots, ``images`` lists one entry per present image (its view,
    map file and faithfulness); ``image`` is the first of them. For a model that reads variables,
    ``variables`` holds each one's value and Integrated Gradients score."""
    x = StudyInput.from_batch(batch)
    study_id = batch["study_id"][0] if isinstance(batch["study_id"], (list, tuple)) else batch["study_id"]
    a = explain_study(network, x, task=task, tokenizer=tokenizer, target=target, image_method=method,
                      steps=steps, temperature=temperature, occlusion_baseline=occlusion_baseline)
    slots = sorted(a.image_maps)
    faith_img = {j: image_deletion(network, x, a, task, temperature, slot=j, fill=deletion_fill) for j in slots}
    fi = faith_img[slots[0]] if slots else None
    ft = text_deletion(network, x, a, task, tokenizer, temperature)
    groups = list(getattr(network, "group_names", ("image", "report")))
    present = {"image": x.has_image, "report": bool(x.text_present[0])}
    if "variables" in groups:
        present["variables"] = x.has_variables
    sh = a.shapley
    tot = sum(abs(sh[g]) for g in groups)
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
            "present": present,
            "attention": {g: a.attention_weights[k] for k, g in enumerate(groups)},
            "shapley": {g: sh[g] for g in groups},
            "share": {g: abs(sh[g]) / tot if tot else 0.0 for g in groups},
            # the explained probability with one present modality hidden and the others kept: how far this
            # prediction depends on it (the Shapley value also averages in its effect when shown alone)
            "p_without": p_without(sh, present),
        },
        "image": {"method": a.image_method,
                  "occlusion_baseline": occlusion_baseline if a.image_method == "occlusion" else None,
                  "file": "image_attribution.npy" if a.image_map is not None else None,
                  "overlay": "overlay.png" if a.image_map is not None else None, "faithfulness": fi},
        "report": {"words": [[w, float(s)] for w, s in a.tokens], "faithfulness": ft},
        "convergence_delta": a.convergence_delta,
        "logit": a.logit,
        "baseline_logit": a.baseline_logit,
    }
    images, maps = None, {}
    if x.multi:
        from ..config import view_name

        views = x.extra.get("image_view")
        n_img = x.image.shape[1]
        exp["images"] = [{"slot": j, "view": view_name(int(views[0, j])) if views is not None else "",
                          "attention": a.token_weights[j] if a.token_weights else None,
                          "method": a.image_method, "file": f"image_attribution_{j}.npy",
                          "overlay": f"overlay_{j}.png", "faithfulness": faith_img[j]} for j in slots]
        images = {j: x.image[0, j, 0].cpu().numpy() for j in range(n_img) if bool(x.image_present[0, j])}
        maps = dict(a.image_maps)
    if a.variable_scores:
        spec = network.variables_encoder.spec
        values = spec.decode(x.extra["variables"][0], x.extra["variables_present"][0])
        exp["variables"] = {"method": "integrated_gradients",
                            "items": [{"name": n, "value": values[n], "score": a.variable_scores[n]}
                                      for n in spec.names]}
    img = x.slot_image(slots[0])[0, 0].cpu().numpy() if slots else None
    return Explanation(exp, img, a.image_map, images, maps)


def summary_line(e: dict) -> str:
    """One line per explanation: probability, modality shares and the faithfulness verdict of each map."""
    e = e.data if isinstance(e, Explanation) else e
    t = e["explained_output"]
    maps = [(f"image {i['slot'] + 1}" + (f" ({i['view']})" if i["view"] else ""), i["faithfulness"])
            for i in e["images"]] if e.get("images") else [("image", e["image"]["faithfulness"])]
    maps.append(("report", e["report"]["faithfulness"]))
    flags = [f"{w} map {'ok' if f.get('better_than_random') else 'NOT better than random'}" for w, f in maps if f]
    shares = " / ".join(f"{g} {v:.0%}" for g, v in e["modalities"]["share"].items())
    return f"{e['study_id']}  p({t}) = {e['probabilities'][t]:.3f}  shares {shares}  " + "; ".join(flags)
