"""The team server's MLflow app: MLflow's basic-auth app plus clinfuse's two roles.

``mlflow server --app-name clinfuse-team`` (an ``mlflow.app`` entry point) serves this. MLflow's own
authentication answers 401 to anyone without a valid account. MLflow lets every signed-in user
create experiments and registered models, so roles are enforced here, in front of it:

- **trainer**: MLflow's ``default_permission`` (EDIT, set by ``clinfuse server init``): creates
  runs and registers models in the team's experiments; deleting needs MANAGE (the owner or an admin).
- **reviewer**: reads everything (runs, metrics, artifacts, explanations, model versions) and
  changes nothing: every request that would write answers 403.

Roles live in the server folder's ``roles.json`` (written by ``clinfuse server user add``, path in
``CLINFUSE_SERVER_ROLES``); a signed-in user who is in no role is a reviewer (least privilege), an
MLflow admin may do everything.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

__all__ = ["create_app", "is_write", "role_of"]

ENV_ROLES = "CLINFUSE_SERVER_ROLES"
# POST endpoints that only read: MLflow's searches, and its GraphQL endpoint (the UI's run page; its
# schema's "mutations" are searches too)
_READ_POSTS = ("search", "get", "batch-get", "get-by-name", "list", "graphql")


def is_write(method: str, path: str) -> bool:
    """Whether a request changes something. MLflow also reads by POST (``runs/search``, ...)."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return False
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return not (method == "POST" and (last.startswith("search") or last in _READ_POSTS))


_cache: dict = {"mtime": None, "roles": {}}


def role_of(user: str) -> str:
    """'trainer' or 'reviewer' (anyone not listed) from roles.json, re-read when it changes."""
    f = Path(os.environ.get(ENV_ROLES, ""))
    try:
        m = f.stat().st_mtime_ns
    except OSError:
        return "reviewer"
    if _cache["mtime"] != m:
        _cache["roles"] = json.loads(f.read_text() or "{}")
        _cache["mtime"] = m
    return _cache["roles"].get(user, "reviewer")


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, pw


def _refused(header: str | None, method: str, path: str) -> bool:
    """A signed-in reviewer asking to write. Cheap checks first: the password (PBKDF2) is checked
    only for a write by someone who is not a trainer; a wrong one is left to MLflow's 401."""
    from mlflow.server.auth import store

    if not is_write(method, path):
        return False
    cred = _basic(header)
    if cred is None or role_of(cred[0]) == "trainer":
        return False
    if not store.authenticate_user(*cred):
        return False
    return not store.get_user(cred[0]).is_admin


def create_app(app=None):
    """MLflow's basic-auth app with the reviewer guard outermost (ASGI under uvicorn, else Flask)."""
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as auth_create_app

    served = auth_create_app(app or flask_app)
    body = json.dumps({"error_code": "PERMISSION_DENIED",
                       "message": "reviewers read and change nothing (clinfuse server role 'reviewer')"}).encode()

    if hasattr(served, "add_middleware"):  # FastAPI (uvicorn): covers the Flask routes mounted in it too
        from starlette.middleware.base import BaseHTTPMiddleware
        from starlette.responses import Response

        async def guard(request, call_next):
            if _refused(request.headers.get("authorization"), request.method, request.url.path):
                return Response(body, status_code=403, media_type="application/json")
            return await call_next(request)

        served.add_middleware(BaseHTTPMiddleware, dispatch=guard)
        return served

    from flask import Response as FlaskResponse
    from flask import request

    @served.before_request
    def _guard():
        if _refused(request.headers.get("Authorization"), request.method, request.path):
            return FlaskResponse(body, status=403, mimetype="application/json")
        return None

    return served
