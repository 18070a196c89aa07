"""Shared fixtures: the real data folder (skipped with a reason when absent) and small synthetic exports."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLINFUSE_SHARED", REPO.parent / "shared")) / "data"


def shared_dicom_dir() -> Path:
    d = SHARED / "dicom"
    if not (d / "index.csv").is_file():
        pytest.skip(f"real DICOM files not found at {d} (the ../shared checkout is absent); "
                    "set CLINFUSE_SHARED to its location to run these tests")
    return d


def shared_index() -> list[dict]:
    """Rows of ../shared/data/dicom/index.csv, or [] when absent (tests then skip)."""
    f = SHARED / "dicom" / "index.csv"
    if not f.is_file():
        return []
    with open(f, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def small_export(tmp_path_factory):
    """A 60-study synthetic export (binary) shared by read-only tests."""
    from clinfuse.data.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("export")
    synthesize(out, SynthSpec(studies=60, seed=3, size=48, lateral=0.3), progress=False)
    return out


@pytest.fixture(autouse=True, scope="session")
def _temporary_mlflow_store(tmp_path_factory):
    """Every test that trains through the CLI logs to a temporary SQLite store, never the working directory."""
    d = tmp_path_factory.mktemp("mlflow-default")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def synthetic_cohort(d: Path, name: str = "c", **spec) -> Path:
    """Synthesize an export under `d` and build its cohort; returns the cohort folder."""
    from clinfuse.data.cohort import build_cohort
    from clinfuse.data.synth import SynthSpec, synthesize

    exp = d / f"{name}-export"
    synthesize(exp, SynthSpec(**spec), progress=False)
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", d / name, progress=False)
    return d / name


def tiny_config(image_size=(32, 32), **sections):
    """configs/tiny.yaml at a small image size, with `sections` merged in (e.g. train={"epochs": 2})."""
    from clinfuse.config import config_from_dict, load_config

    data = load_config(REPO / "configs" / "tiny.yaml").model_dump(mode="json")
    data["data"]["image_size"] = list(image_size)
    data["tracking"]["system_metrics"] = False  # the MLflow test that checks them turns them back on
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    return config_from_dict(data)
