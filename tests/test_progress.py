"""Long work says where it is in a log file: a bounded number of progress lines, the last one complete."""

from clinfuse.progress import progress


def test_progress_lines_in_a_log_are_bounded_and_end_complete(capsys):
    assert list(progress(range(1000), "scan DICOM", "file")) == list(range(1000))
    lines = capsys.readouterr().err.splitlines()  # stderr is not a terminal under pytest
    assert 1 < len(lines) <= 11 and lines[-1].startswith("scan DICOM: 1000/1000 file (100%)")
    assert list(progress(range(5), "x", "y", enabled=False)) == list(range(5))
    assert capsys.readouterr().err == ""
