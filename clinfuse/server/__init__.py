"""The team's audit server: MLflow on PostgreSQL with accounts and two roles (trainer, reviewer).

``clinfuse server init | start | stop | user add`` (:mod:`.team`); the MLflow app with the reviewer
guard (:mod:`.app`); the PostgreSQL cluster it owns (:mod:`.postgres`). Needs the ``server`` extra
(``pip install 'clinfuse[server]'``: mlflow[auth], psycopg) and PostgreSQL. See docs/deployment.md.
"""

from .postgres import Cluster, ServerError
from .team import ROLES, TeamServer, add_user, init_server, serve, stop_server

__all__ = ["TeamServer", "init_server", "serve", "stop_server", "add_user", "ROLES", "ServerError", "Cluster"]
