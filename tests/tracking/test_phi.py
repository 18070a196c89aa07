"""The PHI guard on its own: variants, large texts, binary files."""

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


class _CountingAutomaton:
    """Wraps the guard's automaton to count passes over the text and the occurrences it reports."""

    def __init__(self, inner):
        self.inner, self.passes, self.reported = inner, 0, 0

    def iter(self, text):
        self.passes += 1
        for hit in self.inner.iter(text):
            self.reported += 1
            yield hit


def _shared_prefix_guard(n: int) -> PhiGuard:
    return PhiGuard({**IDS, "accession": [f"ACC{i:09d}" for i in range(n)]})


@pytest.mark.parametrize("n_ids", [50, 5000, 50000])
def test_screening_work_does_not_grow_with_the_number_of_identifiers(n_ids):
    """One pass over the text; Python-level work only per real occurrence, however many identifiers
    share the prefix of a near miss (the prefix index it replaced ran one substring search over the
    whole text per identifier under a matching prefix: 5,000 searches here)."""
    g = _shared_prefix_guard(n_ids)
    counter = g._automaton = _CountingAutomaton(g._automaton)
    near_misses = " ".join(f"acc{i:09d}x1" for i in range(n_ids, n_ids + 200))  # acc00.. but not an id
    text = ("lorem ipsum acc00 " * 2000) + near_misses + " accession 123"
    assert g.find(text) is None
    assert counter.passes == 1 and counter.reported == 0
    # a real identifier at the end is found with exactly one reported occurrence
    assert g.find(text + f" ACC{n_ids - 1:09d}") == "accession"
    assert counter.passes == 2 and counter.reported == 1


def _reference_hits(guard: PhiGuard, text: str) -> list[str]:
    """The rule stated plainly (every identifier, one regex each): the oracle for the automaton."""
    import re

    low = text.lower()
    hits = [ident for ident in guard.kind_of
            if (re.search(rf"(?<!\d){re.escape(ident)}(?!\d)", low) if ident.isdigit() else ident in low)]
    return hits


from hypothesis import given, settings, strategies as st  # noqa: E402

_alphabet = st.sampled_from(list("0123456789abcAB^ -./"))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ids=st.lists(st.text(_alphabet, min_size=5, max_size=9), min_size=1, max_size=6),
       text=st.lists(st.one_of(st.text(_alphabet, max_size=12), st.integers(0, 5)), max_size=10))
def test_automaton_agrees_with_the_plain_rule(ids, text):
    """Case-insensitive substring match; a numeric identifier only where no digit touches it."""
    g = PhiGuard({"accession": ids})
    # build texts that embed identifiers (by index) between random fragments
    s = "".join(ids[x % len(ids)] if isinstance(x, int) else x for x in text)
    hits = _reference_hits(g, s)
    assert (g.find(s) is not None) == bool(hits), (ids, s)


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
