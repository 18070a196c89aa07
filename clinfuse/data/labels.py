"""Labels from a CSV: binary, multi-class or multi-label, with every bad row named."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import LabelConfig
from .quarantine import CohortInputError, KeyedRecords, MemoryRecords, QuarantineEntry
from .reports import open_keyed_csv

__all__ = ["LabelTable", "load_labels", "parse_binary"]

_TRUE = {"1", "1.0", "true", "yes", "y", "pos", "positive", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "neg", "negative", "f"}


@dataclass
class LabelTable:
    """`labels[key]` is a list of ints: one class index (binary/multiclass) or one 0/1 per label."""

    labels: dict[str, list[int]]
    sources: dict[str, str]  # key -> "file:row N" of its first row
    patients: dict[str, str]
    quarantine: list[QuarantineEntry]  # or the QuarantineFile it was given
    warnings: list[str]
    n_records: int


def parse_binary(value: str, names: list[str] | None = None) -> int | None:
    """0/1 from common spellings or from the two class names; None when not recognised."""
    v = value.strip().lower()
    if names and v in (names[0].lower(), names[1].lower()):
        return int(v == names[1].lower())
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    return None


def _parse_row(row: dict, cfg: LabelConfig) -> tuple[list[int] | None, str]:
    """(label vector, '') or (None, reason)."""
    if cfg.task == "multilabel":
        out = []
        for col in cfg.columns:
            raw = (row.get(col) or "").strip()
            if raw == "":
                return None, f"missing value in label column '{col}'"
            b = parse_binary(raw)
            if b is None:
                return None, f"unknown value in label column '{col}': {raw[:40]!r} (allowed: 0/1, true/false, yes/no)"
            out.append(b)
        return out, ""
    col = cfg.columns[0]
    raw = (row.get(col) or "").strip()
    if raw == "":
        return None, f"missing label in column '{col}'"
    if cfg.task == "binary":
        b = parse_binary(raw, cfg.classes)
        if b is None:
            allowed = "0/1, true/false, yes/no" + (f", {cfg.classes[0]}/{cfg.classes[1]}" if cfg.classes else "")
            return None, f"unknown class in column '{col}': {raw[:40]!r} (allowed: {allowed})"
        return [b], ""
    names = [c.lower() for c in cfg.class_names]
    if raw.lower() in names:
        return [names.index(raw.lower())], ""
    return None, f"unknown class in column '{col}': {raw[:40]!r} (allowed: {', '.join(cfg.class_names)})"


def load_labels(path: str | Path, key_column: str, cfg: LabelConfig, digest=None, store=None,
                quarantine=None) -> LabelTable:
    """Read the labels CSV.

    Unknown classes, empty cells and conflicting duplicates are quarantined (a conflicting key loses
    every row); identical duplicates are merged. `digest` (a hashlib object, e.g. the cohort fingerprint's)
    is fed the bytes that were parsed, so the fingerprint is of what was read. With `store` (a cohort
    build's :class:`~clinfuse.data.buildstore.BuildStore`) the labels are kept there, not in memory, and
    ``labels``, ``sources`` and ``patients`` are read-only mappings over them. What is set aside goes to
    `quarantine` (a list, or the build's ``QuarantineFile``, which writes each entry as it comes) and is
    the table's ``quarantine``.

    Raises:
        CohortInputError: the file is missing or lacks the key or a label column.
    """
    path = Path(path)
    reader, cols, warnings = open_keyed_csv(path, key_column, "labels", "--labels-key or cohort.labels.key_column",
                                           digest)
    missing = [c for c in cfg.columns if c not in cols]
    if missing:
        reader.close()
        raise CohortInputError(
            f"{path}: label column(s) {missing} not found (columns: {', '.join(cols)}); "
            "set --label-columns or cohort.labels.columns"
        )

    quarantine = [] if quarantine is None else quarantine
    records = KeyedRecords("label", "label", quarantine, store.records("label") if store is not None else None)
    patient_table = store.records("label_patient") if store is not None else MemoryRecords()
    n = 0
    for i, row in enumerate(reader, start=2):
        n += 1
        source = f"{path}:row {i}"
        key = (row.get(key_column) or "").strip()
        if not key:
            quarantine.append(QuarantineEntry("label", source, f"empty key '{key_column}'"))
            continue
        vec, reason = _parse_row(row, cfg)
        if vec is None:
            quarantine.append(QuarantineEntry("label", source, reason))
            continue
        if records.add(key, vec, source) and cfg.patient_column and row.get(cfg.patient_column):
            patient_table.put(key, row[cfg.patient_column].strip(), source)
    labels = records.kept()
    return LabelTable(labels, records.sources, patient_table.kept(), quarantine, warnings, n)
