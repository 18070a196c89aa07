"""The PACS client's configuration: credentials from the environment, URLs, TLS, DICOM nodes (no server)."""

from __future__ import annotations

import pytest

pytest.importorskip("dicomweb_client", reason="pip install 'clinfuse[pacs]'")

from clinfuse.errors import ClinfuseError  # noqa: E402
from clinfuse.pacs.client import PacsClient, PacsCredentials, PacsError  # noqa: E402
from clinfuse.pacs.listen import DicomNode  # noqa: E402


def test_credentials_come_from_the_environment_and_never_show():
    c = PacsCredentials.from_env({"CLINFUSE_PACS_USER": "svc", "CLINFUSE_PACS_PASSWORD": "s3cr3t-pw"})
    assert (c.user, c.password, c.token) == ("svc", "s3cr3t-pw", None) and c.secrets == ["s3cr3t-pw"]
    assert "s3cr3t-pw" not in repr(c) and "s3cr3t-pw" not in repr(PacsClient("http://127.0.0.1:1/dicom-web", c))
    with pytest.raises(PacsError, match="CLINFUSE_PACS_PASSWORD is not set"):
        PacsCredentials.from_env({"CLINFUSE_PACS_USER": "svc"})
    with pytest.raises(PacsError, match="one way of signing in"):
        PacsCredentials.from_env({"CLINFUSE_PACS_USER": "u", "CLINFUSE_PACS_PASSWORD": "p", "CLINFUSE_PACS_TOKEN": "t"})
    assert PacsCredentials.from_env({}).describe() == "no credentials"


def test_basic_auth_and_bearer_token_reach_the_session():
    basic = PacsClient("http://127.0.0.1:1/dicom-web", PacsCredentials("u", "p"))
    assert basic.client._session.auth == ("u", "p")
    bearer = PacsClient("http://127.0.0.1:1/dicom-web", PacsCredentials(token="tok-123"))
    assert bearer.client._session.headers["Authorization"] == "Bearer tok-123"


def test_urls_and_ca_bundles_are_checked(tmp_path):
    for bad in ("pacs.example/dicom-web", "ftp://pacs/dicom-web", "http:///dicom-web"):
        with pytest.raises(PacsError, match="not a DICOMweb base URL"):
            PacsClient(bad, PacsCredentials())
    with pytest.raises(PacsError, match="holds credentials"):
        PacsClient("https://u:p@pacs.example/dicom-web", PacsCredentials())
    with pytest.raises(PacsError, match="CA bundle not found"):
        PacsClient("https://pacs.example/dicom-web", PacsCredentials(), ca_bundle=str(tmp_path / "none.pem"))
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    assert PacsClient("https://pacs.example/dicom-web/", PacsCredentials(), ca_bundle=str(pem)).verify == str(pem)
    assert PacsClient("https://pacs.example/dicom-web/", PacsCredentials()).url == "https://pacs.example/dicom-web"


def test_dicom_nodes_parse():
    assert DicomNode.parse("ORTHANC@10.0.0.5:4242") == DicomNode("ORTHANC", "10.0.0.5", 4242)
    for bad in ("ORTHANC", "ORTHANC@host", "@host:1", "A" * 17 + "@h:1"):
        with pytest.raises(ClinfuseError):
            DicomNode.parse(bad)
