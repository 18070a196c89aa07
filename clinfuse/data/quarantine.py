"""What the cohort sets aside, and the error for inputs that are wholly unusable."""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ClinfuseError

__all__ = ["QuarantineEntry", "CohortInputError", "KeyedRecords", "reason_category",
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
    conflict is set aside whole (one quarantine entry names the conflicting row and the first).

    `table`: where the records are kept; by default a dict in memory, or a table on disk with the same
    methods (``BuildStore.records``: a cohort build keeps a hospital's labels and reports there)."""

    def __init__(self, kind: str, what: str, quarantine: list[QuarantineEntry], table=None):
        self.kind, self.what, self.quarantine = kind, what, quarantine
        self.table = table if table is not None else MemoryRecords()

    def add(self, key: str, value, source: str, same=lambda a, b: a == b) -> bool:
        """Add a record; True when it is the first for its key."""
        first = self.table.first(key)
        if first is None:
            self.table.put(key, value, source)
            return True
        first_value, first_source, conflicted = first
        if not conflicted and not same(first_value, value):
            self.table.set_conflicted(key)
            self.quarantine.append(QuarantineEntry(
                self.kind, source, f"conflicting duplicate {self.what} for this key "
                f"(first at {first_source}); every row of this key set aside"))
        return False

    @property
    def sources(self):
        """key -> where its first record was read (conflicted keys too)."""
        return self.table.sources()

    def kept(self):
        """key -> value of every key without a conflict."""
        return self.table.kept()


class MemoryRecords:
    """:class:`KeyedRecords`' table in memory."""

    def __init__(self):
        self.values: dict[str, object] = {}
        self._sources: dict[str, str] = {}
        self.conflicted: set[str] = set()

    def first(self, key: str):
        if key not in self.values:
            return None
        return self.values[key], self._sources[key], key in self.conflicted

    def put(self, key: str, value, source: str) -> None:
        self.values[key], self._sources[key] = value, source

    def set_conflicted(self, key: str) -> None:
        self.conflicted.add(key)

    def sources(self) -> dict[str, str]:
        return self._sources

    def kept(self) -> dict[str, object]:
        return {k: v for k, v in self.values.items() if k not in self.conflicted}
