"""A throw-away Orthanc PACS on loopback, for the tests, the benchmark and trying the PACS loop.

Orthanc comes from Debian's packages (``apt-get install orthanc orthanc-dicomweb``); this starts the
binary itself (no system service) with a generated configuration under a temporary folder: storage
and index there, HTTP and DICOM ports on 127.0.0.1 only, DICOMweb on, HTTP basic auth with one
generated account. A hospital's own PACS is configured by its administrators; see docs/pacs.md.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

from ..errors import ClinfuseError
from ..net import free_port

__all__ = ["LocalOrthanc", "orthanc_binary", "DICOMWEB_PLUGIN"]

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None (with the DICOMweb plugin also required)."""
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    return exe if exe and Path(DICOMWEB_PLUGIN).is_file() else None


class LocalOrthanc:
    """Start Orthanc on loopback; ``with LocalOrthanc() as o:`` stops it and removes its storage.

    Attributes:
        url: the DICOMweb base URL; ``rest``: Orthanc's REST root; ``user``, ``password``;
        ``aet``, ``dicom_port``: its DICOM (C-STORE/C-ECHO) endpoint; ``modalities``: DICOM peers
        it may send to (``{name: (aet, host, port)}``, given at start).

    Args:
        lua: Orthanc Lua scripts to load (the tests use one that refuses clinfuse's results).
    """

    def __init__(self, root: str | Path | None = None, *, modalities: dict[str, tuple[str, str, int]] | None = None,
                 aet: str = "ORTHANC", lua: list[str] | None = None):
        exe = orthanc_binary()
        if exe is None:
            raise ClinfuseError("Orthanc with its DICOMweb plugin is not installed; apt-get install orthanc "
                                "orthanc-dicomweb")
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="clinfuse-orthanc-"))
        self.user, self.password = "clinfuse", secrets.token_urlsafe(12)
        self.http_port, self.dicom_port, self.aet = free_port(), free_port(), aet
        self.rest = f"http://127.0.0.1:{self.http_port}"
        self.url = f"{self.rest}/dicom-web"
        self.modalities = dict(modalities or {})
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "clinfuse-test-pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {k: [a, h, p] for k, (a, h, p) in self.modalities.items()},
            "DicomCheckCalledAet": False, "StableAge": 1, "HttpTimeout": 60,
            "LuaScripts": [str(p) for p in lua or []],
        }
        (self.root / "orthanc.json").write_text(json.dumps(cfg, indent=2))
        self._log = open(self.root / "orthanc.log", "w")
        self.proc = subprocess.Popen([exe, str(self.root / "orthanc.json")], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.root)
        self._wait()

    def _auth(self) -> dict:
        return {"Authorization": "Basic " + b64encode(f"{self.user}:{self.password}".encode()).decode()}

    def _wait(self, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        log = (self.root / "orthanc.log").read_text()[-2000:]
        self.stop()
        raise ClinfuseError(f"Orthanc did not answer within {timeout:.0f} s; its log ends:\n{log}")

    # ------------------------------------------------------------------ REST helpers (tests, benchmark)
    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        headers = self._auth()
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.rest + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, files) -> int:
        """Store DICOM files through the REST API; returns how many Orthanc took (it refuses non-DICOM)."""
        n = 0
        for f in files:
            try:
                self.request("POST", "/instances", Path(f).read_bytes(), "application/dicom")
                n += 1
            except urllib.error.HTTPError:
                pass
        return n

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalOrthanc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
