"""The ``damops`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from damops.config import ConfigError, load_settings
from damops.logs import setup_logging


def _database_url() -> str:
    from damops.db import migrate
    from damops.embedded import resolve_database_url

    settings = load_settings()
    url = resolve_database_url(settings.database_url, settings.damops_home)
    migrate(url)
    return url


def _parse_inputs(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"damops enqueue: --inputs is not valid JSON: {exc}") from None


def cmd_run(args: argparse.Namespace) -> None:
    from damops.runner import run

    overrides: dict[str, object] = {}
    if args.workers is not None:
        overrides["worker_count"] = args.workers
    if args.pool is not None:
        overrides["pool"] = args.pool
    run(load_settings(**overrides), demo=args.demo, demo_count=args.demo_count, exit_when_done=args.demo)


def cmd_enqueue(args: argparse.Namespace) -> None:
    import psycopg

    from damops.operations import enqueue

    inputs = _parse_inputs(args.inputs)  # before touching the database: bad input inserts nothing
    with psycopg.connect(_database_url()) as conn:
        op_id = enqueue(
            conn, args.trigger_function, inputs, pool=args.pool, priority=args.priority, max_attempts=args.max_attempts
        )
    print(op_id)


def cmd_status(args: argparse.Namespace) -> None:
    import psycopg

    from damops.operations import get

    with psycopg.connect(_database_url()) as conn:
        row = get(conn, args.id)
    if row is None:
        raise SystemExit(f"damops status: no operation with id {args.id}")
    print(json.dumps(row.as_dict(), indent=2, default=str))


def cmd_list(args: argparse.Namespace) -> None:
    import psycopg

    from damops.operations import Status, list_operations

    if args.status and args.status.upper() not in Status.__members__:
        raise SystemExit(f"damops list: unknown status {args.status!r}; one of {', '.join(Status.__members__)}")
    with psycopg.connect(_database_url()) as conn:
        rows = list_operations(conn, args.status.upper() if args.status else None, args.pool, args.limit)
    print(f"{'ID':>8}  {'POOL':<12} {'STATUS':<10} {'ATT':>3}  {'TRIGGER':<20} ERROR")
    for row in rows:
        print(
            f"{row.id:>8}  {row.pool:<12} {row.status:<10} {row.attempts:>3}  {row.trigger_function:<20} "
            f"{(row.error or '')[:60]}"
        )


def cmd_migrate(args: argparse.Namespace) -> None:
    from damops.db import migrate
    from damops.embedded import resolve_database_url

    settings = load_settings()
    applied = migrate(resolve_database_url(settings.database_url, settings.damops_home))
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")


def cmd_sidecar(args: argparse.Namespace) -> None:
    from damops.sidecar import main as sidecar_main

    secret = os.environ.get("DAMOPS_SECRET")
    if not secret:
        raise SystemExit("damops sidecar: DAMOPS_SECRET must be set (the channel's shared secret)")
    if args.listen is None and args.listen_fd is None:
        raise SystemExit("damops sidecar: give --listen HOST:PORT or --listen-fd N")
    sidecar_main(
        args.name or os.environ.get("HOSTNAME") or "worker",
        secret,
        args.socket,
        args.listen,
        args.listen_fd,
        args.health_port,
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from damops.worker import main as worker_main

    secret = os.environ.get("DAMOPS_SECRET")
    if not secret:
        raise SystemExit("damops worker: DAMOPS_SECRET must be set (the channel's shared secret)")
    worker_main(args.socket, secret, args.name)


def cmd_operator(args: argparse.Namespace) -> None:
    from damops.k8s.main import main as operator_main

    operator_main(args.rest)


def cmd_crd(args: argparse.Namespace) -> None:
    from damops.k8s.crdgen import main as crd_main

    raise SystemExit(crd_main(args.rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="damops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the scheduler with pre-heated local workers")
    run.add_argument("--workers", type=int, help="number of workers (default WORKER_COUNT)")
    run.add_argument("--pool", help="which pool's operations to claim (default DAMOPS_POOL)")
    run.add_argument("--demo", action="store_true", help="enqueue sample operations, show progress, exit when done")
    run.add_argument("--demo-count", type=int, default=200, help="how many sample operations --demo enqueues")
    run.set_defaults(func=cmd_run)

    enqueue = sub.add_parser("enqueue", help="create one operation")
    enqueue.add_argument("trigger_function")
    enqueue.add_argument("--inputs", default="{}", help="JSON inputs")
    enqueue.add_argument("--pool", default="default")
    enqueue.add_argument("--priority", type=int, default=0, help="lower runs first")
    enqueue.add_argument("--max-attempts", type=int, default=3)
    enqueue.set_defaults(func=cmd_enqueue)

    status = sub.add_parser("status", help="show one operation")
    status.add_argument("id", type=int)
    status.set_defaults(func=cmd_status)

    listing = sub.add_parser("list", help="list recent operations")
    listing.add_argument("--status")
    listing.add_argument("--pool")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=cmd_list)

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(func=cmd_migrate)

    sidecar = sub.add_parser("sidecar", help="run a worker's sidecar (used by run and by worker pods)")
    sidecar.add_argument("--name")
    sidecar.add_argument("--socket", default="/run/damops/worker.sock")
    sidecar.add_argument("--listen", help="HOST:PORT for the scheduler's channel")
    sidecar.add_argument("--listen-fd", type=int, help="an already listening socket (local mode)")
    sidecar.add_argument("--health-port", type=int, help="HTTP port for /readyz and /livez")
    sidecar.set_defaults(func=cmd_sidecar)

    worker = sub.add_parser("worker", help="run a worker (used by run and by worker pods)")
    worker.add_argument("--socket", default="/run/damops/worker.sock")
    worker.add_argument("--name")
    worker.set_defaults(func=cmd_worker)

    operator = sub.add_parser("operator", help="run the Kubernetes operator")
    operator.add_argument("rest", nargs=argparse.REMAINDER)
    operator.set_defaults(func=cmd_operator)

    crd = sub.add_parser("crd", help="print the WorkerPool CustomResourceDefinition generated from the models")
    crd.add_argument("rest", nargs=argparse.REMAINDER)
    crd.set_defaults(func=cmd_crd)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # These two hand their options to another parser (kopf's, the generator's).
    if argv and argv[0] in ("operator", "crd"):
        setup_logging()
        if argv[0] == "operator":
            from damops.k8s.main import main as operator_main

            raise SystemExit(operator_main(argv[1:]))
        from damops.k8s.crdgen import main as crd_main

        raise SystemExit(crd_main(argv[1:]))
    args = build_parser().parse_args(argv)
    setup_logging("WARNING" if args.command in ("enqueue", "status", "list", "db") else "INFO")
    try:
        args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
