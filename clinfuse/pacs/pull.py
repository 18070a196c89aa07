"""``clinfuse pacs pull``: studies from a PACS into an export folder that ``cohort build`` reads as it is.

Layout: ``OUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, each file as the PACS
stores it (WADO-RS with the stored transfer syntax). Every study asked for is searched (QIDO-RS)
before the first file is written, so an unknown study or a refused credential writes nothing. Each
instance is written to a hidden temporary name and renamed when whole: an instance on disk is complete,
and a rerun after a kill skips what is there and ends with the same files. What was pulled is
summed up in ``OUT/.clinfuse-pull.json`` (hidden, so the cohort scan does not read it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import progress as progress_of
from .client import PacsClient, PacsError

__all__ = ["pull", "PullResult", "instance_path"]

_PARTIAL = ".partial"


@dataclass
class PullResult:
    studies: list[str]
    retrieved: int = 0
    skipped: int = 0
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    def line(self) -> str:
        return (f"{len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'}: {self.retrieved} instance(s) "
                f"retrieved, {self.skipped} already on disk, {self.seconds:.1f} s")


def instance_path(out: Path, study: str, series: str, sop: str) -> Path:
    for uid in (study, series, sop):
        if not uid or "/" in uid or uid.startswith(".") or "\\" in uid:
            raise PacsError(f"the PACS answered a malformed UID {uid!r}; refusing to use it as a file name")
    return out / study / series / f"{sop}.dcm"


def save_instance(ds, path: Path) -> None:
    """Write a dataset atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_PARTIAL}")  # hidden: a cohort scan skips it
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def _clear_partials(out: Path) -> None:
    if out.is_dir():
        for p in out.rglob(f"*{_PARTIAL}"):
            p.unlink(missing_ok=True)


def pull(client: PacsClient, out: str | Path, *, studies: list[str] | None = None, since: str | None = None,
         modalities: list[str] | None = None, progress: bool = True) -> PullResult:
    """Retrieve studies (by UID, or all since a date with one of `modalities`) into `out`.

    Raises:
        PacsError: the PACS cannot be reached, refuses the credentials, or holds none of a study
            asked for (nothing is written then).
    """
    t0 = time.monotonic()
    out = Path(out)
    if not studies and not since:
        raise PacsError("say what to pull: --study UID (repeatable) or --since DATE")
    client.check()
    uids = list(dict.fromkeys(studies)) if studies else client.find_studies(since=since, modalities=modalities)
    listing = []
    for uid in uids:  # every study is looked up before anything is written
        listing += client.instances(uid, modalities=modalities)
    out.mkdir(parents=True, exist_ok=True)
    _clear_partials(out)
    res = PullResult(uids)
    for study, series, sop in progress_of(listing, "pull", "instance", enabled=progress):
        path = instance_path(out, study, series, sop)
        res.files.append(path)
        if path.is_file():
            res.skipped += 1
            continue
        save_instance(client.retrieve(study, series, sop), path)
        res.retrieved += 1
    res.seconds = time.monotonic() - t0
    manifest = {"format": "clinfuse-pacs-pull/1", "url": client.url, "studies": len(uids),
                "instances": len(listing), "retrieved": res.retrieved, "skipped": res.skipped,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / ".clinfuse-pull.json").write_text(json.dumps(manifest, indent=2))
    return res
