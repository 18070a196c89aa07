"""Tracking: where training, evaluation and explanation report what they did.

``LocalTracker`` writes to the run folder (``params.json``, ``metrics.jsonl``, ``tags.json``). The
MLflow tracker (issue 4) implements the same methods; stages only ever call this interface, and only
this package will import ``mlflow``.
"""

from .local import LocalTracker, NullTracker, Tracker, Trackers

__all__ = ["Tracker", "LocalTracker", "NullTracker", "Trackers"]
