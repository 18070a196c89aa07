"""A tracker that writes JSON files into the run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

__all__ = ["Tracker", "LocalTracker", "NullTracker"]


class Tracker(Protocol):
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def close(self) -> None: ...


class LocalTracker:
    """Writes ``params.json``, ``tags.json`` and one JSON line per ``log_metrics`` call to ``metrics.jsonl``."""

    def __init__(self, run_dir: str | Path, resume: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.dir / "metrics.jsonl", "a" if resume else "w", encoding="utf-8")

    def log_params(self, params: dict) -> None:
        (self.dir / "params.json").write_text(json.dumps(params, indent=2, default=str))

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._metrics.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._metrics.flush()

    def set_tags(self, tags: dict) -> None:
        f = self.dir / "tags.json"
        old = json.loads(f.read_text()) if f.is_file() else {}
        f.write_text(json.dumps({**old, **tags}, indent=2))

    def log_artifact(self, path: str | Path) -> None:
        pass  # the file is already in the run folder

    def close(self) -> None:
        self._metrics.close()


class NullTracker:
    """Used on ranks other than 0: records nothing."""

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path) -> None: ...
    def close(self) -> None: ...
