"""Structured clinical variables from a CSV: numeric and categorical columns, each value checked.

A value that cannot be used (text in a numeric column, a number out of its declared range, a category
not declared) is set aside with the file, the row, the column and the reason, and the variable is
*missing* for that study: missing is a mask in the model, never a zero. A column nobody declared is
named once and ignored. With nothing declared (``cohort.variables`` empty), the build infers each
column's kind from the file (every value a finite number: numeric; at most ``MAX_CATEGORIES``
distinct values: categorical; otherwise refused as free text) and records what it inferred in the
cohort's config, so training and inference read the same declaration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..config import NumericVariable, VariablesConfig
from .quarantine import CohortInputError, KeyedRecords, QuarantineEntry
from .reports import open_keyed_csv

__all__ = ["VariableTable", "load_variables", "MAX_CATEGORIES"]

MAX_CATEGORIES = 20
_IGNORED = {"patientid", "patient_id"}  # a patient column beside the key is expected, never a variable


@dataclass
class VariableTable:
    """`values[key]` maps each usable variable of a study to a float (numeric) or a category (str)."""

    values: dict[str, dict[str, float | str]]
    sources: dict[str, str]  # key -> "file:row N"
    declared: VariablesConfig  # as given, or as inferred from the file
    inferred: bool
    quarantine: list[QuarantineEntry]
    warnings: list[str]
    n_records: int


def _number(raw: str) -> float | None:
    try:
        v = float(raw)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _infer(path: Path, rows: list[dict], columns: list[str], quarantine: list[QuarantineEntry]) -> VariablesConfig:
    numeric: dict[str, NumericVariable] = {}
    categorical: dict[str, list[str]] = {}
    for col in columns:
        values = [(r.get(col) or "").strip() for r in rows]
        values = [v for v in values if v]
        if not values:
            quarantine.append(QuarantineEntry("variable", f"{path}:column {col}", f"column '{col}' is empty; ignored"))
        elif all(_number(v) is not None for v in values):
            numeric[col] = NumericVariable()
        elif len(set(values)) <= MAX_CATEGORIES:
            categorical[col] = sorted(set(values))
        else:
            quarantine.append(QuarantineEntry(
                "variable", f"{path}:column {col}", f"column '{col}' has {len(set(values))} distinct non-numeric "
                f"values (free text or identifiers, not a variable); ignored: declare it in cohort.variables "
                f"or remove it"))
    return VariablesConfig(numeric=numeric, categorical=categorical)


def load_variables(path: str | Path, key_column: str, cfg: VariablesConfig, digest=None) -> VariableTable:
    """Read the variables CSV (see the module doc); `digest` is fed the bytes parsed (see ``load_labels``).

    Raises:
        CohortInputError: the file is missing, lacks the key column or a declared variable, or holds no
            usable column.
    """
    path = Path(path)
    reader, cols, warnings = open_keyed_csv(path, key_column, "variables", "cohort.variables.key_column", digest)
    rows = list(reader)
    quarantine: list[QuarantineEntry] = []
    others = [c for c in cols if c != key_column and c.lower() not in _IGNORED]
    inferred = not cfg.declared
    if inferred:
        cfg = _infer(path, rows, others, quarantine)
        warnings.append(f"{path}: cohort.variables not declared; inferred numeric {sorted(cfg.numeric)}, "
                        f"categorical {dict(sorted(cfg.categorical.items()))} (recorded in the cohort's config.yaml)")
    else:
        lacking = [c for c in list(cfg.numeric) + list(cfg.categorical) if c not in cols]
        if lacking:
            raise CohortInputError(f"{path}: declared variable(s) {lacking} not in the file (columns: "
                                   f"{', '.join(cols)}); fix cohort.variables or the file")
        for c in others:
            if c not in cfg.numeric and c not in cfg.categorical:
                quarantine.append(QuarantineEntry("variable", f"{path}:column {c}", f"column '{c}' is not declared "
                                                  "in cohort.variables; ignored"))
    if not cfg.declared:
        raise CohortInputError(f"{path}: no usable variable column (see quarantine.csv); declare them in "
                               "cohort.variables")
    records = KeyedRecords("variable", "variables", quarantine)
    for i, row in enumerate(rows, start=2):
        source = f"{path}:row {i}"
        key = (row.get(key_column) or "").strip()
        if not key:
            quarantine.append(QuarantineEntry("variable", source, f"empty key '{key_column}'"))
            continue
        values: dict[str, float | str] = {}
        for col, rng in cfg.numeric.items():
            raw = (row.get(col) or "").strip()
            if not raw:
                continue
            v = _number(raw)
            if v is None:
                quarantine.append(QuarantineEntry("variable", source, f"{col}: {raw[:40]!r} is not a finite number; "
                                                  "treated as missing"))
            elif (rng.min is not None and v < rng.min) or (rng.max is not None and v > rng.max):
                quarantine.append(QuarantineEntry("variable", source, f"{col}: {v:g} out of range [{rng.min}, "
                                                  f"{rng.max}]; treated as missing"))
            else:
                values[col] = v
        for col, allowed in cfg.categorical.items():
            raw = (row.get(col) or "").strip()
            if not raw:
                continue
            if raw not in allowed:
                quarantine.append(QuarantineEntry("variable", source, f"{col}: {raw[:40]!r} is not one of {allowed}; "
                                                  "treated as missing"))
            else:
                values[col] = raw
        records.add(key, values, source)
    return VariableTable(records.kept(), records.sources, cfg, inferred, quarantine, warnings, len(rows))
