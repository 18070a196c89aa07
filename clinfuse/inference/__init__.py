"""Inference stage: the trained model as one object (:class:`Model`), between the models and their
consumers (evaluation, explanation, the CLI, the served MLflow model, the studies).

It composes the data stage (the same preprocessing as the validation dataset), the models stage and
the explain stage; it imports MLflow only (through ``clinfuse.tracking``) to resolve ``models:/`` and
``runs:/`` URIs. See docs/api.md.
"""

from .model import InputSpec, Model, Prediction, Predictions, Study
from .run import explain_rows, predict_rows, run_inference

__all__ = ["Model", "Study", "Prediction", "Predictions", "InputSpec", "run_inference", "predict_rows",
           "explain_rows"]
