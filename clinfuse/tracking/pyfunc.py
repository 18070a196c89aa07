"""The MLflow pyfunc wrapper of a clinfuse model folder (logged as code, not as a pickle).

Input: a DataFrame with
- ``image``: bytes of a float32 array shaped like the model's input (``model.json["input"]``:
  ``[in_channels, *image_size]``, intensities in [0, 1], row-major), or empty bytes when absent;
- ``report``: the report text the model reads (sections with headings), or "" when absent.
Output: a DataFrame with ``p_<output>`` (calibrated probability), ``pred_<output>`` (at the stored
operating point), ``w_image`` and ``w_report`` (the fusion's modality weights).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

try:  # mlflow is imported only where tracking is used
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object

__all__ = ["ClinfusePyfunc", "encode_image"]


def encode_image(array: np.ndarray | None) -> bytes:
    """Bytes for the ``image`` column (float32, C-order); b"" for an absent image."""
    return b"" if array is None else np.ascontiguousarray(array, dtype=np.float32).tobytes()


class ClinfusePyfunc(PythonModel):
    """The pyfunc model (see the module doc for its input and output)."""

    def load_context(self, context):
        from clinfuse.models.model import load_model

        self.model, self.meta, self.tokenizer = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        from clinfuse.config import Config
        from clinfuse.models.model import probabilities
        from clinfuse.models.text import tokenize_reports

        meta, cfg = self.meta, Config.model_validate(self.meta["config"])
        shape = (cfg.model.image.in_channels, *cfg.data.image_size)
        n = len(model_input)
        images = np.zeros((n, *shape), np.float32)
        image_present = np.zeros(n, bool)
        for i, raw in enumerate(model_input["image"]):
            if raw is not None and len(raw):
                images[i] = np.frombuffer(bytes(raw), dtype=np.float32).reshape(shape)
                image_present[i] = True
        texts = [str(t) if isinstance(t, str) else "" for t in model_input["report"]]
        text_present = torch.tensor([bool(t.strip()) for t in texts])
        if self.tokenizer is not None:
            ids, mask = tokenize_reports(self.tokenizer, texts, cfg.model.text)
        else:
            k = 1 if cfg.model.text.long_text == "truncate" else cfg.model.text.max_chunks
            ids = torch.zeros(n, k, cfg.model.text.max_length, dtype=torch.long)
            mask = torch.zeros_like(ids)
        with torch.no_grad():
            out = self.model(torch.from_numpy(images), torch.from_numpy(image_present), ids, mask, text_present)
        probs = probabilities(out["logits"], meta["task"], meta.get("temperature", 1.0)).numpy()
        res = {}
        for k, name in enumerate(meta["output_names"]):
            res[f"p_{name}"] = probs[:, k]
            res[f"pred_{name}"] = (probs[:, k] >= meta.get("thresholds", [0.5] * probs.shape[1])[k]).astype(int)
        w = out["modality_weights"].numpy()
        res["w_image"], res["w_report"] = w[:, 0], w[:, 1]
        return pd.DataFrame(res)
