"""What the cohort sets aside, and the error for inputs that are wholly unusable."""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ClinfuseError

__all__ = ["QuarantineEntry", "CohortInputError", "KeyedRecords", "write_quarantine", "reason_category",
           "QuarantineFile"]


class CohortInputError(ClinfuseError):
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


class QuarantineFile:
    """``quarantine.csv`` written as entries come (``append``, ``+=`` as on a list), so a build that sets
    aside a million files holds none of them; it keeps the counts per reason that ``cohort.json`` reports.
    The file is written under a temporary name and renamed by :meth:`close`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp, "w", newline="", encoding="utf-8")
        self._w = csv.DictWriter(self._f, fieldnames=["kind", "source", "reason"])
        self._w.writeheader()
        self.n = 0
        self.reasons: Counter[str] = Counter()  # "kind: reason category" -> count

    def append(self, e: QuarantineEntry) -> None:
        self._w.writerow(asdict(e))
        self.n += 1
        self.reasons[f"{e.kind}: {reason_category(e.reason)}"] += 1

    def __iadd__(self, entries) -> "QuarantineFile":
        for e in entries:
            self.append(e)
        return self

    def __len__(self) -> int:
        return self.n

    def close(self) -> None:
        self._f.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


class KeyedRecords:
    """Records by key: the first one is kept, identical duplicates merge, and a key whose records
    conflict is set aside whole (one quarantine entry names the conflicting row and the first)."""

    def __init__(self, kind: str, what: str, quarantine: list[QuarantineEntry]):
        self.kind, self.what, self.quarantine = kind, what, quarantine
        self.values: dict[str, object] = {}
        self.sources: dict[str, str] = {}
        self.conflicted: set[str] = set()

    def add(self, key: str, value, source: str, same=lambda a, b: a == b) -> bool:
        """Add a record; True when it is the first for its key."""
        if key not in self.values:
            self.values[key], self.sources[key] = value, source
            return True
        if not same(self.values[key], value) and key not in self.conflicted:
            self.conflicted.add(key)
            self.quarantine.append(QuarantineEntry(
                self.kind, source, f"conflicting duplicate {self.what} for this key "
                f"(first at {self.sources[key]}); every row of this key set aside"))
        return False

    def kept(self) -> dict[str, object]:
        return {k: v for k, v in self.values.items() if k not in self.conflicted}
