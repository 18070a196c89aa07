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
    assert g.find("series 1.2.826.0.1.3680043.8.498.1234567.2 of") == "sop_uid"  # a UID below it
    assert g.find("9.1.2.826.0.1.3680043.8.498.1234567") == "sop_uid"
    assert g.find("1.2.826.0.1.3680043.8.498.12345670") is None  # another UID: a digit touches it
    assert g.redact("uid 1.2.826.0.1.3680043.8.498.1234567, ok") == ("uid [ID], ok", 1)
    assert g.find("nothing identifying, 0.19650 auroc") is None
    assert PhiGuard(None).find("KAZUMIR") is None
    # a dotted value under the 5-character floor is not screened, as no short value is
    assert PhiGuard({"study_uid": ["1.2"]}).find("transfer syntax 1.2.840.10008.1.2") is None


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
    """One pass over each of the three views of the text (as is, normalised, words only); Python-level
    work only per real occurrence, however many identifiers
    share the prefix of a near miss (the prefix index it replaced ran one substring search over the
    whole text per identifier under a matching prefix: 5,000 searches here)."""
    g = _shared_prefix_guard(n_ids)
    counter = g._automaton = _CountingAutomaton(g._automaton)
    near_misses = " ".join(f"acc{i:09d}x1" for i in range(n_ids, n_ids + 200))  # acc00.. but not an id
    text = ("lorem ipsum acc00 " * 2000) + near_misses + " accession 123"
    assert g.find(text) is None
    assert counter.passes == 3 and counter.reported == 0
    # a real identifier at the end is found in the first view with exactly one reported occurrence
    assert g.find(text + f" ACC{n_ids - 1:09d}") == "accession"
    assert counter.passes == 4 and counter.reported == 1


def _reference_hits(guard: PhiGuard, text: str) -> list[str]:
    """The rule stated plainly (every identifier, one regex each, over each view): the oracle for the automaton."""
    import re

    from clinfuse.phi import _UID_LIKE, _normal, _words

    def numeric_in(ident, view):
        for m in re.finditer(rf"(?=(?<!\d){re.escape(ident)}(?!\d))", view):
            s, e = m.start(), m.start() + len(ident)
            run = (re.search(r"[0-9a-f]*$", view[:s]).group() + ident + re.match(r"[0-9a-f]*", view[e:]).group())
            if len(run) < 32 or run.isdigit():  # else: part of a hexadecimal digest
                return True
        return False

    low = text.lower()
    hits = []
    for view in (low, _normal(low), _words(low)):
        hits += [ident for ident in guard.kind_of
                 if (numeric_in(ident, view) if ident.isdigit()
                     # a UID: where no digit touches it, and only as typed (dots are not in the other views)
                     else view is low and re.search(rf"(?<!\d){re.escape(ident)}(?!\d)", view) if _UID_LIKE.fullmatch(ident)
                     else ident in view)]
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


def test_evasive_forms_are_found():
    """The forms a hostile tester typed into report text and that got past the guard before."""
    g = PhiGuard({"patient_name": ["KIM^MIN", "KAZUMIR^VELTOR"], "patient_id": ["MRN44363330"],
                  "accession": ["ACC131796237"], "birth_date": ["20020525"]})
    assert g.find("patient mrn 44363330 seen") == "patient_id"
    assert g.find("accession no. 131796237") == "accession"
    assert g.find("born 25.05.2002") == "birth_date" and g.find("dob 2002/05/25") == "birth_date"
    assert g.find("seen by Min Kim today") == "patient_name" and g.find("KIM, MIN") == "patient_name"
    # split over HTML spans or JSON items, as explanations write words
    assert g.find('<span title="+0.1">Min</span> <span title="-0.2">Kim</span>') == "patient_name"
    assert g.find('{"words": [["min", 0.31], ["kim", -0.12]]}') == "patient_name"
    assert g.find('[["mrn", 0.1], ["44363330", 0.2]]') == "patient_id"
    # and nothing where there is nothing
    assert g.find("minimal kimchi; 1443633301 parameters; 2002-05-26") is None
    assert g.find('{"words": [["mild", 0.3], ["opacity", 0.1]], "auroc": 0.131796}') is None


def test_binary_payloads_are_not_read_as_text_but_their_metadata_is(tmp_path):
    import base64

    from PIL import Image, PngImagePlugin

    g = PhiGuard({"patient_name": ["ZUTOR^ALBAN"]})
    # a base64 image that happens to spell a name part is data, not text
    page = '<img src="data:image/png;base64,' + base64.b64encode(b"\x00" * 30).decode() + 'zutor0nbz7xy==">'
    assert g.find(page) is None and g.find(page + " seen by Zutor") == "patient_name"
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Author", "Alban Zutor")
    Image.new("L", (8, 8)).save(tmp_path / "leak.png", pnginfo=meta)
    with pytest.raises(PhiError, match="patient_name"):
        g.check_file(tmp_path / "leak.png")
    Image.new("L", (8, 8)).save(tmp_path / "clean.png")
    g.check_file(tmp_path / "clean.png")


def test_a_cohort_without_its_identifier_list_is_refused(tmp_path):
    with pytest.raises(PhiError, match="no private/identifiers.json"):
        PhiGuard.from_cohort(tmp_path)


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


def test_digits_inside_a_checksum_are_not_an_identifier():
    """A cohort.json lists the SHA-256 of its files; 'f00292f' inside one is not accession CN00292 (a covid-notes
    study run stopped on exactly that). Typed forms next to a short hex word still count."""
    g = PhiGuard({"accession": ["CN00292"], "patient_id": ["MRN44363330"]})
    digest = "a8b8d07d29ff001b4d047d4a4ab157386f386bab9f00292fb9feac2512f51d03"
    assert g.find(f'"cohort.csv": "{digest}"') is None
    assert g.find("md5 0123456789abcdef00292abcdef01234") is None  # 32 hex digits
    assert g.find("acc 00292 and cafe00292") == "accession"  # 'cafe00292' is too short to be a digest
    assert g.find("ref ab00292cdef then x") == "accession"
    assert g.find("MRN44363330") == "patient_id"
    assert g.redact(f"{digest} / acc 00292")[0] == f"{digest} / acc [ID]"
