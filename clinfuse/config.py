"""Typed configuration: YAML -> defaults -> overrides, validated before any work.

One small model per part of the system. Unknown keys are rejected with the key path and the keys
that are allowed; bad values with the key path and the allowed values.

Example:
    >>> cfg = load_config("configs/tiny.yaml", overrides=["cohort.split.seed=3"])
    >>> cfg.cohort.split.seed
    3
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Config",
    "ConfigError",
    "CohortConfig",
    "DicomConfig",
    "LabelConfig",
    "ReportConfig",
    "SplitConfig",
    "load_config",
    "dump_config",
]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, the key path and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DicomConfig(_Strict):
    """How DICOM files are read and which images of a study are used."""

    voi: Literal["none", "file", "window"] = Field(
        "none",
        description="Intensity mapping after the modality LUT: 'none' keeps modality units, "
        "'file' applies the file's VOI LUT or window, 'window' applies window_center/width. "
        "'file' and 'window' scale the result to [0, 1].",
    )
    window_center: float | None = Field(None, description="Window centre for voi='window'.")
    window_width: float | None = Field(None, gt=0, description="Window width for voi='window'.")
    channels: Literal[1, 3] = Field(
        1, description="1: colour images are converted to luminance; 3: grey images are repeated."
    )
    modalities: list[str] = Field(
        ["CR", "DX"], description="Modalities kept; series of other modalities are quarantined."
    )
    view_policy: Literal["frontal", "all"] = Field(
        "frontal",
        description="For 2D studies: 'frontal' keeps images whose ViewPosition is in "
        "frontal_views (all images when none states a view); 'all' keeps every image.",
    )
    frontal_views: list[str] = Field(["PA", "AP"], description="ViewPosition values counted as frontal.")
    verify_pixels: bool = Field(
        True,
        description="Decode every selected image during the build so that truncated or "
        "undecodable files are quarantined there, not during training.",
    )

    @model_validator(mode="after")
    def _window_needs_values(self) -> "DicomConfig":
        if self.voi == "window" and (self.window_center is None or self.window_width is None):
            raise ValueError("voi='window' needs window_center and window_width")
        return self


class ReportConfig(_Strict):
    """How report text is read and which sections the model sees."""

    key_column: str | None = Field(None, description="Key column; defaults to the cohort key name.")
    text_column: str = Field("report", description="Column holding the report text.")
    patient_column: str | None = Field(
        "PatientID", description="Patient identifier column, used when present (keeps report-only studies "
        "of one patient in one split); the DICOM PatientID wins when both exist."
    )
    sections: list[str] = Field(
        ["INDICATION", "COMPARISON", "FINDINGS", "IMPRESSION"],
        description="Section headings recognised in the text (case-insensitive, followed by ':').",
    )
    read_sections: list[str] = Field(
        ["INDICATION", "FINDINGS", "IMPRESSION"],
        description="Sections the model reads, in this order. Text with no heading counts as FINDINGS.",
    )
    deid_patterns: list[str] = Field(
        [r"X{3,}", r"\[\*\*[^\]]*\*\*\]", r"_{3,}", r"<[A-Z_]+>"],
        description="Regular expressions of de-identification tokens; each match becomes deid_token.",
    )
    deid_token: str = Field("XXXX", description="Replacement for every de-identification token.")
    encoding: str = Field("utf-8", description="Expected text encoding of report files.")
    fallback_encoding: str = Field(
        "cp1252", description="Tried when bytes are not valid in `encoding` (a warning is recorded)."
    )

    @model_validator(mode="after")
    def _read_subset(self) -> "ReportConfig":
        unknown = [s for s in self.read_sections if s.upper() not in {x.upper() for x in self.sections}]
        if unknown:
            raise ValueError(f"read_sections {unknown} are not in sections {self.sections}")
        return self


class LabelConfig(_Strict):
    """Where the labels are and what kind of task they make."""

    key_column: str | None = Field(None, description="Key column; defaults to the cohort key name.")
    task: Literal["binary", "multiclass", "multilabel"] = Field("binary", description="Kind of target.")
    columns: list[str] = Field(
        ["label"], min_length=1, description="Label columns: one for binary/multiclass, one per label for multilabel."
    )
    classes: list[str] | None = Field(
        None,
        description="Class names. multiclass: the allowed values of the label column (required). "
        "binary: optional names of the negative and positive class, in that order.",
    )
    patient_column: str | None = Field(
        "PatientID", description="Patient identifier column, used when present; the DICOM PatientID wins."
    )

    @model_validator(mode="after")
    def _shape(self) -> "LabelConfig":
        if self.task in ("binary", "multiclass") and len(self.columns) != 1:
            raise ValueError(f"task '{self.task}' takes exactly one label column, got {self.columns}")
        if self.task == "multiclass" and (not self.classes or len(self.classes) < 2):
            raise ValueError("task 'multiclass' needs `classes` with at least 2 names")
        if self.task == "binary" and self.classes is not None and len(self.classes) != 2:
            raise ValueError("task 'binary' takes `classes` of exactly 2 names (negative, positive)")
        return self

    @property
    def class_names(self) -> list[str]:
        """Names of the model outputs, in order."""
        if self.task == "multilabel":
            return list(self.columns)
        if self.task == "binary":
            return list(self.classes) if self.classes else ["negative", "positive"]
        return list(self.classes or [])


class SplitConfig(_Strict):
    """Patient-level, label-stratified, seeded splits."""

    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:.4g}")
        return self


class CohortConfig(_Strict):
    """Turning a hospital export into a cohort."""

    key: Literal["StudyInstanceUID", "AccessionNumber"] = Field(
        "StudyInstanceUID", description="The key joining images, reports and labels."
    )
    dicom: DicomConfig = DicomConfig()
    reports: ReportConfig = ReportConfig()
    labels: LabelConfig = LabelConfig()
    split: SplitConfig = SplitConfig()
    fingerprint: Literal["content", "header"] = Field(
        "content",
        description="'content' hashes every input byte; 'header' hashes the first 64 KiB of each DICOM "
        "file (its header) and its size: faster on very large archives, blind to pixel-only edits.",
    )
    dicom_extensions: list[str] = Field(
        [".dcm", ".dicom", ""],
        description="File name endings scanned as DICOM ('' means files without an extension).",
    )

    @field_validator("dicom_extensions")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [e.lower() for e in v]


class Config(_Strict):
    """The whole clinfuse configuration."""

    cohort: CohortConfig = CohortConfig()


# --------------------------------------------------------------------------- loading


def _field_names(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Allowed keys of the model found at `loc` (the parent of a rejected key)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        # unwrap Optional[...] / X | None
        args = [a for a in typing.get_args(current) if a is not type(None)]
        if args and not (isinstance(current, type) and issubclass(current, BaseModel)):
            current = args[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        path = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _field_names(Config, loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{source}: unknown key '{path}'{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {path}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def config_from_dict(data: dict | None, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    """Validate a plain dict (as read from YAML) plus `key.path=value` overrides."""
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides.

    Args:
        path: YAML file; its top-level keys are the sections of `Config`.
        overrides: strings like ``"cohort.split.seed=3"``; values are parsed as YAML.

    Raises:
        ConfigError: the file is missing or unreadable, or a key or value is not allowed.
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, source, overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written next to every output)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference() -> str:
    """Markdown reference of every configuration key (docs/configuration.md is this text)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `clinfuse/config.py` by `make docs-config`;",
        "a test fails when this page and the code disagree. Unknown keys are rejected with the key",
        "path and the allowed keys; bad values with the allowed values. Override any key on the",
        "command line with `--set key.path=value` (the value is read as YAML).",
        "",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        nested = []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((name, ann))
                continue
            default = f.default
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append(f"| `{prefix}{name}` | `{type_name}` | `{default!r}` | {f.description or ''} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", (model.__doc__ or "").strip(), "",
                          "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for name, sub in nested:
            walk(sub, f"{prefix}{name}.")

    walk(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference())
