"""The MLflow audit trail in a temporary SQLite store: round trip, registry, reload, and the PHI scan."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import numpy as np
import pandas as pd
import pytest

from clinfuse.pipeline import train_and_audit
from clinfuse.tracking.phi import PhiError, PhiGuard

from ..conftest import synthetic_cohort, tiny_config


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    synthetic_cohort(d, studies=90, seed=8, size=40, corrupt=4)
    uri = f"sqlite:///{d / 'store' / 'mlflow.db'}"
    (d / "store").mkdir()
    cfg = tiny_config(train={"epochs": 2, "batch_size": 16}, eval={"bootstrap": 20},
                      tracking={"tracking_uri": uri, "experiment": "test-exp", "register_as": "cxr-test",
                                "system_metrics": True, "system_metrics_interval": 1.0})
    lines = []
    run = train_and_audit(d / "c", cfg, d / "run", progress=False, log=lines.append)
    return d, run, uri, lines


def test_run_holds_params_metrics_tags_dataset_and_artifacts(audited):
    from mlflow import MlflowClient

    d, run, uri, lines = audited
    c = MlflowClient(tracking_uri=uri)
    r = c.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["train.epochs"] == "2" and r.data.params["model.fusion.kind"] == "attention"
    assert {"train_loss", "val_auroc", "lr_text", "test_auroc", "test_ece", "test_both_auroc", "temperature",
            "test_image_hidden_auroc", "test_report_hidden_auroc"} <= set(r.data.metrics)
    assert len(c.get_metric_history(run.run_id, "train_loss")) == 2
    assert any(k.startswith("system/") for k in r.data.metrics), "system metrics were sampled"
    assert r.data.tags["version.torch"] and r.data.tags["device"] == "cpu"
    ds = r.inputs.dataset_inputs[0].dataset
    info = json.loads((d / "c/cohort.json").read_text())
    assert ds.digest == info["fingerprint"]["sha256"][:32] and json.loads(ds.profile)["studies"] == 90
    arts = {a.path for a in c.list_artifacts(run.run_id)} | {a.path for a in c.list_artifacts(run.run_id, "evaluation")} \
        | {a.path for a in c.list_artifacts(run.run_id, "evaluation/plots")} | {a.path for a in c.list_artifacts(run.run_id, "cohort")}
    assert {"config.yaml", "cohort/cohort.json", "evaluation/metrics.json", "evaluation/plots/roc_pr.png",
            "evaluation/plots/reliability.png"} <= arts
    assert any("mlflow: run" in line for line in lines)


def _request_studies(d, n_images: int = 3):
    """DICOM files of the export as bytes, with and without reports, in the served model's columns."""
    files = [f for f in sorted((d / "c-export" / "dicom").rglob("*.dcm")) if "broken" not in f.name][:n_images]
    return pd.DataFrame({"study_id": ["both", "report-only", "image-only", "both-2"],
                         "dicom": [[files[0].read_bytes()], [], [files[1].read_bytes()], [files[2].read_bytes()]],
                         "report": ["INDICATION: fever, concern for pneumonia.", "FINDINGS: heart size is normal.", None,
                                    "FINDINGS: opacity in the right lower lobe."]})


def test_registered_model_reloads_in_a_fresh_process_with_identical_predictions(audited, tmp_path):
    """The registered pyfunc takes DICOM bytes and report text and gives what Model.predict gives."""
    from clinfuse.inference import Model

    d, run, uri, _ = audited
    assert run.model["registered_name"] == "cxr-test" and str(run.model["version"]) == "1"
    df = _request_studies(d)
    df.to_pickle(tmp_path / "in.pkl")
    model = Model.load(d / "run")
    expected = model.predict([{"study_id": r.study_id, "images": list(r.dicom), "report": r.report}
                              for r in df.itertuples()]).to_frame()
    assert (expected["status"] == "ok").all()
    code = (
        "import sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})\n"
        "m = mlflow.pyfunc.load_model('models:/cxr-test/1')\n"
        f"m.predict(pd.read_pickle({str(tmp_path / 'in.pkl')!r})).to_pickle({str(tmp_path / 'out.pkl')!r})\n"
    )
    # a fresh process, outside the repo: nothing of this process's state is reused
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = pd.read_pickle(tmp_path / "out.pkl")
    pd.testing.assert_frame_equal(got, expected, atol=1e-6, rtol=0)
    assert got.loc[1, "w_image"] == 0 and got.loc[2, "w_report"] == 0
    # a models:/ reference loads the same model object, with its version and run
    m2 = Model.load("models:/cxr-test/1", tracking_uri=uri)
    assert m2.version == "1" and m2.run_id == run.run_id and m2.output_names == model.output_names
    from mlflow import MlflowClient

    MlflowClient(uri, registry_uri=uri).set_registered_model_alias("cxr-test", "champion", "1")
    m3 = Model.load("models:/cxr-test@champion", tracking_uri=uri)
    assert m3.version == "1" and m3.thresholds == model.thresholds
    m4 = Model.load(f"runs:/{run.run_id}/model", tracking_uri=uri)
    assert m4.run_id == run.run_id and m4.thresholds == model.thresholds


def test_no_identifier_anywhere_in_the_store(audited):
    d, run, uri, _ = audited
    ids = json.loads((d / "c/private/identifiers.json").read_text())
    assert ids["patient_name"] and ids["birth_date"] and ids["sop_uid"] and ids["accession"]
    guard = PhiGuard(ids)
    store = d / "store"
    files = [f for f in store.rglob("*") if f.is_file()]
    assert any(f.name == "mlflow.db" for f in files) and len(files) > 20
    for f in files:
        text = f.read_bytes().decode("latin-1")
        assert guard.find(text) is None, f"identifier of kind {guard.find(text)} found in {f.relative_to(store)}"
        for values in ids.values():  # and the raw values themselves, not only the guard's view of them
            for v in values:
                assert v not in text, f.relative_to(store)


def test_guard_refuses_planted_identifiers_without_echoing_them(audited, tmp_path):
    from clinfuse.tracking.mlflow_tracker import MlflowTracker

    d, run, uri, _ = audited
    ids = json.loads((d / "c/private/identifiers.json").read_text())
    name = ids["patient_name"][0]
    t = MlflowTracker(f"sqlite:///{tmp_path / 'x.db'}", "guarded", PhiGuard(ids), system_metrics=False)
    with pytest.raises(PhiError) as e:
        t.log_params({"note": f"seen by {name.replace('^', ' ')}"})
    assert "patient_name" in str(e.value) and name not in str(e.value) and name.split("^")[0] not in str(e.value)
    f = tmp_path / "leak.json"
    f.write_text(json.dumps({"dob": ids["birth_date"][0]}))
    with pytest.raises(PhiError, match="birth_date"):
        t.log_artifact(f)
    with pytest.raises(PhiError, match="sop_uid"):
        t.set_tags({"source": ids["sop_uid"][0]})
    t.close()


def test_a_run_shorter_than_one_sampling_interval_still_shows_its_machine(tmp_path):
    from mlflow import MlflowClient

    from clinfuse.tracking.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'short.db'}"
    t = MlflowTracker(uri, "short", system_metrics=True, interval=60.0)
    t.log_metrics({"loss": 1.0}, step=0)
    t.close()
    keys = set(MlflowClient(tracking_uri=uri).get_run(t.run_id).data.metrics)
    assert "loss" in keys and any(k.startswith("system/cpu") for k in keys), keys


def test_unreachable_server_is_one_line_before_any_training(audited, tmp_path):
    from clinfuse.errors import ClinfuseError

    d, *_ = audited
    cfg = tiny_config(train={"epochs": 1, "batch_size": 16}, tracking={"tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(ClinfuseError, match="unreachable.*--no-mlflow") as e:
        train_and_audit(d / "c", cfg, tmp_path / "r", progress=False, log=lambda m: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r" / "state.pt").exists() and not (tmp_path / "r" / "best").exists()


@pytest.mark.slow
def test_ui_serves_the_store(audited):
    from clinfuse.tracking.mlflow_tracker import start_ui

    d, run, uri, _ = audited
    p = start_ui(uri, _free_port())
    try:
        port = p.args[p.args.index("--port") + 1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get?run_id={run.run_id}",
                                      timeout=10).read().decode()
        assert "test_auroc" in body
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_evaluate_a_registered_model_by_uri(audited, tmp_path, capsys):
    from clinfuse.cli import main

    d, run, uri, _ = audited
    rc = main(["evaluate", "--model", "models:/cxr-test/1", "--tracking-uri", uri, "--cohort", str(d / "c"),
               "--out", str(tmp_path / "ev"), "--bootstrap", "10"])
    assert rc == 2 or rc == 0
    out = capsys.readouterr()
    assert rc == 0, out.err
    direct = json.loads((d / "run/eval-test/metrics.json").read_text())
    via_uri = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert via_uri["overall"]["per_output"]["positive"]["auroc"] == direct["overall"]["per_output"]["positive"]["auroc"]
    assert main(["evaluate", "--model", "not-a-dir", "--cohort", str(d / "c")]) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_audit_path_in_a_real_browser(audited, tmp_path):
    """mlflow ui on the run's store, opened in headless Chromium: metrics and explanation artifacts are listed."""
    from clinfuse.pipeline import explain_and_log
    from clinfuse.tracking.mlflow_tracker import start_ui

    from ..browser import Page, chromium_path

    if chromium_path() is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium when apt-get works)")
    d, run, uri, _ = audited
    explain_and_log(str(run.result.best_dir), tmp_path / "expl", cohort_dir=d / "c", limit=2, progress=False,
                    log=lambda m: None)
    from mlflow import MlflowClient

    exp_id = MlflowClient(tracking_uri=uri).get_run(run.run_id).info.experiment_id
    port = _free_port()
    server = start_ui(uri, port)
    page = None
    try:
        page = Page(1400, 1000)
        base = f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{run.run_id}"
        page.load(base)
        text = page.wait_for("document.body.innerText.includes('test_auroc') && document.body.innerText", 90)
        for metric in ("test_auroc", "val_auroc", "train_loss", "test_ece"):
            assert metric in text, metric
        assert "cxr-test" in text, "the registered model is linked from the run page"
        page.screenshot(tmp_path / "run.png")
        page.load(base + "/artifacts")
        text = page.wait_for("document.body.innerText.includes('explanations') && document.body.innerText", 90)
        assert "explanations" in text and "evaluation" in text and "cohort" in text
        assert len(page.screenshot(tmp_path / "artifacts.png")) > 20_000
    finally:
        if page is not None:
            page.close()
        server.terminate()
        server.wait(timeout=30)


def test_explanations_join_the_models_run_without_a_stray_experiment(audited, tmp_path):
    from mlflow import MlflowClient

    from clinfuse.pipeline import explain_and_log

    d, run, uri, _ = audited
    lines = []
    explain_and_log(str(run.result.best_dir), tmp_path / "x", cohort_dir=d / "c", limit=1, progress=False,
                    log=lines.append)
    c = MlflowClient(tracking_uri=uri)
    assert [a.path for a in c.list_artifacts(run.run_id, "explanations")] == ["explanations/test"]
    assert lines == [f"mlflow: explanations logged to run {run.run_id} under explanations/test"]
    names = {e.name for e in c.search_experiments()}
    assert "test-exp" in names and "clinfuse" not in names
