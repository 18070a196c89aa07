"""Fixtures of the PACS tests: a tiny trained model over a synthetic export, and a real Orthanc on loopback."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from ..conftest import synthetic_cohort, tiny_config


def _need_pacs_extra():
    for mod in ("highdicom", "dicomweb_client", "pynetdicom", "fhir.resources"):
        pytest.importorskip(mod, reason=f"{mod} missing: pip install 'clinfuse[pacs]' (scripts/setup.sh installs it)")


@pytest.fixture(scope="session")
def pacs_model(tmp_path_factory):
    """(work folder, Model): 60 synthetic studies, the tiny config trained one epoch."""
    _need_pacs_extra()
    from clinfuse.inference import Model
    from clinfuse.pipeline import train_and_audit

    d = tmp_path_factory.mktemp("pacs-model")
    synthetic_cohort(d, studies=60, seed=5, size=48, lateral=0.3)
    train_and_audit(d / "c", tiny_config(train={"epochs": 1, "batch_size": 16}, eval={"bootstrap": 0},
                                         tracking={"enabled": False}), d / "run", progress=False, log=lambda m: None)
    return d, Model.load(d / "run")


def export_files(d: Path) -> list[str]:
    return sorted(glob.glob(str(d / "c-export" / "dicom" / "**" / "*.dcm"), recursive=True))


def orthanc_or_skip():
    from clinfuse.pacs.orthanc import orthanc_binary

    if orthanc_binary() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                    "scripts/test.sh installs them where apt-get is available)")


@pytest.fixture(scope="module")
def orthanc(pacs_model):
    """A real Orthanc on loopback (DICOMweb, basic auth) holding the synthetic export."""
    orthanc_or_skip()
    from clinfuse.pacs import LocalOrthanc

    d, _ = pacs_model
    with LocalOrthanc() as o:
        o.stored = o.upload(export_files(d))
        yield o


@pytest.fixture
def pacs_env(orthanc, monkeypatch):
    """The test Orthanc's credentials in the environment, as a hospital would set them."""
    monkeypatch.setenv("CLINFUSE_PACS_USER", orthanc.user)
    monkeypatch.setenv("CLINFUSE_PACS_PASSWORD", orthanc.password)
    monkeypatch.delenv("CLINFUSE_PACS_TOKEN", raising=False)
    return orthanc
