"""The PHI guard: nothing identifying reaches MLflow.

Before anything is logged (params, tags, metric names, dataset fields, every artifact file's bytes)
it is screened against the cohort's identifying values (``<cohort>/private/identifiers.json``:
patient names, IDs, birth dates, UIDs, accession numbers, original keys); a purely numeric value
counts only where no other digit touches it. A hit raises
:class:`PhiError`; the message names where and which *kind* of identifier, never the value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ClinfuseError

__all__ = ["PhiGuard", "PhiError"]

_MIN_LEN = 5  # shorter values (e.g. a 4-letter name part) would match ordinary words


class PhiError(ClinfuseError):
    """Something about to be logged contains a patient identifier."""


def _variants(kind: str, value: str) -> set[str]:
    v = value.strip()
    out = {v}
    if kind == "patient_name" and "^" in v:
        parts = [p for p in v.split("^") if p]
        out |= {" ".join(parts), " ".join(reversed(parts)), ", ".join(parts)}
        out |= {p for p in parts if len(p) >= _MIN_LEN}
    if kind == "birth_date" and re.fullmatch(r"\d{8}", v):
        out |= {f"{v[:4]}-{v[4:6]}-{v[6:]}", f"{v[6:]}/{v[4:6]}/{v[:4]}", f"{v[4:6]}/{v[6:]}/{v[:4]}"}
    return {x for x in out if len(x) >= _MIN_LEN}


class PhiGuard:
    """Screens text and files for identifying values.

    Every variant of every identifier goes into one Aho-Corasick automaton (``pyahocorasick``), so a
    text is screened in one pass whatever the number of identifiers: the work per character is
    constant, and the only Python-level work is one boundary check per actual occurrence of an
    identifier (identifiers that share a prefix, as accession numbers do, cost nothing extra).

    Args:
        identifiers: kind -> values (as in ``private/identifiers.json``).
    """

    def __init__(self, identifiers: dict[str, list[str]] | None = None):
        self.kind_of: dict[str, str] = {}
        for kind, values in (identifiers or {}).items():
            for v in values:
                for x in _variants(kind, str(v)):
                    self.kind_of.setdefault(x.lower(), kind)
        self._automaton = None
        if self.kind_of:
            import ahocorasick

            a = ahocorasick.Automaton()
            for ident, kind in self.kind_of.items():
                a.add_word(ident, (ident, kind, ident.isdigit()))
            a.make_automaton()
            self._automaton = a

    @classmethod
    def from_cohort(cls, cohort_dir: str | Path) -> "PhiGuard":
        f = Path(cohort_dir) / "private" / "identifiers.json"
        return cls(json.loads(f.read_text()) if f.is_file() else None)

    def __len__(self) -> int:
        return len(self.kind_of)

    def find(self, text: str) -> str | None:
        """The kind of the first identifier found in `text` (case-insensitive), or None."""
        if self._automaton is None or not text or len(text) < _MIN_LEN:
            return None
        low = text.lower()
        n = len(low)
        # iter() reports every occurrence, overlapping ones included, by the index of its last character
        for end, (ident, kind, numeric) in self._automaton.iter(low):
            if not numeric or _digits_alone(low, end - len(ident) + 1, end + 1, n):
                return kind
        return None

    def check(self, where: str, *texts) -> None:
        """Raise PhiError if any of `texts` holds an identifier."""
        for t in texts:
            kind = self.find(str(t))
            if kind:
                raise PhiError(f"PHI guard: refused to log {where}: it contains a patient identifier "
                               f"(kind: {kind}); nothing was logged")

    def check_file(self, path: str | Path, where: str | None = None) -> None:
        """Screen a file (or every file under a folder).

        Text of any kind is screened whole. Of a ``.safetensors`` or ``.npy`` file only the header
        (tensor names, dtypes, shapes, metadata) is screened: the rest is numbers.
        """
        p = Path(path)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            self.check(where or f"artifact '{f.name}'", _screenable_text(f))


def _digits_alone(text: str, start: int, end: int, n: int) -> bool:
    """A numeric identifier counts only where no digit touches it: patient 12345 is not in 1123456
    (a parameter count, a timestamp), but it is in 'MRN12345' and 'id=12345'."""
    return (start == 0 or not text[start - 1].isdecimal()) and (end == n or not text[end].isdecimal())


def _screenable_text(f: Path) -> str:
    with open(f, "rb") as fh:
        if f.suffix == ".safetensors":
            n = int.from_bytes(fh.read(8), "little")
            return fh.read(min(n, 100 * 2**20)).decode("latin-1")
        if f.suffix == ".npy":
            return fh.read(4096).decode("latin-1")  # magic, version, header dict (dtype, shape)
        return fh.read().decode("latin-1")
