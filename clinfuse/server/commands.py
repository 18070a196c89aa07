"""``clinfuse server init | start | stop | user add``: the parsers and thin handlers."""

from __future__ import annotations

import sys

from .team import ROLES


def add_parsers(sub, formatter, epilog: str) -> None:
    """Add ``server`` and its subcommands to the ``clinfuse`` parser's subparsers."""
    srv = sub.add_parser("server", help="a team's MLflow server on PostgreSQL, with accounts",
                         description="A team's audit server: MLflow on PostgreSQL, proxied artifacts, MLflow's "
                         "authentication and two roles (trainer: creates runs and registers models; reviewer: reads "
                         "everything, changes nothing). Clients use MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD. See docs/deployment.md.", epilog=epilog, formatter_class=formatter)
    ss = srv.add_subparsers(dest="server_command", metavar="<subcommand>", required=True)
    i = ss.add_parser("init", help="create a server folder: database, auth config, admin",
                      description="Create DIR with a PostgreSQL cluster (initdb; run as the 'postgres' user when "
                      "clinfuse runs as root), the databases of MLflow and of its accounts, and the MLflow admin "
                      "with a generated password written to DIR/admin-password (readable by its owner only).",
                      epilog=epilog)
    i.add_argument("dir", metavar="DIR", help="the server folder (new or empty)")
    i.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default 5000)")
    i.add_argument("--db-url", metavar="URL", help="use an existing PostgreSQL server instead of a new cluster, "
                   "e.g. postgresql+psycopg://mlflow@db.hospital:5432 (password in PGPASSWORD; databases mlflow "
                   "and mlflow_auth must exist)")
    i.add_argument("--artifacts", metavar="DIR_OR_URL",
                   help="artifact storage (default DIR/artifacts; an object store such as s3://bucket/clinfuse)")
    s = ss.add_parser("start", help="run the server in the foreground (Ctrl-C stops it)",
                      description="Start PostgreSQL and the MLflow server (basic auth + roles) on 127.0.0.1 and stay in "
                      "the foreground; Ctrl-C or `clinfuse server stop DIR` stops both cleanly. Put a reverse "
                      "proxy with TLS in front of it for other machines (docs/deployment.md).", epilog=epilog)
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--port", type=int, help="port (default: the one given at init)")
    s.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    t = ss.add_parser("stop", help="stop a running server and its database", epilog=epilog)
    t.add_argument("dir", metavar="DIR")
    u = ss.add_parser("user", help="manage accounts", epilog=epilog)
    us = u.add_subparsers(dest="user_command", metavar="<action>", required=True)
    a = us.add_parser("add", help="create an account with a role", epilog=epilog,
                      description="Create an MLflow account on the running server. trainer: creates runs and registers "
                      "models in the team's experiments; reviewer: reads everything, changes nothing.")
    a.add_argument("dir", metavar="DIR")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--role", choices=ROLES, required=True)
    im = ss.add_parser("import-runs", help="copy the runs of an embedded store onto a server", epilog=epilog,
                       description="Copy every run (params, tags, metric histories, artifacts, status, times) of the "
                       "store --from onto the server --to, experiments matched by name; each copy is tagged "
                       "clinfuse.imported_from, so a second import skips what is there. Registered models are not "
                       "copied. Credentials: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (a trainer).")
    im.add_argument("--from", dest="src", metavar="URI", required=True, help="source store, e.g. sqlite:///mlflow.db")
    im.add_argument("--to", dest="dst", metavar="URL", required=True, help="the server, e.g. http://127.0.0.1:5000")
    im.add_argument("--experiment", action="append", metavar="NAME", help="only this experiment (repeatable)")
    a.add_argument("--password", help="the account's password (prompted for when absent; avoid it on shared "
                   "machines: it stays in the shell history)")


def init_cmd(args) -> int:
    from .team import init_server

    init_server(args.dir, port=args.port, db_url=args.db_url, artifacts=args.artifacts)
    print(f"next: clinfuse server start {args.dir}   (then: clinfuse server user add {args.dir} NAME --role trainer)")
    return 0


def start_cmd(args) -> int:
    from .team import serve

    return serve(args.dir, port=args.port, workers=args.workers, log=lambda m: print(m, flush=True))


def stop_cmd(args) -> int:
    from .team import stop_server

    print("server: stopped" if stop_server(args.dir) else "server: none was running")
    return 0


def user_add_cmd(args) -> int:
    import getpass

    from .postgres import ServerError
    from .team import add_user

    pw = args.password
    if pw is None:
        if not sys.stdin.isatty():
            raise ServerError("no --password and no terminal to ask on; give --password or run it in a terminal")
        pw = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != pw:
            raise ServerError("the two passwords differ")
    if len(pw) < 12:
        raise ServerError("a password needs at least 12 characters (MLflow's rule)")
    add_user(args.dir, args.name, args.role, pw)
    print(f"user {args.name} created as {args.role}; clients: MLFLOW_TRACKING_USERNAME={args.name} "
          "MLFLOW_TRACKING_PASSWORD=... clinfuse train --tracking-uri URL ...")
    return 0


def import_cmd(args) -> int:
    from .migrate import import_runs

    print(import_runs(args.src, args.dst, experiments=args.experiment, log=lambda m: print(m, flush=True)).line())
    return 0


def handler(args):
    if args.server_command == "user":
        return user_add_cmd
    return {"init": init_cmd, "start": start_cmd, "stop": stop_cmd, "import-runs": import_cmd}[args.server_command]


__all__ = ["add_parsers", "handler"]
