"""The structured clinical variables as one token: features, standardisation, the encoder.

A model that reads variables keeps their declaration (``VariableSpec``: numeric names, categorical
names with their categories, as the cohort recorded them) in its ``model.json``. Each study's values
become two vectors of ``n_features`` (:meth:`VariableSpec.features`): the raw value of each numeric
variable and a one-hot of each categorical one, and a present flag per feature (a categorical's
flags are its variable's). The encoder standardises numeric values with the training split's mean
and SD (buffers in the weights, so inference cannot drift from them), zeroes what is missing, and
maps ``[value, present]`` through a small MLP to one token. A missing value is a mask, not a zero:
its flag tells "missing" from "at the mean". See docs/model.md for why one token and not one per
variable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["VariableSpec", "VariablesEncoder"]


@dataclass(frozen=True)
class VariableSpec:
    numeric: tuple[str, ...] = ()
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_info(cls, info: dict | None) -> "VariableSpec":
        """From ``cohort.json``'s or ``model.json``'s ``variables`` entry (None: no variables)."""
        if not info:
            return cls()
        cats = info.get("categorical") or {}
        return cls(tuple(sorted(info.get("numeric") or ())), tuple((k, tuple(cats[k])) for k in sorted(cats)))

    def to_json(self) -> dict:
        return {"numeric": list(self.numeric), "categorical": {k: list(v) for k, v in self.categorical}}

    @property
    def names(self) -> list[str]:
        return [*self.numeric, *(k for k, _ in self.categorical)]

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(v) for _, v in self.categorical)

    def slices(self) -> dict[str, slice]:
        """The feature columns of each variable."""
        out, i = {}, 0
        for name in self.numeric:
            out[name] = slice(i, i + 1)
            i += 1
        for name, cats in self.categorical:
            out[name] = slice(i, i + len(cats))
            i += len(cats)
        return out

    def features(self, values: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [F] float32, present [F] bool)`` of one study's values (a dict of name -> number or
        category; absent names, None, "", non-finite numbers and unknown categories are missing)."""
        x = torch.zeros(self.n_features)
        present = torch.zeros(self.n_features, dtype=torch.bool)
        values = values or {}
        sl = self.slices()
        for name in self.numeric:
            v = values.get(name)
            try:
                v = float(v) if v not in (None, "") and not isinstance(v, bool) else None
            except (TypeError, ValueError):
                v = None
            if v is not None and math.isfinite(v):
                x[sl[name].start] = v
                present[sl[name]] = True
        for name, cats in self.categorical:
            v = values.get(name)
            if v is not None and str(v) in cats:
                x[sl[name].start + cats.index(str(v))] = 1.0
                present[sl[name]] = True
        return x, present

    def decode(self, x: torch.Tensor, present: torch.Tensor) -> dict[str, float | str | None]:
        """The inverse of :meth:`features`: each variable's value (a number, a category, or None when
        missing) from ``x [F]`` and ``present [F]``."""
        out: dict[str, float | str | None] = {}
        sl = self.slices()
        for name in self.numeric:
            out[name] = float(x[sl[name].start]) if bool(present[sl[name]].any()) else None
        for name, cats in self.categorical:
            out[name] = cats[int(x[sl[name]].argmax())] if bool(present[sl[name]].any()) else None
        return out

    def problems(self, values: dict | None) -> list[str]:
        """What in `values` this spec cannot use: names it does not read, a numeric value that is not a
        finite number, a category it does not know (None and "" are missing values, not problems)."""
        out = [k for k in (values or {}) if k not in self.names]
        cats = dict(self.categorical)
        for k, v in (values or {}).items():
            if v in (None, ""):
                continue
            if k in cats and str(v) not in cats[k]:
                out.append(f"{k}={v!r} (not one of {list(cats[k])})")
            elif k in self.numeric:
                try:
                    ok = not isinstance(v, bool) and math.isfinite(float(v))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    out.append(f"{k}={v!r} (not a finite number)")
        return out


class VariablesEncoder(nn.Module):
    """``(x [B, F], present [B, F]) -> [B, d]``: standardise, zero the missing, MLP over ``[value, present]``."""

    def __init__(self, spec: VariableSpec, d: int, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        f = spec.n_features
        self.spec = spec
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.mlp = nn.Sequential(nn.Linear(2 * f, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d))

    @torch.no_grad()
    def fit_standardisation(self, x: torch.Tensor, present: torch.Tensor) -> None:
        """Mean and SD of each numeric feature over the present values of `x` ``[N, F]`` (the training
        split); categorical features stay unscaled (mean 0, SD 1)."""
        n_num = len(self.spec.numeric)
        for j in range(n_num):
            v = x[present[:, j], j].double()
            if len(v):
                self.mean[j] = float(v.mean())
                sd = float(v.std(unbiased=False)) if len(v) > 1 else 0.0
                self.std[j] = sd if sd > 1e-8 else 1.0

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        p = present.to(x.dtype)
        z = (x - self.mean) / self.std * p
        return self.mlp(torch.cat([z, p], dim=-1))
