"""The PHI guard on its own: variants, large texts, binary files."""

import time

import pytest
import torch

from clinfuse.tracking.phi import PhiError, PhiGuard

IDS = {"patient_name": ["KAZUMIR^VELTOR"], "patient_id": ["MRN12345678"], "birth_date": ["19650412"],
       "sop_uid": ["1.2.826.0.1.3680043.8.498.1234567"]}


def test_variants_and_case():
    g = PhiGuard(IDS)
    assert g.find("seen by Veltor Kazumir today") == "patient_name"
    assert g.find("KAZUMIR alone") == "patient_name"
    assert g.find("born 1965-04-12") == "birth_date" and g.find("dob 12/04/1965") == "birth_date"
    assert g.find("/export/mrn12345678/x.dcm") == "patient_id"
    assert g.find("1.2.826.0.1.3680043.8.498.1234567.dcm") == "sop_uid"
    assert g.find("nothing identifying, 0.19650 auroc") is None
    assert PhiGuard(None).find("KAZUMIR") is None


def test_large_text_is_screened_in_linear_time():
    g = PhiGuard({**IDS, "accession": [f"ACC{i:09d}" for i in range(5000)]})
    text = "lorem ipsum " * 200_000 + " acc000004999"
    t = time.perf_counter()
    assert g.find(text) == "accession"
    assert time.perf_counter() - t < 5.0


def test_binary_files_screen_their_headers(tmp_path):
    from safetensors.torch import save_file

    g = PhiGuard(IDS)
    save_file({"w": torch.zeros(1000)}, str(tmp_path / "clean.safetensors"), metadata={"note": "ok"})
    g.check_file(tmp_path / "clean.safetensors")
    save_file({"w": torch.zeros(10)}, str(tmp_path / "leak.safetensors"), metadata={"by": "Kazumir Veltor"})
    with pytest.raises(PhiError, match="patient_name"):
        g.check_file(tmp_path / "leak.safetensors")


def test_numeric_ids_match_whole_numbers_only():
    """Short numeric patient ids (NIH: 1 to 30805) must not fire inside parameter counts or timestamps."""
    g = PhiGuard({"patient_id": ["11172", "30805"]})
    assert g.find("parameters: 11172609") is None and g.find('"time": 1795330805.2') is None
    assert g.find("patient 11172 seen") == "patient_id"
    assert g.find("MRN11172") == "patient_id" and g.find("id=30805;") == "patient_id"
