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
from collections.abc import Mapping
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

    values: Mapping[str, dict[str, float | str]]  # a dict, or a read-only map over a build store
    sources: Mapping[str, str]  # key -> "file:row N"
    declared: VariablesConfig  # as given, or as inferred from the file
    inferred: bool
    quarantine: list[QuarantineEntry]  # or the QuarantineFile it was given
    warnings: list[str]
    n_records: int


def _number(raw: str) -> float | None:
    try:
        v = float(raw)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _infer(path: Path, rows, columns: list[str], quarantine: list[QuarantineEntry]) -> VariablesConfig:
    """Each column's kind from one pass over the rows, keeping per column a flag and at most
    ``MAX_CATEGORIES + 1`` distinct values (a free-text column is not held whole)."""
    seen = {col: False for col in columns}
    numeric_only = {col: True for col in columns}
    distinct: dict[str, set[str]] = {col: set() for col in columns}
    for r in rows:
        for col in columns:
            v = (r.get(col) or "").strip()
            if not v:
                continue
            seen[col] = True
            if numeric_only[col] and _number(v) is None:
                numeric_only[col] = False
            if len(distinct[col]) <= MAX_CATEGORIES:
                distinct[col].add(v)
    numeric: dict[str, NumericVariable] = {}
    categorical: dict[str, list[str]] = {}
    for col in columns:
        if not seen[col]:
            quarantine.append(QuarantineEntry("variable", f"{path}:column {col}", f"column '{col}' is empty; ignored"))
        elif numeric_only[col]:
            numeric[col] = NumericVariable()
        elif len(distinct[col]) <= MAX_CATEGORIES:
            categorical[col] = sorted(distinct[col])
        else:
            quarantine.append(QuarantineEntry(
                "variable", f"{path}:column {col}", f"column '{col}' has more than {MAX_CATEGORIES} distinct values, "
                f"not all numbers (free text or identifiers, not a variable); ignored: declare it in "
                f"cohort.variables or remove it"))
    return VariablesConfig(numeric=numeric, categorical=categorical)


def load_variables(path: str | Path, key_column: str, cfg: VariablesConfig, digest=None, store=None,
                   quarantine=None) -> VariableTable:
    """Read the variables CSV (see the module doc); `digest` is fed the bytes parsed (see ``load_labels``).
    The file is read as a stream (twice when the kinds are inferred: once to infer, once to parse); with
    `store` (a cohort build's :class:`~clinfuse.data.buildstore.BuildStore`) the values are kept there, not
    in memory, and ``values`` and ``sources`` are read-only mappings over them. What is set aside goes to
    `quarantine` (a list, or the build's ``QuarantineFile``) and is the table's ``quarantine``.

    Raises:
        CohortInputError: the file is missing, lacks the key column or a declared variable, or holds no
            usable column.
    """
    path = Path(path)
    inferred = not cfg.declared
    # the digest is fed by the pass that parses (the second one when the kinds are inferred by a first)
    reader, cols, warnings = open_keyed_csv(path, key_column, "variables", "cohort.variables.key_column",
                                            None if inferred else digest)
    quarantine = [] if quarantine is None else quarantine
    others = [c for c in cols if c != key_column and c.lower() not in _IGNORED]
    if inferred:
        cfg = _infer(path, reader, others, quarantine)  # reads the file to its end, which closes it
        reader, cols, _ = open_keyed_csv(path, key_column, "variables", "cohort.variables.key_column", digest)
        warnings.append(f"{path}: cohort.variables not declared; inferred numeric {sorted(cfg.numeric)}, "
                        f"categorical {dict(sorted(cfg.categorical.items()))} (recorded in the cohort's config.yaml)")
    else:
        lacking = [c for c in list(cfg.numeric) + list(cfg.categorical) if c not in cols]
        if lacking:
            reader.close()
            raise CohortInputError(f"{path}: declared variable(s) {lacking} not in the file (columns: "
                                   f"{', '.join(cols)}); fix cohort.variables or the file")
        for c in others:
            if c not in cfg.numeric and c not in cfg.categorical:
                quarantine.append(QuarantineEntry("variable", f"{path}:column {c}", f"column '{c}' is not declared "
                                                  "in cohort.variables; ignored"))
    if not cfg.declared:
        reader.close()
        raise CohortInputError(f"{path}: no usable variable column (see quarantine.csv); declare them in "
                               "cohort.variables")
    table = store.records("variable") if store is not None else None
    records = KeyedRecords("variable", "variables", quarantine, table)
    n = 0
    for i, row in enumerate(reader, start=2):
        n += 1
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
    return VariableTable(records.kept(), records.sources, cfg, inferred, quarantine, warnings, n)
