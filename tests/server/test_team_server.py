"""The team server on real parts: PostgreSQL (initdb/pg_ctl under a temp folder), `mlflow server` with
MLflow's basic auth and clinfuse's roles, started and stopped by these tests through the CLI.

Slow marker: CI runs these (scripts/test.sh installs Debian's postgresql where it is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from ..conftest import REPO, synthetic_cohort

pytestmark = pytest.mark.slow

TRAINER, TRAINER_PW = "tina", "tina-trains-models"
REVIEWER, REVIEWER_PW = "rex", "rex-reads-everything"


def _skip_without_parts():
    pytest.importorskip("flask_wtf", reason="mlflow[auth] missing: pip install 'clinfuse[server]'")
    pytest.importorskip("psycopg", reason="psycopg missing: pip install 'clinfuse[server]'")
    from clinfuse.server.postgres import ServerError, pg_bin

    try:
        pg_bin("initdb")
    except ServerError:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; scripts/test.sh installs it)")


def _env(user=None, password=None, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", **extra})
    if user:
        env.update({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})
    return env


def _clinfuse(*args, env=None, timeout=900, check=False):
    p = subprocess.run([sys.executable, "-m", "clinfuse.cli", *args], env=env or _env(), capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"clinfuse {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


class Running:
    def __init__(self, root: Path):
        self.root = root
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "clinfuse.cli", "server", "start", str(self.root)],
                                     env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        from clinfuse.server import TeamServer

        srv = TeamServer(self.root)
        deadline = time.time() + 240
        while not srv.healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the server did not start:\n{self.proc.stdout.read()}")
            time.sleep(0.5)
        self.url = srv.url
        return self

    def stop(self):
        p = _clinfuse("server", "stop", str(self.root), check=True)
        assert "stopped" in p.stdout
        self.proc.wait(timeout=60)
        out = self.proc.stdout.read()
        assert self.proc.returncode == 0 and "server: stopped" in out, out


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """(Running server, work dir): two accounts, a synthetic cohort with fake identifiers."""
    _skip_without_parts()
    # the 'postgres' user must be able to enter the server folder (pytest's temp folders are mode 0700)
    base = Path(tempfile.mkdtemp(prefix="clinfuse-server-test-", dir="/tmp"))
    base.chmod(0o711)
    root = base / "srv"
    from clinfuse.net import free_port

    _clinfuse("server", "init", str(root), "--port", str(free_port()), check=True)
    assert oct((root / "admin-password").stat().st_mode & 0o777) == "0o600"
    srv = Running(root).start()
    _clinfuse("server", "user", "add", str(root), TRAINER, "--role", "trainer", "--password", TRAINER_PW, check=True)
    _clinfuse("server", "user", "add", str(root), REVIEWER, "--role", "reviewer", "--password", REVIEWER_PW,
              check=True)
    work = tmp_path_factory.mktemp("team-work")
    synthetic_cohort(work, studies=120, seed=4, size=40)
    cfg = work / "tiny.yaml"
    cfg.write_text((REPO / "configs" / "tiny.yaml").read_text())
    yield srv, work
    if srv.proc.poll() is None:
        srv.stop()
    shutil.rmtree(base, ignore_errors=True)


def _train(srv, work, out, *, user=TRAINER, password=TRAINER_PW, extra=(), env_extra=None, popen=False):
    args = ["train", "--cohort", str(work / "c"), "--out", str(out), "--config", str(work / "tiny.yaml"),
            "--tracking-uri", srv.url, "--set", "data.image_size=[32,32]", "--set", "train.epochs=1",
            "--set", "eval.bootstrap=0", "--set", "tracking.system_metrics=false", "--no-progress", *extra]
    env = _env(user, password, **(env_extra or {}))
    if popen:
        return subprocess.Popen([sys.executable, "-m", "clinfuse.cli", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=REPO)
    return _clinfuse(*args, env=env)


def _api(url, method, path, body=None, user=None, password=None):
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def _client(srv, user, password, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=srv.url, registry_uri=srv.url)


def test_accounts_and_roles(team, tmp_path, monkeypatch):
    srv, work = team
    # nobody gets in without an account (this POST succeeded on the UI's port before)
    assert _api(srv.url, "POST", "/api/2.0/mlflow/experiments/create", {"name": "intruder"})[0] == 401
    assert _api(srv.url, "POST", "/api/2.0/mlflow/experiments/create", {"name": "intruder"}, TRAINER, "wrong")[0] == 401
    # a wrong password for a training is one line before any work
    p = _train(srv, work, tmp_path / "denied", password="not-the-password")
    assert p.returncode == 2 and "refused the credentials" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "not-the-password" not in p.stderr + p.stdout and not (tmp_path / "denied" / "state.pt").exists()
    # the trainer trains, evaluates into the run, registers, explains
    p = _train(srv, work, tmp_path / "run", extra=["--set", "tracking.register_as=team-model"])
    assert p.returncode == 0, p.stderr
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    env = _env(TRAINER, TRAINER_PW)
    p = _clinfuse("explain", "--model", "models:/team-model/1", "--tracking-uri", srv.url, "--cohort",
                  str(work / "c"), "--limit", "2", "--out", str(tmp_path / "expl"), "--no-progress", env=env)
    assert p.returncode == 0, p.stderr
    # the reviewer reads all of it
    c = _client(srv, REVIEWER, REVIEWER_PW, monkeypatch)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_auroc" in run.data.metrics and run.data.params
    names = {a.path for a in c.list_artifacts(run_id)}
    assert {"config.yaml", "evaluation", "explanations"} <= names, names
    got = c.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert Path(got).read_text().startswith("#") or "model:" in Path(got).read_text()
    mv = c.get_model_version("team-model", "1")
    assert mv.run_id == run_id
    # ... and changes nothing: 403 for every write
    exp_id = run.info.experiment_id
    auth = (REVIEWER, REVIEWER_PW)
    writes = [("/api/2.0/mlflow/experiments/create", {"name": "rex-exp"}),
              ("/api/2.0/mlflow/runs/create", {"experiment_id": exp_id}),
              ("/api/2.0/mlflow/runs/log-metric", {"run_id": run_id, "key": "x", "value": 1, "timestamp": 0}),
              ("/api/2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": "x", "value": "y"}),
              ("/api/2.0/mlflow/runs/delete", {"run_id": run_id}),
              ("/api/2.0/mlflow/registered-models/create", {"name": "rex-model"}),
              ("/api/2.0/mlflow/model-versions/create", {"name": "team-model", "source": mv.source, "run_id": run_id})]
    for path, body in writes:
        assert _api(srv.url, "POST", path, body, *auth)[0] == 403, path
    assert _api(srv.url, "POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]}, *auth)[0] == 200
    assert c.get_run(run_id).info.lifecycle_stage == "active"
    assert c.search_registered_models(filter_string="name='rex-model'") == []
    team_done["run"] = (run_id, exp_id, tmp_path / "run")


team_done: dict = {}


def test_runs_of_an_embedded_store_move_onto_the_server(team, tmp_path, monkeypatch):
    srv, work = team
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = _clinfuse("train", "--cohort", str(work / "c"), "--out", str(tmp_path / "solo"), "--config",
                  str(work / "tiny.yaml"), "--tracking-uri", local, "--experiment", "solo-work", "--set",
                  "data.image_size=[32,32]", "--set", "train.epochs=2", "--set", "eval.bootstrap=0", "--set",
                  "tracking.system_metrics=false", "--no-progress", env=_env())
    assert p.returncode == 0, p.stderr
    src_id = json.loads((tmp_path / "solo" / "mlflow_run.json").read_text())["run_id"]
    args = ["server", "import-runs", "--from", local, "--to", srv.url]
    p = _clinfuse(*args, env=_env(REVIEWER, REVIEWER_PW))  # a reviewer may not write: one line
    assert p.returncode == 2 and "refused this account" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _clinfuse(*args, env=_env(TRAINER, TRAINER_PW), check=True)
    assert "1 run(s) copied, 0 already there" in p.stdout
    assert "0 run(s) copied, 1 already there" in _clinfuse(*args, env=_env(TRAINER, TRAINER_PW), check=True).stdout
    from mlflow import MlflowClient

    src = MlflowClient(tracking_uri=local)
    c = _client(srv, REVIEWER, REVIEWER_PW, monkeypatch)
    exp = c.get_experiment_by_name("solo-work")
    (copy,) = c.search_runs([exp.experiment_id])
    orig = src.get_run(src_id)
    assert copy.data.tags["clinfuse.imported_from"] == src_id and copy.info.status == "FINISHED"
    assert copy.data.params == orig.data.params and copy.data.metrics == orig.data.metrics
    hist = lambda cl, r: [(m.step, m.value) for m in cl.get_metric_history(r, "val_loss")]  # noqa: E731
    assert hist(c, copy.info.run_id) == hist(src, src_id) and len(hist(src, src_id)) == 2
    assert {a.path for a in c.list_artifacts(copy.info.run_id)} == {a.path for a in src.list_artifacts(src_id)}


def test_four_trainings_at_once(team, tmp_path, monkeypatch):
    srv, work = team
    procs = [_train(srv, work, tmp_path / f"r{i}", extra=["--set", "tracking.register_as=team-concurrent"], popen=True)
             for i in range(4)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outs)
    c = _client(srv, REVIEWER, REVIEWER_PW, monkeypatch)
    ids = [json.loads((tmp_path / f"r{i}" / "mlflow_run.json").read_text())["run_id"] for i in range(4)]
    assert len(set(ids)) == 4
    for rid in ids:
        run = c.get_run(rid)
        assert run.info.status == "FINISHED" and {"test_auroc", "val_loss", "train_loss"} <= set(run.data.metrics)
    versions = c.search_model_versions("name='team-concurrent'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert sorted(v.run_id for v in versions) == sorted(ids)


def test_no_identifier_or_password_in_the_database_or_artifacts(team, tmp_path):
    from clinfuse.server import TeamServer
    from clinfuse.tracking.phi import PhiGuard

    srv, work = team
    if "run" not in team_done:
        pytest.skip("needs the training of test_accounts_and_roles")
    ids = json.loads((work / "c" / "private" / "identifiers.json").read_text())
    guard = PhiGuard(ids)
    ts = TeamServer(srv.root)
    cluster = ts.cluster()
    blobs = {}
    for db in ("mlflow", "mlflow_auth"):
        cluster.dump(db, tmp_path / f"{db}.sql")
        blobs[f"pg_dump {db}"] = (tmp_path / f"{db}.sql").read_text()
    assert "test_auroc" in blobs["pg_dump mlflow"] and TRAINER in blobs["pg_dump mlflow_auth"]
    for f in Path(ts.meta["artifacts"]).rglob("*"):
        if f.is_file():
            blobs[str(f)] = f.read_bytes().decode("latin-1")
    assert len(blobs) > 20
    secrets = [TRAINER_PW, REVIEWER_PW, ts.secret("admin-password"), ts.secret("db-password")]
    for where, text in blobs.items():
        assert guard.find(text) is None, f"identifier of kind {guard.find(text)} in {where}"
        for values in ids.values():
            for v in values:
                assert v not in text, where
        for s in secrets:
            assert s not in text, f"a password in {where}"


def test_backup_and_restore_into_a_fresh_cluster(team, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from clinfuse.net import free_port
    from clinfuse.server import Cluster, TeamServer

    srv, _ = team
    if "run" not in team_done:
        pytest.skip("needs the training of test_accounts_and_roles")
    run_id = team_done["run"][0]
    ts = TeamServer(srv.root)
    ts.cluster().dump("mlflow", tmp_path / "backup.sql")
    base = Path(tempfile.mkdtemp(prefix="clinfuse-restore-", dir="/tmp"))
    base.chmod(0o711)
    fresh = Cluster(base / "pg", free_port(), password="restore-secret-pw")
    fresh.init()
    fresh.start(base / "pg.log")
    try:
        fresh.wait()
        fresh.restore("mlflow", tmp_path / "backup.sql")
        monkeypatch.setenv("PGPASSWORD", "restore-secret-pw")
        uri = fresh.url("mlflow")
        restored = MlflowClient(tracking_uri=uri).get_run(run_id)
        original = _client(srv, REVIEWER, REVIEWER_PW, monkeypatch).get_run(run_id)
        assert restored.data.metrics == original.data.metrics and restored.data.params == original.data.params
        assert restored.info.artifact_uri == original.info.artifact_uri  # the artifact folder is backed up beside it
    finally:
        fresh.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_ui_behind_the_login_in_a_browser(team, tmp_path):
    from ..browser import Page, chromium_path

    srv, _ = team
    if "run" not in team_done:
        pytest.skip("needs the training of test_accounts_and_roles")
    if chromium_path() is None:
        pytest.skip("chromium not installed (apt-get install chromium; scripts/test.sh installs it)")
    run_id, exp_id, _ = team_done["run"]
    page = Page()
    try:
        page.load(f"{srv.url}/")
        text = page.evaluate("document.body ? document.body.innerText : ''") or ""
        assert "test_auroc" not in text  # nothing without signing in
        page.set_headers({"Authorization": "Basic " + b64encode(f"{REVIEWER}:{REVIEWER_PW}".encode()).decode()})
        page.load(f"{srv.url}/#/experiments/{exp_id}/runs/{run_id}")
        text = page.wait_for("document.body.innerText.includes('test_auroc') && document.body.innerText", 90)
        page.load(f"{srv.url}/#/experiments/{exp_id}/runs/{run_id}/artifacts")
        arts = page.wait_for("document.body.innerText.includes('explanations') && document.body.innerText", 90)
        page.screenshot(tmp_path / "ui.png")
    finally:
        page.close()
    assert "test_auroc" in text and "explanations" in arts


def test_server_stopped_in_the_middle_of_a_training(team, tmp_path, monkeypatch):
    """Decided: the trainer stops with a clear error (after MLflow's bounded retries); the run stays
    RUNNING, never FINISHED without its model; --resume after the server is back finishes it."""
    srv, work = team
    out = tmp_path / "long"
    fast_fail = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    proc = _train(srv, work, out, extra=["--set", "train.epochs=40", "--set", "train.patience=0",
                                         "--set", "tracking.register_as=team-long"], env_extra=fast_fail, popen=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.3)
    srv.stop()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, output
    assert "stopped answering during training" in output and "--resume" in output
    srv.start()
    c = _client(srv, REVIEWER, REVIEWER_PW, monkeypatch)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert c.get_run(run_id).info.status == "RUNNING"  # not FINISHED: it has no model and no test metrics
    assert not c.search_model_versions("name='team-long'")
    p = _train(srv, work, out, extra=["--resume", "--set", "train.epochs=40", "--set",
                                      "train.patience=0", "--set", "tracking.register_as=team-long"])
    assert p.returncode == 0, p.stdout + p.stderr
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_auroc" in run.data.metrics
    assert [v.run_id for v in c.search_model_versions("name='team-long'")] == [run_id]
