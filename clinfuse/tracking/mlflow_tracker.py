"""MLflow through an explicit client: one run per training, everything screened by the PHI guard.

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns`` (MLflow 3 refuses the
old file store). ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere (a server, another
SQLite file). No global MLflow state is changed outside the short blocks that log or load a model,
which restore it.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .phi import PhiGuard
from ..errors import ClinfuseError, ModelLoadError

__all__ = ["MlflowTracker", "resolve_tracking_uri", "unreachable_reason", "check_access", "credential_values", "is_server_failure", "flatten", "mlflow_uri_context", "ui_command", "resolve_model", "start_ui",
           "describe_model_uri", "logged_run"]


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the argument, else MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


CREDENTIAL_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def credential_values() -> list[str]:
    """The MLflow credentials in the environment: never logged (the guard screens for them)."""
    return [os.environ[v] for v in CREDENTIAL_VARS if os.environ.get(v)]


def check_access(uri: str) -> None:
    """For an MLflow server: one cheap authenticated call, so that an unreachable server or refused
    credentials are one line before any work starts. Nothing for a local store.

    Raises:
        ClinfuseError: the server does not answer, or answers 401/403 (the message says which
            variables to set; it never shows a credential).
    """
    reason = unreachable_reason(uri)
    if reason:
        raise ClinfuseError(f"{reason}; start it (clinfuse server start DIR) or pass --no-mlflow")
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
    except MlflowException as e:
        text = str(e)
        if "401" in text or "not authenticated" in text.lower() or "Unauthorized" in text:
            who = f"user {user!r}" if user else "no MLFLOW_TRACKING_USERNAME set"
            raise ClinfuseError(f"MLflow server {uri} refused the credentials ({who}): set MLFLOW_TRACKING_USERNAME "
                                "and MLFLOW_TRACKING_PASSWORD to an account of the server") from None
        if "403" in text or "PERMISSION_DENIED" in text:
            raise ClinfuseError(f"MLflow server {uri}: user {user!r} may not read the store (HTTP 403)") from None
        raise ClinfuseError(f"MLflow server {uri}: {_first_line(text)}") from None


def is_server_failure(e: BaseException) -> bool:
    """An MLflow server that stopped answering (connection refused or reset, after MLflow's retries)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    if isinstance(e, RequestException):
        return True
    return isinstance(e, MlflowException) and any(
        s in str(e) for s in ("Max retries exceeded", "Connection refused", "ConnectionError", "API request to"))


def unreachable_reason(uri: str, timeout: float = 3.0) -> str | None:
    """For an http(s) server, a one-line reason when its /health does not answer; None otherwise."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return None if r.status == 200 else f"MLflow server {uri} answered {r.status} on /health"
    except OSError as e:
        return f"MLflow server {uri} is unreachable ({getattr(e, 'reason', e)})"


@contextmanager
def store_lock(uri: str):
    """For an embedded SQLite store, an exclusive lock on a file beside it for the block; nothing for a server.

    Several trainings started at once on a new store otherwise race to create its tables ("table
    evaluation_datasets already exists") and its experiment; under the lock the first one does it
    and the others find it done.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".clinfuse-lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _artifact_root(uri: str, experiment: str) -> str | None:
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> dotted keys (lists become JSON strings)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


@contextmanager
def mlflow_uri_context(uri: str):
    """Set MLflow's global tracking and registry URIs for a block (quietly), then restore them."""
    import logging
    import warnings

    import mlflow

    old, old_reg = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    old_bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    mlflow_logger = logging.getLogger("mlflow")
    old_level = mlflow_logger.level
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
            warnings.filterwarnings("ignore", message=".*type hint.*")
            warnings.filterwarnings("ignore", message=".*[Ii]nteger column.*")
            yield
    finally:
        mlflow.set_tracking_uri(old)
        mlflow.set_registry_uri(old_reg)
        mlflow_logger.setLevel(old_level)
        if old_bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old_bar


class MlflowTracker:
    """A tracker (see ``clinfuse.tracking.Tracker``) writing to one MLflow run.

    Args:
        tracking_uri: store URI (see ``resolve_tracking_uri``).
        experiment: experiment name (created when missing; unused when `run_id` is given).
        guard: the PHI guard every value and file passes through.
        run_name: display name of the run.
        run_id: continue this run instead of creating one (resume).
        system_metrics: sample CPU, memory (and GPU with nvidia-ml-py) every `interval` seconds.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "clinfuse", guard: PhiGuard | None = None,
                 run_name: str | None = None, run_id: str | None = None, system_metrics: bool = True,
                 interval: float = 5.0):
        import logging

        from mlflow import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table creation chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.uri = resolve_tracking_uri(tracking_uri)
        with store_lock(self.uri):  # the client's first use creates the tables: once, not by every process at once
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self.client.search_experiments(max_results=1)
        self.guard = (guard or PhiGuard()).with_secrets(credential_values())
        if run_id:  # reopen an existing run in its own experiment
            self.run_id = run_id
            with store_lock(self.uri):
                self.experiment_id = self.client.get_run(run_id).info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.guard.check("the experiment name", experiment)
            with store_lock(self.uri):  # two processes must not both create the experiment
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(
                    experiment, artifact_location=_artifact_root(self.uri, experiment))
            self.experiment_id = exp_id
            if run_name:
                self.guard.check("the run name", run_name)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                     resume_logging=bool(run_id), tracking_uri=self.uri)
                self._monitor.start()
            except ImportError:  # psutil missing: no system metrics, say so once in the run
                self.client.set_tag(self.run_id, "clinfuse.system_metrics", "unavailable (pip install psutil)")

    # -- the Tracker interface ------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        for k, v in flat.items():
            self.guard.check(f"param '{k}'", k, v)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in flatten(metrics).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                continue
            self.guard.check(f"metric name '{k}'", k)
            items.append(Metric(k, float(v), now, int(step)))
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        for k, v in tags.items():
            self.guard.check(f"tag '{k}'", k, v)
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        self.guard.check_file(p)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            mon, self._monitor = self._monitor, None
            mon.finish()
            if getattr(mon, "_logging_step", 1) == 0:  # run shorter than one interval: log one sample anyway
                try:
                    mon.collect_metrics()
                    mon.publish_metrics(mon.aggregate_metrics())
                    mon.mlflow_logger.flush()
                except Exception as e:  # noqa: BLE001 -- system metrics never fail a run
                    self.client.set_tag(self.run_id, "clinfuse.system_metrics", f"not sampled: {e}"[:500])
        self.client.set_terminated(self.run_id, status=status)

    # -- lineage and models -----------------------------------------------------------------------
    def log_cohort(self, cohort_dir: str | Path, context: str = "training") -> None:
        """The cohort as an MLflow dataset (name, fingerprint digest, counts) and cohort.json as an artifact."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        info = json.loads((Path(cohort_dir) / "cohort.json").read_text())
        profile = {"studies": info["counts"]["studies"], "patients": info["counts"]["patients"],
                   "quarantined": info["counts"]["quarantined"], "missingness": info["missingness"],
                   "task": info["task"], "classes": info["classes"],
                   "splits": {k: v["studies"] for k, v in info["splits"].items()}}
        name = f"cohort-{info['fingerprint']['sha256'][:12]}"
        source = json.dumps({"format": info.get("format"), "fingerprint": info["fingerprint"]})
        self.guard.check("the cohort dataset", name, source, json.dumps(profile))
        ds = Dataset(name=name, digest=info["fingerprint"]["sha256"][:32], source_type="clinfuse-cohort",
                     source=source, schema=None, profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])
        self.log_artifact(Path(cohort_dir) / "cohort.json", "cohort")

    def log_model(self, model_dir: str | Path, register_as: str | None, *, python_model: str | Path,
                  code_paths: list[str], signature=None, input_example=None) -> dict:
        """Log a model folder as an MLflow pyfunc from code (``python_model``, a models-from-code file;
        no pickle) with the folder as its artifact, and register it. Everything is screened first.

        Returns ``{"model_uri", "registered_name", "version"}``.
        """
        import mlflow

        model_dir = Path(model_dir)
        self.guard.check_file(model_dir, where=f"model folder '{model_dir.name}'")
        if register_as:
            self.guard.check("the registered model name", register_as)
        if input_example is not None:
            self.guard.check("the model's input example", input_example.to_json())
        with mlflow_uri_context(self.uri), mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(python_model), artifacts={"model_dir": str(model_dir)},
                code_paths=code_paths, signature=signature, input_example=input_example,
                registered_model_name=register_as, pip_requirements=_requirements(),
            )
        version = getattr(info, "registered_model_version", None)
        return {"model_uri": info.model_uri, "registered_name": register_as, "version": version}


def resolve_model(uri_or_dir: str | Path, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A model folder from a folder path or an MLflow URI (``models:/name/version``, ``runs:/id/model``, ...).

    Raises:
        ValueError: neither a model folder nor a URI that holds one.
    """
    p = Path(str(uri_or_dir))
    if p.is_dir():
        return p
    if ":/" not in str(uri_or_dir):
        raise ModelLoadError(f"{uri_or_dir}: not a model folder and not an MLflow URI (models:/NAME/VERSION)")
    import tempfile

    import mlflow

    if dst is None:  # a private download, removed when the process ends
        import atexit
        import shutil

        target = Path(tempfile.mkdtemp(prefix="clinfuse-model-"))
        atexit.register(shutil.rmtree, target, ignore_errors=True)
    else:
        target = Path(dst)
    with mlflow_uri_context(resolve_tracking_uri(tracking_uri)):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri_or_dir), dst_path=str(target)))
        except mlflow.exceptions.MlflowException as e:
            raise ModelLoadError(f"{uri_or_dir}: {_first_line(e.message)}") from None
    found = sorted(local.rglob("model.json"))
    if not found:
        raise ModelLoadError(f"{uri_or_dir}: no clinfuse model (model.json) in the downloaded artifacts")
    return found[0].parent


def logged_run(ref: str, tracking_uri: str | None = None) -> dict:
    """What a logged run recorded: params, tags, last metrics, experiment name, its config.yaml (downloaded)
    and its cohort dataset's profile. `ref` is a run id or a ``models:/`` URI of a registered version.

    Raises:
        ClinfuseError: no such run, or it has no logged config.
    """
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    run_id = ref
    if ref.startswith(("models:/", "runs:/")):
        run_id = describe_model_uri(ref, uri).get("run_id")
        if not run_id:
            raise ClinfuseError(f"{ref}: no such registered model version in {uri}")
    client = MlflowClient(uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ClinfuseError(f"{ref}: no such run in {uri} ({_first_line(e.message)})") from None
    dst = tempfile.mkdtemp(prefix="clinfuse-run-")
    try:
        config_file = client.download_artifacts(run_id, "config.yaml", dst)
    except (MlflowException, OSError):
        raise ClinfuseError(f"{ref}: the run has no config.yaml artifact; it was not made by `clinfuse train`") from None
    profile = None
    if run.inputs and run.inputs.dataset_inputs:
        try:
            profile = json.loads(run.inputs.dataset_inputs[0].dataset.profile)
        except (TypeError, ValueError):
            profile = None
    return {"run_id": run_id, "params": dict(run.data.params), "tags": dict(run.data.tags),
            "metrics": dict(run.data.metrics), "experiment": client.get_experiment(run.info.experiment_id).name,
            "config_file": config_file, "dataset_profile": profile, "status": run.info.status}


def describe_model_uri(uri: str, tracking_uri: str | None = None) -> dict:
    """Version and run of a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI; the run of ``runs:/ID/...``."""
    from mlflow.tracking import MlflowClient

    out: dict = {"version": None, "run_id": None}
    if uri.startswith("runs:/"):
        out["run_id"] = uri[len("runs:/"):].split("/", 1)[0]
        return out
    if not uri.startswith("models:/"):
        return out
    ref = uri[len("models:/"):].rstrip("/")
    client = MlflowClient(resolve_tracking_uri(tracking_uri), registry_uri=resolve_tracking_uri(tracking_uri))
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except Exception:  # noqa: BLE001 - a stage name or an unknown alias: the download already worked
        return out
    out.update(version=str(mv.version), run_id=mv.run_id)
    return out


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "unknown error"


def ui_command(uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The `mlflow ui` command line for a store (artifacts served from beside a SQLite file)."""
    import sys

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", str(workers)]
    root = _artifact_root(uri, "")
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


def start_ui(uri: str, port: int, host: str = "127.0.0.1", timeout: float = 90.0):
    """Start `mlflow ui` in the background and return the process once /health answers.

    Raises:
        TimeoutError: the server did not answer within `timeout` seconds (it is stopped).
    """
    import subprocess

    proc = subprocess.Popen(ui_command(uri, host, port, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise TimeoutError(f"mlflow ui on port {port} did not answer /health in {timeout:.0f} s")


def _requirements() -> list[str]:
    import importlib.metadata as md

    reqs = []
    for pkg in ("torch", "monai", "transformers", "safetensors", "pydicom", "numpy", "pandas", "pydantic", "pyyaml",
                "einops", "mlflow", "pyahocorasick", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
                "python-gdcm", "scikit-learn", "captum", "tqdm", "matplotlib"):
        try:
            reqs.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return reqs
