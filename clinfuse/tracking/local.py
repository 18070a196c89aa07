"""A tracker that writes JSON files into the run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

__all__ = ["Tracker", "LocalTracker", "NullTracker", "Trackers"]


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

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass  # the file is already in (or beside) the run folder

    def close(self) -> None:
        self._metrics.close()


class NullTracker:
    """Used on ranks other than 0: records nothing."""

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path, artifact_path=None) -> None: ...
    def close(self) -> None: ...


class Trackers:
    """Fan-out: every call goes to each tracker."""

    def __init__(self, *trackers):
        self.trackers = [t for t in trackers if t is not None]

    def log_params(self, params: dict) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def set_tags(self, tags: dict) -> None:
        for t in self.trackers:
            t.set_tags(tags)

    def log_artifact(self, path, *args) -> None:
        for t in self.trackers:
            t.log_artifact(path, *args)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
