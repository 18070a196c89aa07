"""A DICOMweb connection to a PACS, with credentials from the environment and one-line errors.

The client is ``dicomweb-client`` (QIDO-RS search, WADO-RS retrieve, STOW-RS store); this module
adds what a hospital needs around it: credentials that never appear in a URL, a log line or MLflow
(``CLINFUSE_PACS_USER`` / ``CLINFUSE_PACS_PASSWORD``, or a bearer token in ``CLINFUSE_PACS_TOKEN``),
a CA bundle for the hospital's TLS certificate (``--ca-bundle`` or ``CLINFUSE_PACS_CA_BUNDLE``), and
errors that say in one line what is wrong (unreachable, refused credentials, unknown study).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ClinfuseError

__all__ = ["PacsClient", "PacsError", "PacsCredentials", "ENV_USER", "ENV_PASSWORD", "ENV_TOKEN", "ENV_CA_BUNDLE"]

ENV_USER, ENV_PASSWORD, ENV_TOKEN = "CLINFUSE_PACS_USER", "CLINFUSE_PACS_PASSWORD", "CLINFUSE_PACS_TOKEN"
ENV_CA_BUNDLE = "CLINFUSE_PACS_CA_BUNDLE"

# DICOM tags (QIDO-RS answers in the DICOM JSON model, keyed by tag)
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, MODALITIES_IN_STUDY, STUDY_DATE = "00080060", "00080061", "00080020"


class PacsError(ClinfuseError):
    """The PACS could not be reached, refused us, or does not hold what was asked for."""


@dataclass(frozen=True)
class PacsCredentials:
    """Who we are to the PACS. ``repr`` never shows the secret."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> "PacsCredentials":
        user, password, token = env.get(ENV_USER) or None, env.get(ENV_PASSWORD) or None, env.get(ENV_TOKEN) or None
        if (user is None) != (password is None):
            missing = ENV_PASSWORD if password is None else ENV_USER
            raise PacsError(f"{missing} is not set: set both {ENV_USER} and {ENV_PASSWORD}, or {ENV_TOKEN} alone")
        if token and user:
            raise PacsError(f"both {ENV_TOKEN} and {ENV_USER}/{ENV_PASSWORD} are set; set one way of signing in")
        return cls(user, password, token)

    @property
    def secrets(self) -> list[str]:
        """The values that must never be logged (the guard screens for them)."""
        return [s for s in (self.password, self.token) if s]

    def describe(self) -> str:
        if self.token:
            return f"bearer token from {ENV_TOKEN}"
        if self.user:
            return f"user from {ENV_USER}"
        return "no credentials"

    def __repr__(self) -> str:
        return f"PacsCredentials({self.describe()})"


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PacsError(f"{url!r} is not a DICOMweb base URL; give http(s)://HOST[:PORT]/PATH, e.g. "
                        "http://127.0.0.1:8042/dicom-web")
    if parts.username is not None or parts.password is not None:
        raise PacsError(f"the PACS URL holds credentials; remove them from the URL (it is logged) and set "
                        f"{ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN}) instead")
    return url.rstrip("/")


class PacsClient:
    """DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against one PACS.

    Args:
        url: the DICOMweb base URL (Orthanc: ``http://HOST:8042/dicom-web``).
        credentials: default: from the environment (:meth:`PacsCredentials.from_env`).
        ca_bundle: a PEM file of the CA that signed the PACS's certificate (default:
            ``CLINFUSE_PACS_CA_BUNDLE``, else the system's store).
        timeout: seconds per HTTP request.

    Raises:
        PacsError: the URL is malformed or carries credentials; the CA bundle file is missing.
    """

    def __init__(self, url: str, credentials: PacsCredentials | None = None, *, ca_bundle: str | None = None,
                 timeout: float = 60.0):
        import requests
        from dicomweb_client import DICOMwebClient

        self.url = _check_url(url)
        self.credentials = credentials if credentials is not None else PacsCredentials.from_env()
        session = requests.Session()
        if self.credentials.token:
            session.headers["Authorization"] = f"Bearer {self.credentials.token}"
        elif self.credentials.user:
            session.auth = (self.credentials.user, self.credentials.password)
        ca = ca_bundle or os.environ.get(ENV_CA_BUNDLE)
        if ca:
            if not os.path.isfile(ca):
                raise PacsError(f"{ca}: CA bundle not found (--ca-bundle / {ENV_CA_BUNDLE}); give the PEM file of "
                                "the CA that signed the PACS's certificate")
            session.verify = ca
        self.verify = session.verify
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)

    def __repr__(self) -> str:
        return f"PacsClient({self.url}, {self.credentials.describe()})"

    # ------------------------------------------------------------------ errors
    def _fail(self, what: str, e: BaseException) -> PacsError:
        import requests

        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return PacsError(f"{self.url}: the PACS refused the credentials ({self.credentials.describe()}) for "
                             f"{what} (HTTP 401); check {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}")
        if status == 403:
            return PacsError(f"{self.url}: this account may not {what} (HTTP 403); ask the PACS administrator")
        if status is not None:
            return PacsError(f"{self.url}: {what} failed with HTTP {status}")
        if isinstance(e, requests.exceptions.SSLError):
            return PacsError(f"{self.url}: TLS certificate not trusted; give the CA's PEM file with --ca-bundle or "
                             f"{ENV_CA_BUNDLE}")
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return PacsError(f"{self.url}: the PACS cannot be reached ({type(e).__name__}); check the URL and that "
                             "the PACS is up")
        return PacsError(f"{self.url}: {what} failed: {type(e).__name__}")

    def _call(self, what: str, fn, *args, **kw):
        from requests.exceptions import RequestException

        try:
            return fn(*args, **kw)
        except RequestException as e:  # what a DICOMweb call raises when the PACS misbehaves
            raise self._fail(what, e) from None

    # ------------------------------------------------------------------ QIDO-RS
    def check(self) -> None:
        """One cheap request (a study search with limit 1): raises :class:`PacsError` if the PACS
        cannot be reached or refuses the credentials, before any work starts."""
        self._call("search studies", self.client.search_for_studies, limit=1)

    def find_studies(self, *, since: str | None = None, modalities: list[str] | None = None) -> list[str]:
        """StudyInstanceUIDs of studies on or after `since` (YYYYMMDD or YYYY-MM-DD) with any of `modalities`."""
        filters = {}
        if since:
            filters["StudyDate"] = f"{_dicom_date(since)}-"
        found = self._call("search studies", self.client.search_for_studies, search_filters=filters,
                           fields=["ModalitiesInStudy"], get_remaining=True)
        uids = []
        for s in found:
            mods = set(_values(s, MODALITIES_IN_STUDY))
            if modalities and mods and not mods & set(modalities):
                continue
            uids.append(_values(s, STUDY_UID)[0])
        return sorted(set(uids))

    def instances(self, study_uid: str, *, modalities: list[str] | None = None) -> list[tuple[str, str, str]]:
        """(study, series, SOP instance) UIDs of a study's instances, sorted.

        Raises:
            PacsError: the PACS holds no such study.
        """
        found = self._call(f"search the instances of study {study_uid}", self.client.search_for_instances,
                           study_instance_uid=study_uid, fields=["Modality"], get_remaining=True)
        if not found:
            raise PacsError(f"{self.url}: no study {study_uid} in the PACS; check the StudyInstanceUID")
        out = []
        for i in found:
            mod = (_values(i, MODALITY) or [""])[0]
            if modalities and mod and mod not in modalities:
                continue
            out.append((study_uid, _values(i, SERIES_UID)[0], _values(i, SOP_UID)[0]))
        return sorted(set(out))

    # ------------------------------------------------------------------ WADO-RS / STOW-RS
    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str):
        """One instance as a pydicom Dataset, in the transfer syntax the PACS stores it in."""
        return self._call(f"retrieve instance {sop_uid}", self.client.retrieve_instance, study_uid, series_uid,
                          sop_uid, media_types=(("application/dicom", "*"),))

    def store(self, datasets: list, study_uid: str, *, verify: bool = True) -> None:
        """STOW-RS `datasets` into the study, then (with `verify`) check by QIDO-RS that the PACS holds
        them: a PACS may answer a store with success and drop the instance (Orthanc does so when a
        filter refuses it), and a result the clinician never sees must not count as delivered.

        Raises:
            PacsError: naming how many instances the PACS refused or does not hold.
        """
        resp = self._call(f"store {len(datasets)} instance(s) into the study", self.client.store_instances,
                          datasets, study_instance_uid=study_uid)
        failed = getattr(resp, "FailedSOPSequence", None) or []
        if failed:
            reasons = sorted({str(getattr(f, "FailureReason", "?")) for f in failed})
            raise PacsError(f"{self.url}: the PACS refused {len(failed)} of {len(datasets)} instance(s) "
                            f"(failure reason {', '.join(reasons)})")
        if verify:
            held = self._call("check the stored instances", self.client.search_for_instances,
                              study_instance_uid=study_uid, get_remaining=True)
            have = {(_values(i, SOP_UID) or [""])[0] for i in held}
            missing = [d for d in datasets if str(d.SOPInstanceUID) not in have]
            if missing:
                raise PacsError(f"{self.url}: the PACS answered the store with success but does not hold "
                                f"{len(missing)} of {len(datasets)} instance(s) ("
                                f"{', '.join(sorted({str(d.Modality) for d in missing}))}); a filter or a rule of "
                                "the PACS dropped them")


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


def _dicom_date(s: str) -> str:
    d = s.replace("-", "")
    if len(d) != 8 or not d.isdigit():
        raise PacsError(f"--since {s!r}: give a date as YYYY-MM-DD or YYYYMMDD")
    return d
