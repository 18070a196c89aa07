"""What the cohort sets aside, and the error for inputs that are wholly unusable."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["QuarantineEntry", "CohortInputError", "write_quarantine", "reason_category"]


class CohortInputError(ValueError):
    """An input that makes the whole build impossible (no DICOM found, key column missing, ...)."""


@dataclass(frozen=True)
class QuarantineEntry:
    """One file or record set aside. `source` is a file path or ``file:row N``; `reason` says why."""

    kind: str  # "dicom" | "report" | "label" | "study"
    source: str
    reason: str


def reason_category(reason: str) -> str:
    """The reason without its specifics (for counting in cohort.json, which must carry no paths)."""
    return reason.split(" (")[0].split(":")[0].strip()


def write_quarantine(entries: list[QuarantineEntry], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "source", "reason"])
        w.writeheader()
        for e in entries:
            w.writerow(asdict(e))
