"""The reviewer guard's rules, without a server: which requests write, who is a trainer."""

from __future__ import annotations

import json

import pytest

from clinfuse.server.app import is_write, role_of


@pytest.mark.parametrize("method,path,writes", [
    ("GET", "/api/2.0/mlflow/runs/get", False),
    ("POST", "/api/2.0/mlflow/runs/search", False),
    ("POST", "/ajax-api/2.0/mlflow/experiments/search", False),
    ("POST", "/ajax-api/2.0/mlflow/experiments/search-datasets", False),
    ("POST", "/graphql", False),
    ("POST", "/api/2.0/mlflow/runs/create", True),
    ("POST", "/api/2.0/mlflow/runs/log-batch", True),
    ("POST", "/api/2.0/mlflow/experiments/create", True),
    ("POST", "/api/2.0/mlflow/registered-models/create", True),
    ("PATCH", "/api/2.0/mlflow/registered-models/update", True),
    ("DELETE", "/api/2.0/mlflow/registered-models/delete", True),
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/x/config.yaml", True),
])
def test_what_counts_as_a_write(method, path, writes):
    assert is_write(method, path) is writes


def test_roles_come_from_roles_json_and_default_to_reviewer(tmp_path, monkeypatch):
    f = tmp_path / "roles.json"
    f.write_text(json.dumps({"tina": "trainer", "rex": "reviewer"}))
    monkeypatch.setenv("CLINFUSE_SERVER_ROLES", str(f))
    assert (role_of("tina"), role_of("rex"), role_of("someone-else")) == ("trainer", "reviewer", "reviewer")
    f.write_text(json.dumps({"tina": "reviewer"}))  # a change is seen without a restart
    import os

    os.utime(f, ns=(1, 10**18))
    assert role_of("tina") == "reviewer"
    monkeypatch.setenv("CLINFUSE_SERVER_ROLES", str(tmp_path / "missing.json"))
    assert role_of("tina") == "reviewer"
