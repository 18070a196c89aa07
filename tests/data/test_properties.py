"""Property-based tests (hypothesis): for generated and mutated inputs, the readers and the config
loader give a result or clinfuse's own error with a reason, never anything else. Bounded in examples
so the default suite stays fast."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from clinfuse.config import ConfigError, load_config
from clinfuse.data.dicom import DicomReadError, check_dicom, dcmread_robust, read_dicom
from clinfuse.data.labels import load_labels
from clinfuse.data.quarantine import CohortInputError
from clinfuse.data.reports import load_reports
from clinfuse.errors import ClinfuseError

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    from clinfuse.data.synth import SynthSpec, synthesize

    d = tmp_path_factory.mktemp("prop")
    synthesize(d, SynthSpec(studies=2, seed=1, size=32, lateral=0, missing_image=0), progress=False)
    return next((d / "dicom").rglob("*.dcm")).read_bytes()


@SETTINGS
@given(data=st.data())
def test_read_dicom_on_mutated_files_gives_an_image_or_a_reason_and_check_dicom_agrees(seed_file, data):
    raw = bytearray(seed_file)
    for _ in range(data.draw(st.integers(0, 6), label="flips")):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))), label="truncate at")
    blob = bytes(raw if cut is None else raw[:cut])
    voi = data.draw(st.sampled_from(["none", "file"]))
    try:
        check_dicom("mutated.dcm", voi=voi, dataset=dcmread_robust("mutated.dcm", data=blob))
        cheap = None
    except DicomReadError as e:
        cheap = e.reason
    try:
        img = read_dicom("mutated.dcm", voi=voi, data=blob)
    except DicomReadError as e:
        assert e.reason and "mutated.dcm" in str(e)
        assert cheap == e.reason  # the build's check (clinfuse.data.studies) says what a full read would
    else:
        assert cheap is None
        assert img.pixels.ndim >= 3 and img.pixels.dtype.name == "float32"
        import numpy as np

        assert np.isfinite(img.pixels).all()


_cell = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@SETTINGS
@given(rows=st.lists(st.tuples(_cell, _cell), max_size=8), header=st.sampled_from(
    [("StudyInstanceUID", "report"), ("StudyInstanceUID", "text"), ("key", "report")]))
def test_report_csv_gives_reports_or_a_reason(tmp_path_factory, rows, header):
    from clinfuse.config import ReportConfig

    f = tmp_path_factory.mktemp("r") / "reports.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    f.write_text(buf.getvalue())
    try:
        t = load_reports(f, "StudyInstanceUID", ReportConfig())
    except CohortInputError as e:
        assert "column" in str(e)
    else:
        assert len(t.reports) + len(t.quarantine) <= t.n_records + len(t.quarantine)
        assert all(q.reason for q in t.quarantine)


@SETTINGS
@given(lines=st.lists(st.one_of(st.just("null"), st.just("[1]"), st.just("{}"), st.just("{bad json"),
                                st.builds(lambda k, v: '{"StudyInstanceUID": %s, "report": %s}' % (k, v),
                                          st.sampled_from(['"1"', '"2"', "3", "null"]),
                                          st.sampled_from(['"FINDINGS: clear."', '""', "5", "null", "[]"]))),
                      max_size=8))
def test_report_jsonl_gives_reports_or_a_reason(tmp_path_factory, lines):
    from clinfuse.config import ReportConfig

    f = tmp_path_factory.mktemp("j") / "reports.jsonl"
    f.write_text("\n".join(lines))
    try:
        t = load_reports(f, "StudyInstanceUID", ReportConfig())
    except CohortInputError as e:
        assert "no key" in str(e)
    else:
        assert all(q.reason for q in t.quarantine)


@SETTINGS
@given(rows=st.lists(st.tuples(_cell, _cell), max_size=8))
def test_labels_give_labels_or_a_reason(tmp_path_factory, rows):
    from clinfuse.config import LabelConfig

    f = tmp_path_factory.mktemp("l") / "labels.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["StudyInstanceUID", "label"])
    w.writerows(rows)
    f.write_text(buf.getvalue())
    t = load_labels(f, "StudyInstanceUID", LabelConfig())
    assert all(q.reason for q in t.quarantine)
    assert all(v in ([0], [1]) for v in t.labels.values())


_yaml_value = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                        st.text(max_size=10), st.lists(st.integers(-5, 5000), max_size=4))


@SETTINGS
@given(section=st.sampled_from(["data", "train", "model", "cohort", "loss", "eval", "nonsense"]),
       key=st.sampled_from(["image_size", "epochs", "batch_size", "lr_head", "image", "fusion", "key", "name",
                            "bootstrap", "threads", "x"]), value=_yaml_value)
def test_config_loader_gives_a_config_or_a_config_error(tmp_path_factory, section, key, value):
    import yaml

    f = tmp_path_factory.mktemp("c") / "c.yaml"
    f.write_text(yaml.safe_dump({section: {key: value}}))
    try:
        load_config(f)
    except ConfigError as e:
        assert str(e) and isinstance(e, ClinfuseError)
