"""``clinfuse server init | start | stop | user add``: a team's MLflow tracking server on PostgreSQL.

The server folder (``DIR``) holds everything; only its owner can read it (mode 0700):

- ``postgres/``: the PostgreSQL cluster (``initdb``; SCRAM passwords; loopback only), with two
  databases: ``mlflow`` (runs, metrics, registered models) and ``mlflow_auth`` (MLflow's users and
  permissions). An existing PostgreSQL server can be used instead (``init --db-url``).
- ``artifacts/``: proxied artifact storage (clients upload through the server; ``--artifacts`` may
  name another folder or an object store URL such as ``s3://bucket/clinfuse``).
- ``server.json``: ports, URLs (no secrets); ``auth.ini``: MLflow's auth configuration;
  ``roles.json``: who is a trainer, who a reviewer.
- secrets, mode 0600: ``admin-password`` (the MLflow admin, generated at init), ``db-password``,
  ``flask-secret`` (MLflow's CSRF key).

``start`` runs PostgreSQL and ``mlflow server --app-name clinfuse-team`` (MLflow's basic-auth app
plus the reviewer guard of :mod:`clinfuse.server.app`) in the foreground; Ctrl-C or ``stop`` ends
both cleanly.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

from ..net import free_port
from .postgres import Cluster, ServerError

__all__ = ["init_server", "serve", "stop_server", "add_user", "TeamServer", "ROLES"]

ROLES = ("trainer", "reviewer")
ADMIN = "admin"


def _secret_file(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


class TeamServer:
    """A server folder (see the module doc)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        f = self.root / "server.json"
        if not f.is_file():
            raise ServerError(f"{self.root}: not a clinfuse server folder (no server.json); create one with "
                              f"`clinfuse server init {root}`")
        self.meta = json.loads(f.read_text())

    # ------------------------------------------------------------------ facts
    port = property(lambda self: int(self.meta["port"]))
    url = property(lambda self: f"http://127.0.0.1:{self.port}")

    def secret(self, name: str) -> str:
        return (self.root / name).read_text().strip()

    def cluster(self) -> Cluster | None:
        if self.meta.get("db_url"):
            return None
        return Cluster(self.root / "postgres", int(self.meta["pg_port"]), password=self.secret("db-password"))

    def backend_uri(self, db: str = "mlflow") -> str:
        return (self.meta["db_url"].rstrip("/") + f"/{db}") if self.meta.get("db_url") else self.cluster().url(db)

    def env(self) -> dict[str, str]:
        """The environment of the MLflow server process (secrets through variables, never argv)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_REGISTRY_"))}
        env.update({"MLFLOW_AUTH_CONFIG_PATH": str(self.root / "auth.ini"),
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("flask-secret"),
                    "CLINFUSE_SERVER_ROLES": str(self.root / "roles.json"),
                    "MLFLOW_DISABLE_TELEMETRY": "true"})
        if not self.meta.get("db_url"):
            env["PGPASSWORD"] = self.secret("db-password")
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env

    def roles(self) -> dict[str, str]:
        f = self.root / "roles.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def set_role(self, user: str, role: str) -> None:
        roles = self.roles()
        roles[user] = role
        tmp = self.root / f".roles.json.{os.getpid()}"
        tmp.write_text(json.dumps(roles, indent=2, sort_keys=True))
        os.replace(tmp, self.root / "roles.json")

    # ------------------------------------------------------------------ talking to the running server
    def request(self, method: str, path: str, body: dict | None = None, *, user: str = ADMIN,
                password: str | None = None, timeout: float = 30):
        pw = password if password is not None else self.secret("admin-password")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": "Basic " + b64encode(f"{user}:{pw}".encode()).decode(),
            "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else {}

    def healthy(self, timeout: float = 2.0) -> bool:
        from ..tracking.mlflow_tracker import unreachable_reason

        return unreachable_reason(self.url, timeout) is None


def init_server(root: str | Path, *, port: int = 5000, db_url: str | None = None, artifacts: str | None = None,
                log=print) -> TeamServer:
    """Create a server folder: PostgreSQL cluster and databases, MLflow auth config, the admin.

    Raises:
        ServerError: the folder exists and is not empty, PostgreSQL is missing, initdb fails.
    """
    root = Path(root).resolve()
    if root.exists() and any(root.iterdir()):
        raise ServerError(f"{root}: exists and is not empty; give a new folder")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    admin_pw, db_pw = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    _secret_file(root / "admin-password", admin_pw)
    _secret_file(root / "db-password", db_pw)
    _secret_file(root / "flask-secret", secrets.token_hex(32))
    meta = {"format": "clinfuse-server/1", "port": port, "db_url": db_url,
            "pg_port": None if db_url else free_port(),
            "artifacts": artifacts or str(root / "artifacts")}
    (root / "server.json").write_text(json.dumps(meta, indent=2))
    (root / "roles.json").write_text("{}")
    if not artifacts:
        (root / "artifacts").mkdir(mode=0o700)
    srv = TeamServer(root)
    cluster = srv.cluster()
    if cluster is not None:
        # the cluster's owner (postgres, when we are root) must reach its folder: only it, and us
        cluster.dir.parent.chmod(0o711)
        log(f"server: creating the PostgreSQL cluster in {cluster.dir}")
        cluster.init()
        cluster.start(root / "postgres.log")
        try:
            cluster.wait()
            cluster.createdb("mlflow")
            cluster.createdb("mlflow_auth")
            _write_auth_ini(srv)
            _bootstrap_admin(srv, admin_pw)
        finally:
            cluster.stop()
    else:
        _write_auth_ini(srv)
        _bootstrap_admin(srv, admin_pw)
    log(f"server: ready in {root}; the MLflow admin's password is in {root / 'admin-password'} (owner only)")
    return srv


def _write_auth_ini(srv: TeamServer) -> None:
    ini = ("[mlflow]\n"
           "# trainers write through this default; reviewers are refused writes by clinfuse.server.app\n"
           "default_permission = EDIT\n"
           f"database_uri = {srv.backend_uri('mlflow_auth')}\n"
           f"admin_username = {ADMIN}\n"
           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
           "grant_default_workspace_access = false\n"
           "# each request's password is checked with PBKDF2 (~0.1-0.3 s of CPU); cache a successful check for\n"
           "# 30 s per worker: a password change or a deleted account takes up to 30 s to reach other workers\n"
           "auth_cache_ttl_seconds = 30\n")
    _secret_file(srv.root / "auth.ini", ini)


def _bootstrap_admin(srv: TeamServer, admin_pw: str) -> None:
    env = {**srv.env(), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_pw}
    p = subprocess.run([sys.executable, "-c", "from mlflow.server.auth import bootstrap_admin_user as b; b()"],
                       env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise ServerError(f"could not create the MLflow admin: {(p.stderr.strip().splitlines() or ['?'])[-1]}")


def serve(root: str | Path, *, port: int | None = None, workers: int = 2, ready=None, log=print) -> int:
    """Run PostgreSQL and the MLflow server in the foreground until Ctrl-C, SIGTERM or ``stop``.

    Args:
        ready: called with the server's URL once /health answers.
    Returns: the exit status (0 after a clean stop).
    """
    srv = TeamServer(root)
    if port is not None and port != srv.port:
        srv.meta["port"] = port
        (srv.root / "server.json").write_text(json.dumps(srv.meta, indent=2))
    pidf = srv.root / "server.pid"
    if pidf.is_file():
        try:
            os.kill(int(pidf.read_text()), 0)
            raise ServerError(f"{srv.root}: a server already runs (pid {pidf.read_text().strip()}); "
                              f"`clinfuse server stop {root}` first")
        except (ProcessLookupError, ValueError):
            pidf.unlink()
    cluster = srv.cluster()
    if cluster is not None:
        cluster.start(srv.root / "postgres.log")
        cluster.wait()
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "clinfuse-team",
           "--backend-store-uri", srv.backend_uri("mlflow"), "--artifacts-destination", srv.meta["artifacts"],
           "--serve-artifacts", "--host", "127.0.0.1", "--port", str(srv.port), "--workers", str(workers)]
    mlog = open(srv.root / "mlflow-server.log", "a")
    proc = subprocess.Popen(cmd, env=srv.env(), stdout=mlog, stderr=subprocess.STDOUT, start_new_session=True)
    pidf.write_text(str(os.getpid()))
    stopping = {"now": False}

    def _stop(signum, frame):
        stopping["now"] = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        deadline = time.time() + 180
        while not srv.healthy() and not stopping["now"]:
            if proc.poll() is not None:
                tail = (srv.root / "mlflow-server.log").read_text()[-1500:]
                raise ServerError(f"the MLflow server exited at start ({proc.returncode}); its log ends: {tail}")
            if time.time() > deadline:
                raise ServerError("the MLflow server did not answer /health within 180 s; see mlflow-server.log")
            time.sleep(0.5)
        if not stopping["now"]:
            log(f"server: MLflow at {srv.url} (sign in with an account; Ctrl-C or `clinfuse server stop {root}` "
                "stops it)")
            if ready is not None:
                ready(srv.url)
        while not stopping["now"]:
            if proc.poll() is not None:
                log(f"server: the MLflow server exited ({proc.returncode}); stopping")
                status = 1
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        mlog.close()
        if cluster is not None:
            cluster.stop()
        pidf.unlink(missing_ok=True)
        for s, h in old.items():
            signal.signal(s, h)
        log("server: stopped")
    return status


def stop_server(root: str | Path, timeout: float = 90) -> bool:
    """Ask a running ``serve`` to stop (SIGTERM) and wait for it. Returns False if none was running."""
    srv = TeamServer(root)
    pidf = srv.root / "server.pid"
    if not pidf.is_file():
        return False
    pid = int(pidf.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidf.unlink(missing_ok=True)
        return False
    deadline = time.time() + timeout
    while time.time() < deadline and pidf.is_file():
        time.sleep(0.2)
    if pidf.is_file():
        raise ServerError(f"the server (pid {pid}) did not stop within {timeout:.0f} s")
    return True


def add_user(root: str | Path, name: str, role: str, password: str) -> None:
    """Create an MLflow account on the running server and give it a role.

    Raises:
        ServerError: unknown role, the server is not running, or MLflow refused (e.g. the user exists).
    """
    if role not in ROLES:
        raise ServerError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    srv = TeamServer(root)
    if not srv.healthy():
        raise ServerError(f"no server answers at {srv.url}; start it with `clinfuse server start {root}`")
    try:
        srv.request("POST", "/api/2.0/mlflow/users/create", {"username": name, "password": password})
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            detail = json.loads(e.read()).get("message", "")
        except ValueError:
            pass
        raise ServerError(f"MLflow refused to create user {name!r} (HTTP {e.code}): {detail or e.reason}") from None
    srv.set_role(name, role)
