"""The PACS loop against a real Orthanc on loopback (DICOMweb + basic auth), started and stopped here.

Slow marker: CI runs these (``scripts/test.sh`` installs Debian's orthanc and orthanc-dicomweb).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from clinfuse.cli import main

from .conftest import export_files, orthanc_or_skip
from .test_results import _reports, _roundtrip, _sr_items

pytestmark = pytest.mark.slow


def _local_studies(d) -> dict[str, list[str]]:
    by = defaultdict(list)
    for f in export_files(d):
        try:
            by[str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)].append(f)
        except Exception:  # noqa: BLE001 - the export's broken files on purpose
            pass
    return by


def _frontal(files) -> bool:
    return any(pydicom.dcmread(f, stop_before_pixels=True).get("ViewPosition") in ("PA", "AP") for f in files)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_wrong_access_is_one_line_and_writes_nothing(orthanc, pacs_model, tmp_path, monkeypatch, capsys):
    d, _ = pacs_model
    uid = sorted(_local_studies(d))[0]
    out = tmp_path / "pull"
    args = ["pacs", "pull", "--url", orthanc.url, "--study", uid, "--out", str(out), "--no-progress"]
    for var in ("CLINFUSE_PACS_USER", "CLINFUSE_PACS_PASSWORD", "CLINFUSE_PACS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert main(args) == 2
    assert "HTTP 401" in _one_line_error(capsys)
    monkeypatch.setenv("CLINFUSE_PACS_USER", orthanc.user)
    monkeypatch.setenv("CLINFUSE_PACS_PASSWORD", "not-" + orthanc.password)
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "refused the credentials" in err and orthanc.password not in err
    monkeypatch.setenv("CLINFUSE_PACS_PASSWORD", orthanc.password)
    from clinfuse.net import free_port

    assert main(["pacs", "pull", "--url", f"http://127.0.0.1:{free_port()}/dicom-web", "--study", uid,
                 "--out", str(out)]) == 2
    assert "cannot be reached" in _one_line_error(capsys)
    assert main(["pacs", "pull", "--url", orthanc.url, "--study", uid, "1.2.3.4.5.6.7", "--out", str(out)]) == 2
    assert "no study 1.2.3.4.5.6.7" in _one_line_error(capsys)
    assert main(["pacs", "pull", "--url", orthanc.url.replace("http://", f"http://{orthanc.user}:x@"), "--study", uid,
                 "--out", str(out)]) == 2
    assert "holds credentials" in _one_line_error(capsys)
    monkeypatch.setenv("CLINFUSE_PACS_TOKEN", "t")
    assert main(args) == 2
    assert "set one way of signing in" in _one_line_error(capsys)
    assert not out.exists()  # nothing half-written by any of these


def test_pull_resumes_to_the_same_files_and_builds_a_cohort(pacs_env, pacs_model, tmp_path):
    import requests

    from clinfuse.data.cohort import build_cohort, read_cohort
    from clinfuse.pacs import PacsClient, PacsError, pull

    d, _ = pacs_model
    uids = sorted(_local_studies(d))[:8]
    client = PacsClient(pacs_env.url)
    clean = pull(client, tmp_path / "a", studies=uids, progress=False)
    n = clean.retrieved
    assert n == sum(len(_local_studies(d)[u]) for u in uids) and clean.skipped == 0
    # the connection drops after 3 instances: 3 whole files, no partial one
    real, calls = client.client.retrieve_instance, []

    def flaky(*ref, **kw):
        calls.append(ref)
        if len(calls) > 3:
            raise requests.exceptions.ConnectionError("connection reset")
        return real(*ref, **kw)

    client.client.retrieve_instance = flaky
    with pytest.raises(PacsError, match="cannot be reached"):
        pull(client, tmp_path / "b", studies=uids, progress=False)
    assert len(_tree(tmp_path / "b")) == 3
    # a kill in the middle of a write leaves a hidden partial file: cleared, never taken for an instance
    some = next((tmp_path / "b").rglob("*.dcm"))
    (some.parent / f".{some.name}.999.partial").write_bytes(b"DICM half")
    client.client.retrieve_instance = real
    again = pull(client, tmp_path / "b", studies=uids, progress=False)
    assert (again.retrieved, again.skipped) == (n - 3, 3)
    assert _tree(tmp_path / "b") == _tree(tmp_path / "a")
    assert not list((tmp_path / "b").rglob("*.partial"))
    # the export is what `cohort build` reads, as it is
    s = build_cohort(tmp_path / "a", d / "c-export" / "reports.csv", d / "c-export" / "labels.csv",
                     tmp_path / "cohort", progress=False)
    rows, _ = read_cohort(tmp_path / "cohort")
    assert s.n_studies == len(rows) and sum(r["image_present"] for r in rows) == len(uids)  # the rest: report only
    # by date and modality: every study of the PACS is CR here
    found = PacsClient(pacs_env.url).find_studies(since="1900-01-01", modalities=["CR"])
    assert set(uids) <= set(found) and PacsClient(pacs_env.url).find_studies(modalities=["MR"]) == []


def _fhir_server():
    """A FHIR endpoint on loopback that records what is POSTed to /DiagnosticReport (201 Created)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posted: list[bytes] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = self.path == "/fhir/DiagnosticReport" and self.headers["Content-Type"] == "application/fhir+json"
            if ok:
                posted.append(body)
            self.send_response(201 if ok else 400)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}/fhir", posted


def test_pull_killed_and_rerun_ends_with_the_same_files(pacs_env, pacs_model, tmp_path):
    """SIGKILL in the middle of a real `clinfuse pacs pull` process, then the same command again."""
    import os
    import signal
    import subprocess
    import sys

    d, _ = pacs_model
    uids = sorted(_local_studies(d))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [sys.executable, "-m", "clinfuse.cli", "pacs", "pull", "--url", pacs_env.url, "--study", *uids,
           "--no-progress"]
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and sum(1 for _ in out.rglob("*.dcm")) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the pull finished before it could be killed"
    partial = _tree(out)
    assert 3 <= len(partial) < len(_tree(tmp_path / "clean"))
    for name, digest in partial.items():  # what a kill leaves is whole instances only
        assert _tree(tmp_path / "clean")[name] == digest
    subprocess.run(cmd + ["--out", str(out)], env=env, check=True, capture_output=True)
    assert _tree(out) == _tree(tmp_path / "clean")
    assert not list(out.rglob("*.partial"))


def _stored_results(orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    from clinfuse.pacs import PacsClient, PacsCredentials

    c = PacsClient(orthanc.url, PacsCredentials(orthanc.user, orthanc.password))
    out = {}
    for ref in c.instances(study_uid):
        ds = c.retrieve(*ref)
        if str(getattr(ds, "Manufacturer", "")) == "clinfuse":
            out[str(ds.Modality)] = ds
    return out


def test_pacs_run_files_sr_and_heatmap_into_each_study(pacs_env, pacs_model, tmp_path, capsys):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    from clinfuse.inference import Study

    d, model = pacs_model
    local, reports = _local_studies(d), _reports(d)
    with_report = [u for u in sorted(local) if u in reports and _frontal(local[u])][:2]
    without = [u for u in sorted(local) if u not in reports and _frontal(local[u])][:1]
    # one study gets an instance that does not decode (truncated pixel data), pushed into the PACS
    broken_study = with_report[0]
    bad = pydicom.dcmread(local[broken_study][0])
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 4]
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    assert pacs_env.upload([tmp_path / "bad.dcm"]) == 1
    studies = with_report + without
    fhir_server, posted = _fhir_server()
    mlflow_dir = tmp_path / "mlflow"
    uri = f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    mlflow_dir.mkdir()
    rc = main(["pacs", "run", "--model", str(model.dir), "--url", pacs_env.url, "--study", *studies,
               "--reports", str(d / "c-export" / "reports.csv"), "--out", str(tmp_path / "out"),
               "--tracking-uri", uri, "--no-progress", "--fhir-url", fhir_server])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    rows = {r["study"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert len(rows) == len(studies) and all(r["status"] == "ok" and r["stored"] == "1" and r["fhir_posted"] == "1"
                                             for r in rows.values())
    assert len(posted) == len(studies)  # one DiagnosticReport per study reached the FHIR server
    for body in posted:
        DiagnosticReport.model_validate(json.loads(body))
    pseud = {r["StudyInstanceUID"]: r["pseudonym"]
             for r in csv.DictReader(open(tmp_path / "out" / "private" / "studies.csv"))}
    name = model.output_names[0]
    for uid in studies:
        got = _stored_results(pacs_env, uid)
        assert set(got) == {"SR", "OT"}, uid  # the SR and the heatmap SC, as new series of the same study
        sr, sc = got["SR"], got["OT"]
        assert _roundtrip(sr)[1] == [] and _roundtrip(sc)[1] == []  # as stored by the PACS: no warning
        assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
        assert {sr.SeriesInstanceUID, sc.SeriesInstanceUID}.isdisjoint(
            {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in local[uid]})
        v = _sr_items(sr)
        ref = model.predict([Study(local[uid], reports.get(uid))])[0]
        assert v["Calibrated probability"][0] == pytest.approx(ref.probabilities[name], abs=1e-6)
        assert v["Decision at the operating point"] == ["Positive" if ref.decisions[name] else "Negative"]
        assert v["Modalities used"] == ["image, report" if uid in reports else "image"]
        assert v["Heatmap overlay"] == [str(sc.SOPInstanceUID)]
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == v["Source image"][0]
        assert str(sr.PatientID) == str(pydicom.dcmread(local[uid][0], stop_before_pixels=True).PatientID)
        assert len(v.get("Input not read", [])) == (1 if uid == broken_study else 0)
        fhir = json.loads((tmp_path / "out" / pseud[uid] / "fhir_diagnostic_report.json").read_text())
        rep = DiagnosticReport.model_validate(fhir)
        assert float(rep.contained[0].valueQuantity.value) == pytest.approx(ref.probabilities[name], abs=1e-6)
        assert int(rows[pseud[uid]]["instances_set_aside"]) == (1 if uid == broken_study else 0)
    # no identifier in the console, the MLflow store or its artifacts; the PACS password nowhere
    idents = {pacs_env.password}
    for uid in studies:
        for f in local[uid] + [tmp_path / "bad.dcm"]:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            idents |= {str(ds.PatientID), str(ds.AccessionNumber), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                       str(ds.SOPInstanceUID), str(ds.PatientBirthDate)}
            idents |= {p for p in str(ds.PatientName).split("^") if len(p) >= 5}
    console = printed.out + printed.err
    assert not [i for i in idents if i in console]
    files = [p for p in mlflow_dir.rglob("*") if p.is_file()]
    assert any(p.name == "results.csv" for p in files)
    blob = b"".join(p.read_bytes() for p in files)
    assert not [i for i in idents if i.encode() in blob]
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("clinfuse-pacs").experiment_id])[0]
    assert run.data.metrics["stored"] == len(studies) and run.data.metrics["instances_set_aside"] == 1
    test_pacs_run_files_sr_and_heatmap_into_each_study.done = (pacs_env, studies)


def test_a_refused_store_is_reported_and_the_local_copies_kept(pacs_model, tmp_path, monkeypatch, capsys):
    orthanc_or_skip()
    from clinfuse.pacs import LocalOrthanc

    d, model = pacs_model
    local = _local_studies(d)
    uid = next(u for u in sorted(local) if _frontal(local[u]))
    lua = tmp_path / "refuse.lua"  # this PACS answers the store with success and drops SR and SC (Orthanc's filter)
    lua.write_text('function ReceivedInstanceFilter(dicom, origin, info)\n'
                   '  if dicom.Modality == "SR" or dicom.Modality == "OT" then return false end\n'
                   '  return true\nend\n')
    with LocalOrthanc(lua=[str(lua)]) as o:
        o.upload(local[uid])
        monkeypatch.setenv("CLINFUSE_PACS_USER", o.user)
        monkeypatch.setenv("CLINFUSE_PACS_PASSWORD", o.password)
        rc = main(["pacs", "run", "--model", str(model.dir), "--url", o.url, "--study", uid, "--out",
                   str(tmp_path / "out"), "--no-mlflow", "--no-progress"])
        assert rc == 1
        out = capsys.readouterr().out
        assert "does not hold 2 of 2 instance(s)" in out and "local copies kept" in out
        row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
        assert row["status"] == "ok" and row["stored"] == "0" and "does not hold" in row["store_error"]
        kept = tmp_path / "out" / row["study"]
        assert (kept / "sr.dcm").is_file() and (kept / "heatmap_sc.dcm").is_file()
        assert pydicom.dcmread(kept / "sr.dcm").StudyInstanceUID == uid


def test_listen_predicts_a_study_pushed_by_the_pacs_and_sends_results_back(pacs_model, tmp_path):
    orthanc_or_skip()
    from clinfuse.inference import Study
    from clinfuse.pacs import LocalOrthanc
    from clinfuse.pacs.listen import DicomNode, StudyListener
    from clinfuse.net import free_port

    d, model = pacs_model
    local = _local_studies(d)
    uid = next(u for u in sorted(local) if _frontal(local[u]) and len(local[u]) >= 1)
    port = free_port()
    with LocalOrthanc(modalities={"clinfuse": ("CLINFUSE", "127.0.0.1", port)}) as o:
        o.upload(local[uid])
        oid = o.get("/studies")[0]
        node = DicomNode.parse(f"{o.aet}@127.0.0.1:{o.dicom_port}")
        with StudyListener(model, tmp_path / "out", port=port, quiet=1.0, send_to=node, log=lambda m: None) as li:
            job = o.request("POST", "/modalities/clinfuse/store", oid.encode(), "text/plain")  # Orthanc pushes (C-STORE)
            assert job["FailedInstancesCount"] == 0
            deadline = time.time() + 120
            while not li.results and time.time() < deadline:
                time.sleep(0.2)
        assert li.results and li.results[0].status == "ok" and li.results[0].stored, li.results
        row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
        assert row["study"] == li.results[0].pseudonym and row["stored"] == "1"
        got = _stored_results(o, uid)
        assert set(got) == {"SR", "OT"}
        ref = model.predict([Study(local[uid])])[0]
        name = model.output_names[0]
        assert _sr_items(got["SR"])["Calibrated probability"][0] == pytest.approx(ref.probabilities[name], abs=1e-6)


def test_orthanc_explorer_shows_the_new_series(pacs_env, tmp_path):
    from ..browser import Page, chromium_path

    done = getattr(test_pacs_run_files_sr_and_heatmap_into_each_study, "done", None)
    if done is None:
        pytest.skip("needs the results written by test_pacs_run_files_sr_and_heatmap_into_each_study")
    if chromium_path() is None:
        pytest.skip("chromium not installed (apt-get install chromium; scripts/test.sh installs it)")
    o, studies = done
    oid = o.request("POST", "/tools/lookup", studies[0].encode(), "text/plain")[0]["ID"]
    from base64 import b64encode

    page = Page()
    try:
        page.set_headers({"Authorization": "Basic " + b64encode(f"{o.user}:{o.password}".encode()).decode()})
        page.load(f"{o.rest}/app/explorer.html#study?uuid={oid}")
        text = page.wait_for("document.body.innerText.includes('clinfuse heatmap') && "
                             "document.body.innerText.includes('clinfuse result') && document.body.innerText", 60)
        page.screenshot(tmp_path / "orthanc-study.png")
    finally:
        page.close()
    assert "clinfuse result (decision support)" in text and "clinfuse heatmap (decision support)" in text


def test_pacs_run_reads_every_view_of_a_study_with_a_whole_study_model(pacs_env, tmp_path, capsys):
    """#13 through the PACS: a model with two image slots and a variables token reads both views of a study
    pulled from Orthanc; the SR holds Model.predict's number on the same two files (no variables in a PACS)."""
    from clinfuse.data.cohort import build_cohort
    from clinfuse.data.synth import SynthSpec, synthesize
    from clinfuse.inference import Model, Study
    from clinfuse.pipeline import train_and_audit

    from ..conftest import tiny_config

    exp = tmp_path / "export"
    synthesize(exp, SynthSpec(studies=80, seed=21, size=40, views=2, variables=2), progress=False)
    cfg = tiny_config(train={"epochs": 1, "batch_size": 16}, eval={"bootstrap": 0}, tracking={"enabled": False},
                      cohort={"dicom": {"voi": "file", "view_policy": "all"}})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "image": cfg.model.image.model_copy(update={"max_images": 2})})})
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", tmp_path / "c", config=cfg, progress=False,
                 variables=exp / "variables.csv")
    train_and_audit(tmp_path / "c", cfg, tmp_path / "run", progress=False, log=lambda m: None)
    model = Model.load(tmp_path / "run")
    by = defaultdict(list)
    for f in sorted((exp / "dicom").rglob("*.dcm")):
        by[str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)].append(str(f))
    with open(exp / "reports.csv", newline="") as fh:
        reports = {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(fh)}
    uid = next(u for u, fs in sorted(by.items()) if len(fs) == 2 and u in reports)
    assert pacs_env.upload(by[uid]) == 2
    rc = main(["pacs", "run", "--model", str(tmp_path / "run"), "--url", pacs_env.url, "--study", uid,
               "--reports", str(exp / "reports.csv"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert row["status"] == "ok" and row["instances_set_aside"] == "0"
    v = _sr_items(_stored_results(pacs_env, uid)["SR"])
    both = model.predict([Study(by[uid], reports[uid], "both", None)])[0]
    assert both.ok and len(both.image_weights) == 2 and min(both.image_weights) > 0  # both views read
    name = model.output_names[0]
    assert v["Calibrated probability"][0] == pytest.approx(both.probabilities[name], abs=1e-6)
    assert v["Modalities used"] == ["image, report"]
    # one "Image read by the model" entry per slot: the instance and its attention weight
    assert v["Attention weight of this image"] == pytest.approx(both.image_weights, abs=1e-6)
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in by[uid]}
    assert sops <= set(v["Source image"])
