"""The served model on a real `mlflow models serve` (loopback, started from a fresh process): DICOM +
report in, the same numbers as Model.predict out; bad requests get a one-line 4xx and the server goes on."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pandas as pd
import pydicom
import pytest

from clinfuse.pipeline import train_and_audit

from ..conftest import synthetic_cohort, tiny_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(d, uri: str, name: str, version) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` of a registered version, from a fresh process; (process, base URL) once /ping answers."""
    port = _free_port()
    # the store of this test only (the parent's MLflow calls leave MLFLOW_* variables set); the venv's bin on
    # PATH, since the scoring server is started as `uvicorn` from it
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_REGISTRY_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(base + "/ping", timeout=2).status == 200:
                return proc, base
        except OSError:
            time.sleep(1)
    proc.terminate()
    pytest.fail("mlflow models serve did not answer /ping in 120 s: " + (d / "server.log").read_text()[-2000:])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    synthetic_cohort(d, studies=90, seed=12, size=40, lateral=0)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cfg = tiny_config(train={"epochs": 2, "batch_size": 16}, eval={"bootstrap": 0},
                      tracking={"tracking_uri": uri, "experiment": "serve", "register_as": "serve-test",
                                "system_metrics": False})
    run = train_and_audit(d / "c", cfg, d / "run", progress=False, log=lambda m: None)
    proc, base = _serve(d, uri, "serve-test", run.model["version"])
    yield d, base
    proc.terminate()
    proc.wait(timeout=30)


def _post(base: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"message": text}


def _files(d, n=3):
    return [f for f in sorted((d / "c-export" / "dicom").rglob("*.dcm")) if "broken" not in f.name][:n]


def _b64(f) -> str:
    return base64.b64encode(f.read_bytes() if hasattr(f, "read_bytes") else f).decode()


def test_served_model_gives_model_predict_numbers(served):
    from clinfuse.inference import Model

    d, base = served
    model = Model.load(d / "run")
    f = _files(d)
    studies = [{"study_id": "one", "dicom": [_b64(f[0])], "report": "FINDINGS: opacity in the right lower lobe."},
               {"study_id": "img", "dicom": [_b64(f[1])]},
               {"study_id": "rep", "report": "FINDINGS: clear lungs. IMPRESSION: normal."},
               {"study_id": "two", "dicom": [_b64(f[2])], "report": "INDICATION: cough."}]
    want = model.predict([{"study_id": s["study_id"], "images": [base64.b64decode(x) for x in s.get("dicom", [])],
                           "report": s.get("report")} for s in studies]).to_frame().set_index("study_id")
    for batch in ([studies[0]], studies, [studies[1]], [studies[2]]):
        code, body = _post(base, {"dataframe_records": batch})
        assert code == 200, body
        got = pd.DataFrame(body["predictions"]).set_index("study_id")
        for sid in got.index:
            assert got.loc[sid, "status"] == "ok"
            for col in ("p_positive", "w_image", "w_report"):
                assert got.loc[sid, col] == pytest.approx(want.loc[sid, col], abs=1e-6), (sid, col)
            assert got.loc[sid, "pred_positive"] == want.loc[sid, "pred_positive"]


def test_bad_requests_get_one_line_4xx_and_the_server_goes_on(served, tmp_path):
    d, base = served
    f = _files(d)[0]
    ds = pydicom.dcmread(f)
    ds.RescaleSlope, ds.RescaleIntercept = "1e39", "0"
    ds.save_as(tmp_path / "inf.dcm")
    cases = {
        "not DICOM": {"dataframe_records": [{"dicom": [_b64(b"hello, this is no DICOM file" * 20)]}]},
        "truncated DICOM": {"dataframe_records": [{"dicom": [_b64(f.read_bytes()[:3000])]}]},
        "non-finite image": {"dataframe_records": [{"dicom": [_b64(tmp_path / "inf.dcm")]}]},
        "missing columns": {"dataframe_records": [{"study_id": "x"}]},
        "20 MB report": {"dataframe_records": [{"report": "FINDINGS: " + "clear " * 3_500_000}]},
        "not base64": {"dataframe_records": [{"dicom": ["@@@ not base64 @@@"]}]},
    }
    for name, body in cases.items():
        code, answer = _post(base, body)
        assert 400 <= code < 500, (name, code)
        msg = answer.get("message", "")
        assert msg and "\n" not in msg and len(msg) < 2500, (name, msg[:300])
        assert "Traceback" not in json.dumps(answer) and "stack_trace" not in answer, name
        assert "clear clear clear" not in msg and "aGVsbG8" not in msg, f"{name}: the request is echoed back"
    code, body = _post(base, {"dataframe_records": [{"report": "FINDINGS: clear."}]})
    assert code == 200 and body["predictions"][0]["status"] == "ok"


@pytest.fixture(scope="module")
def served_study_model(tmp_path_factory):
    """A whole-study model (frontal + lateral image tokens, a variables token), registered and served."""
    from clinfuse.data.cohort import build_cohort
    from clinfuse.data.synth import SynthSpec, synthesize

    d = tmp_path_factory.mktemp("serve-study")
    exp = d / "export"
    synthesize(exp, SynthSpec(studies=100, seed=11, size=40, views=2, variables=3), progress=False)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cfg = tiny_config(train={"epochs": 2, "batch_size": 16}, eval={"bootstrap": 0},
                      cohort={"dicom": {"voi": "file", "view_policy": "all"}},
                      tracking={"tracking_uri": uri, "experiment": "serve-study", "register_as": "serve-study",
                                "system_metrics": False})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "image": cfg.model.image.model_copy(update={"max_images": 2})})})
    build_cohort(exp / "dicom", exp / "reports.csv", exp / "labels.csv", d / "c", config=cfg, progress=False,
                 variables=exp / "variables.csv")
    run = train_and_audit(d / "c", cfg, d / "run", progress=False, log=lambda m: None)
    proc, base = _serve(d, uri, "serve-study", run.model["version"])
    yield d, exp, base
    proc.terminate()
    proc.wait(timeout=30)


def test_served_whole_study_model_takes_two_views_and_variables(served_study_model):
    """#13 through the real server: two DICOM files and a JSON object of variables per study give
    Model.predict's numbers, per image slot and per group; a bad variables cell is that study's error."""
    from clinfuse.inference import Model, Study

    d, exp, base = served_study_model
    model = Model.load(d / "run")
    by_study: dict[str, list] = {}
    for p in sorted((exp / "dicom").rglob("*.dcm")):
        by_study.setdefault(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID, []).append(p)
    files = next(v for v in by_study.values() if len(v) == 2)
    values = {"crp": 80, "wbc": 14.5, "sex": "F"}
    studies = [{"study_id": "both-views", "dicom": [_b64(f) for f in files], "variables": json.dumps(values),
                "report": "FINDINGS: patchy opacity."},
               {"study_id": "frontal-only", "dicom": [_b64(files[0])], "variables": json.dumps(values)},
               {"study_id": "no-variables", "dicom": [_b64(f) for f in files]},
               {"study_id": "bad", "dicom": [_b64(files[0])], "variables": json.dumps({"crp": "high"})}]
    want = model.predict([Study(files, "FINDINGS: patchy opacity.", "both-views", values),
                          Study(files[:1], None, "frontal-only", values), Study(files, None, "no-variables")])
    code, body = _post(base, {"dataframe_records": studies})
    assert code == 200, body
    got = pd.DataFrame(body["predictions"]).set_index("study_id")
    assert list(got["status"]) == ["ok", "ok", "ok", "error"]
    assert "crp='high' (not a finite number)" in got.loc["bad", "reason"]
    for w in want:
        row = got.loc[w.study_id]
        assert row["p_positive"] == pytest.approx(w.probabilities["positive"], abs=1e-6)
        for g in ("image", "report", "variables"):
            assert row[f"w_{g}"] == pytest.approx(w.modality_weights[g], abs=1e-6), (w.study_id, g)
    assert got.loc["both-views", "w_variables"] > 0 and got.loc["no-variables", "w_variables"] == 0
