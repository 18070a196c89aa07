"""Inference over many studies: raw outputs over a loader (validation, evaluation) and explanations
of cohort rows into a folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from ..models.model import study_kwargs
from ..progress import progress as progress_of

__all__ = ["run_inference", "explain_rows", "predict_rows", "to_device", "hide_modality"]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def run_inference(model: nn.Module, loader, device: torch.device, amp_dtype=None,
                  hide: str | None = None) -> dict[str, np.ndarray | list]:
    """Logits, modality weights, labels, presence and study ids of a network over a loader.

    Args:
        model: a ``FusionModel`` (the trainer's, during validation) or its DDP wrapper's module.
        hide: 'image', 'report' or 'variables' to run with that modality hidden on purpose.

    ``image_present`` is per study (any image slot present); ``variables_present`` (any variable
    present) is there when the batches carry variables; ``weights`` has one column per group.
    """
    model.eval()
    out = {"logits": [], "weights": [], "labels": [], "study_id": [], "image_present": [], "text_present": [],
           "variables_present": []}
    for batch in loader:
        batch = to_device(batch, device)
        batch = hide_modality(batch, hide)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            o = model(batch["image"], batch["image_present"], batch["input_ids"], batch["attention_mask"],
                      batch["text_present"], **study_kwargs(batch))
        out["logits"].append(o["logits"].float().cpu())
        out["weights"].append(o["modality_weights"].float().cpu())
        out["labels"].append(batch["label"].cpu())
        ip = batch["image_present"]
        out["image_present"].append((ip.reshape(ip.shape[0], -1).any(1)).cpu())
        out["text_present"].append(batch["text_present"].cpu())
        if "variables_present" in batch:
            out["variables_present"].append(batch["variables_present"].any(1).cpu())
        out["study_id"].extend(batch["study_id"])
    res = {k: torch.cat(v).numpy() for k, v in out.items() if k != "study_id" and v}
    res["study_id"] = out["study_id"]
    return res


def hide_modality(batch: dict, hide: str | None) -> dict:
    """The batch with one modality group hidden ('image', 'report', 'variables'; None: unchanged)."""
    key = {"image": "image_present", "report": "text_present", "variables": "variables_present", None: None}
    if hide not in key:
        raise ValueError(f"hide must be one of image, report, variables, not {hide!r}")
    if hide is None or key[hide] not in batch:
        return batch
    return {**batch, key[hide]: torch.zeros_like(batch[key[hide]])}


def predict_rows(model, rows: list[dict], *, batch_size: int = 32, hide: str | None = None) -> dict:
    """Raw outputs of a :class:`~clinfuse.inference.Model` on cohort rows (see ``run_inference``)."""
    loader = torch.utils.data.DataLoader(model.dataset(rows), batch_size=batch_size, shuffle=False)
    return run_inference(model.network, loader, model.device, hide=hide)


def explain_rows(model, rows: list[dict], out_dir: str | Path, *, method: str | None = None,
                 steps: int | None = None, target: str | int | None = None, progress: bool = True) -> list:
    """Explain cohort rows with a :class:`~clinfuse.inference.Model`; one folder per study under
    `out_dir` and an ``index.json``. Returns the explanations."""

    ds = model.dataset(rows)
    out = Path(out_dir)
    results = []
    for i in progress_of(range(len(ds)), "explain", "study", enabled=progress):
        batch = torch.utils.data.default_collate([ds[i]])
        e = model.explain_item(batch, method=method, steps=steps, target=target)
        e.save(out / e.study_id)
        results.append(e)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps(
        [{"study_id": e["study_id"], "explained_output": e["explained_output"],
          "probability": e["probabilities"][e["explained_output"]],
          "image_better_than_random": (e["image"]["faithfulness"] or {}).get("better_than_random"),
          "report_better_than_random": (e["report"]["faithfulness"] or {}).get("better_than_random")}
         for e in results], indent=2))
    return results
