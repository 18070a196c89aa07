"""A PostgreSQL cluster owned by the team server: created with ``initdb`` under its folder, run with
``pg_ctl`` on loopback, password-protected (SCRAM) so that no other local account reads the audit
trail by going around MLflow.

``initdb`` refuses to run as root; when clinfuse runs as root (CI does) the cluster belongs to the
unprivileged ``postgres`` system user (Debian's package creates it) and every PostgreSQL program runs
as that user (``runuser``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import ClinfuseError

__all__ = ["Cluster", "pg_bin", "ServerError"]


class ServerError(ClinfuseError):
    """The team server (PostgreSQL or MLflow) cannot be set up, started or reached."""


def pg_bin(name: str) -> str:
    """The path of a PostgreSQL program (Debian keeps them under /usr/lib/postgresql/VERSION/bin)."""
    found = shutil.which(name)
    if found and name not in ("initdb", "pg_ctl", "postgres"):
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0)
    for b in reversed(versions):
        if (b / name).is_file():
            return str(b / name)
    if found:
        return found
    raise ServerError(f"PostgreSQL's {name} not found; install PostgreSQL (Debian: apt-get install postgresql) or "
                      "give an existing server with --db-url")


class Cluster:
    """A cluster in `data_dir`, its socket in the same folder, listening on 127.0.0.1:`port`.

    Args:
        data_dir: the cluster's folder (created by :meth:`init`).
        port: TCP port on loopback.
        superuser: the database superuser created by ``initdb``.
        password: that user's password (SCRAM; given to programs through PGPASSWORD, never argv).
    """

    def __init__(self, data_dir: str | Path, port: int, superuser: str = "clinfuse", password: str | None = None):
        self.dir = Path(data_dir).resolve()
        self.port, self.superuser, self.password = port, superuser, password
        self.os_user = "postgres" if os.geteuid() == 0 else None

    # ------------------------------------------------------------------ running programs
    def _run(self, args: list[str], *, check: bool = True, timeout: float = 120, input: str | None = None):
        cmd = (["runuser", "-u", self.os_user, "--"] if self.os_user else []) + args
        env = {**os.environ, "PGPASSWORD": self.password or "", "LC_ALL": "C.UTF-8"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, input=input,
                           cwd="/tmp" if self.os_user else None)
        if check and p.returncode != 0:
            msg = (p.stderr or p.stdout).strip().splitlines()
            raise ServerError(f"{Path(args[0]).name} failed: {msg[-1] if msg else p.returncode}")
        return p

    def _own(self, path: Path) -> None:
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # ------------------------------------------------------------------ lifecycle
    def init(self) -> None:
        """``initdb`` with SCRAM authentication for every connection, the superuser's password from a
        temporary file readable by the cluster's owner only."""
        if self.os_user:
            try:
                pwd.getpwnam(self.os_user)
            except KeyError:
                raise ServerError("running as root, and there is no 'postgres' system user to own the cluster "
                                  "(initdb refuses root); install Debian's postgresql, or run as another user") from None
            for parent in self.dir.parents:  # the cluster's owner must be able to reach its folder
                if parent.exists() and not parent.stat().st_mode & 0o001:
                    raise ServerError(f"{parent}: the 'postgres' user cannot enter this folder (mode "
                                      f"{parent.stat().st_mode & 0o777:o}), so it cannot own a cluster below it; "
                                      "put the server folder elsewhere (e.g. under /srv) or chmod o+x it")
        self.dir.mkdir(parents=True, exist_ok=False)
        self.dir.chmod(0o700)
        self._own(self.dir)
        pwfile = self.dir.parent / f".pwfile-{os.getpid()}"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password or "")
        self._own(pwfile)
        try:
            self._run([pg_bin("initdb"), "-D", str(self.dir), "-U", self.superuser, f"--pwfile={pwfile}",
                       "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
        finally:
            pwfile.unlink(missing_ok=True)

    def running(self) -> bool:
        return self._run([pg_bin("pg_ctl"), "-D", str(self.dir), "status"], check=False).returncode == 0

    def start(self, log: Path) -> None:
        if self.running():
            return
        log.touch(exist_ok=True)
        self._own(log)
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run([pg_bin("pg_ctl"), "-D", str(self.dir), "-o", opts, "-l", str(log), "-w", "-t", "60", "start"])

    def stop(self) -> None:
        if self.running():
            self._run([pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "-t", "60", "stop"])

    def wait(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise ServerError(f"PostgreSQL on 127.0.0.1:{self.port} did not become ready in {timeout:.0f} s")

    # ------------------------------------------------------------------ databases
    def createdb(self, name: str) -> None:
        self._run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser, name])

    def url(self, db: str) -> str:
        """SQLAlchemy URL without the password (it travels in PGPASSWORD)."""
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self.port}/{db}"

    def dump(self, db: str, out: Path) -> None:
        """``pg_dump`` of one database as plain SQL to `out` (written by this process, not the cluster's owner)."""
        p = self._run([pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser,
                       "--no-owner", db], timeout=600)
        out.write_text(p.stdout)

    def restore(self, db: str, sql: Path) -> None:
        """Load a plain-SQL dump into a new database `db`."""
        self.createdb(db)
        self._run([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser, "-d", db,
                   "-v", "ON_ERROR_STOP=1", "-q"], input=sql.read_text(), timeout=600)
