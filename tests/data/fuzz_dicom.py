"""Coverage-guided fuzzing of the DICOM reader (atheris / libFuzzer).

Run by tests/data/test_fuzz.py (slow marker, CI) for a bounded time with a corpus seeded from
../shared/data/dicom; by hand:

    .venv/bin/python tests/data/fuzz_dicom.py CORPUS_DIR -max_total_time=600

The only outcomes allowed for any input are a result or clinfuse's own error with a reason
(``ClinfuseError``); anything else is a crash, and libFuzzer writes the input to ``crash-*``. A crash
input, once fixed, goes into tests/data/fuzz_regressions/ (test_fuzz.py replays every file there).
"""

import sys

import atheris

with atheris.instrument_imports(include=["clinfuse", "pydicom"]):
    from clinfuse.data.dicom import dcmread_robust, read_dicom
    from clinfuse.errors import ClinfuseError


def one_input(data: bytes) -> None:
    for voi in ("none", "file"):
        try:
            read_dicom("<fuzz>", data=data, voi=voi)
        except ClinfuseError:
            pass
    try:
        dcmread_robust("<fuzz>", stop_before_pixels=True, data=data)
    except ClinfuseError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
