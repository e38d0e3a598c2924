"""damops: operations in PostgreSQL, handled by pre-heated workers.

Every user error is one line naming the problem, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from damops import tracing
from damops.config import ConfigError, Settings, load_settings, parse_duration
from damops.logs import setup_logging

EXAMPLES = """\
examples:
  damops run --demo
  damops enqueue render_rendition --inputs '{"width": 256}' --delay 30s --unique-key asset-42
  damops enqueue render_rendition --inputs @inputs.json
  damops list --status FAILED
  damops status 42
  damops retry --status FAILED --trigger render_rendition --since 1h
  damops cancel 42 43
  damops purge --status SUCCESS --older-than 7d --yes
  damops stats

Without DATABASE_URL the commands use the embedded PostgreSQL under DAMOPS_HOME
(default: $XDG_DATA_HOME/damops or ~/.local/share/damops).
"""

READ_COMMANDS = ("list", "status", "stats")


class UserError(Exception):
    """A mistake of the person running the command: one line, exit code 2."""


# --- the database a command uses ------------------------------------------------


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    import psycopg

    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    if "password" in params:
        params["password"] = "***"
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def database_url(settings: Settings, *, create: bool) -> str:
    """DATABASE_URL, or the embedded server's; ``create=False`` refuses to make a new embedded database."""
    from damops.embedded import resolve_database_url

    if settings.database_url:
        return settings.database_url
    pgdata = Path(settings.damops_home) / "pgdata"
    if not create and not (pgdata / "PG_VERSION").exists():
        raise UserError(
            f"no embedded database under DAMOPS_HOME={settings.damops_home} yet"
            " (start one with `damops run`, or set DATABASE_URL)"
        )
    return resolve_database_url(None, settings.damops_home)


def schema_version(conn: Any) -> int:
    """The highest migration applied; 0 for a database without the damops schema."""
    exists = conn.execute("SELECT to_regclass('damops.schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM damops.schema_migrations").fetchone()
    return int(row[0]) if row else 0


def connect(command: str, *, migrate: bool) -> Any:
    """A connection for ``command``. Read commands never migrate: against an
    unmigrated database they say so; write commands migrate when behind."""
    import psycopg

    from damops.db import migrate as apply_migrations
    from damops.db import migration_files

    url = database_url(load_settings(), create=False)  # only `run` and `db migrate` create one
    try:
        conn = psycopg.connect(url, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot connect to the database at {redacted(url)}: {first}") from None
    latest = migration_files()[-1][0]
    version = schema_version(conn)
    if version < latest:
        if not migrate:
            conn.close()
            what = (
                "has no damops schema" if version == 0 else f"has schema version {version}, this damops needs {latest}"
            )
            raise UserError(f"the database at {redacted(url)} {what}: run `damops db migrate`")
        conn.close()
        apply_migrations(url)
        conn = psycopg.connect(url, connect_timeout=5, autocommit=True)
    return conn


# --- parsing what a person typed ------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON (JSON has no NaN or Infinity)")


def parse_inputs(text: str) -> object:
    """--inputs: JSON text, @file, or - for standard input."""
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--inputs {text}: cannot read the file: {exc}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise UserError(f"--inputs is not valid JSON: {exc}") from None
    except ValueError as exc:
        raise UserError(f"--inputs: {exc}") from None
    except RecursionError:
        raise UserError("--inputs is nested too deeply") from None


def parse_when(text: str, option: str) -> datetime:
    """An ISO-8601 time (without an offset: local time), or an age such as 1h meaning that long ago."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            return datetime.now(UTC) - _seconds(text)
        except ValueError:
            raise UserError(f"{option} {text!r} is neither an ISO-8601 time nor a duration like 1h") from None
    return when.astimezone() if when.tzinfo is None else when


def _seconds(text: str) -> timedelta:
    return timedelta(seconds=parse_duration(text))


def duration() -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def positive_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an operation id") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not an operation id")
    return value


def _status(text: str | None, allowed: Sequence[str]) -> str | None:
    if text is None:
        return None
    if text.upper() not in allowed:
        raise UserError(f"unknown status {text!r}; one of {', '.join(allowed)}")
    return text.upper()


# --- output ------------------------------------------------------------------


def _console() -> Any:
    from rich.console import Console

    # Piped into a file or another program: wide enough that rows stay on one line.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or 200)
    return Console(highlight=False, soft_wrap=False, width=width)


def _age(when: datetime | None) -> str:
    if when is None:
        return ""
    seconds = (datetime.now(UTC) - when).total_seconds()
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _row(table: Any, *values: str) -> None:
    """Cells as plain text: an error message such as "[/]" is data, not rich markup."""
    from rich.text import Text

    table.add_row(*(Text(value) for value in values))


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


# --- commands ------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> None:
    from damops.runner import run

    overrides: dict[str, object] = {}
    if args.workers is not None:
        overrides["worker_count"] = args.workers
    if args.pool is not None:
        overrides["pool"] = args.pool
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if args.demo and "RETRY_BACKOFF_BASE" not in os.environ:
        # The demo's flaky operations should retry within its minute, not after 30 s each.
        overrides["retry_backoff_base"] = 1.0
    ui = None
    if args.ui is not None:
        from damops.ui.server import check_address, parse_address

        try:
            ui = parse_address(args.ui)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        problem = check_address(*ui)
        if problem:
            raise UserError(f"--ui: {problem}")
    run(load_settings(**overrides), demo=args.demo, demo_count=args.demo_count, exit_when_done=args.demo, ui=ui)


def cmd_ui(args: argparse.Namespace) -> None:
    from damops.periodic import parse_schedules
    from damops.ui.app import create_app
    from damops.ui.server import check_address, serve

    settings = load_settings()
    connect("ui", migrate=False).close()  # a missing database or schema: one line now, not a 503 later
    problem = check_address(args.host, args.port)
    if problem:
        raise UserError(problem)
    url = database_url(settings, create=False)
    token = os.environ.get("DAMOPS_UI_TOKEN") or None
    app = create_app(url, token=token, schedules=parse_schedules(settings.periodic))
    mode = "actions need DAMOPS_UI_TOKEN (log in)" if token else "read-only (set DAMOPS_UI_TOKEN to allow actions)"
    print(f"damops ui: http://{args.host}:{args.port}/ on {redacted(url)}; {mode}", file=sys.stderr, flush=True)
    serve(app, args.host, args.port)


def cmd_enqueue(args: argparse.Namespace) -> None:
    from damops.operations import NewOperation, enqueue_many, operation_problem

    inputs = parse_inputs(args.inputs)  # before touching the database: bad input inserts nothing
    if args.delay is not None and args.at is not None:
        raise UserError("give --delay or --at, not both")
    run_after = None
    if args.delay is not None:
        run_after = datetime.now(UTC) + _seconds(str(args.delay))
    elif args.at is not None:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            raise UserError(f"--at {args.at!r} is not an ISO-8601 time such as 2026-01-31T09:00:00+01:00") from None
        run_after = at.astimezone() if at.tzinfo is None else at
    op = NewOperation(
        args.trigger_function, inputs, args.pool, args.priority, args.max_attempts, run_after, args.unique_key
    )
    problem = operation_problem(op)
    if problem:
        raise UserError(problem)
    with connect("enqueue", migrate=True) as conn:
        [op_id] = enqueue_many(conn, [op])
    print(op_id)


def cmd_cancel(args: argparse.Namespace) -> None:
    from damops.lifecycle import cancel

    with connect("cancel", migrate=True) as conn:
        result = cancel(conn, args.ids)
    for op_id in result.cancelled:
        print(f"{op_id} cancelled")
    for op_id in result.requested:
        print(f"{op_id} cancel requested: its worker is told to stop")
    for op_id, status in result.already_final.items():
        print(f"{op_id} already {status}: not cancelled")
    if result.not_found:
        raise UserError(f"no operation with id {', '.join(map(str, result.not_found))}")


def cmd_retry(args: argparse.Namespace) -> None:
    from damops.lifecycle import RETRYABLE_STATUSES, retry

    if not args.ids and not args.status:
        raise UserError("give operation ids, or --status FAILED|CANCELLED with optional filters")
    statuses = [_status(args.status, RETRYABLE_STATUSES)] if args.status else list(RETRYABLE_STATUSES)
    since = parse_when(args.since, "--since") if args.since else None
    until = parse_when(args.until, "--until") if args.until else None
    with connect("retry", migrate=True) as conn:
        retried = retry(
            conn,
            args.ids or None,
            statuses=[s for s in statuses if s],
            pool=args.pool,
            trigger_function=args.trigger,
            since=since,
            until=until,
            error=args.error,
        )
    print(f"{len(retried)} operation(s) back to NEW" + (f": {', '.join(map(str, retried))}" if retried else ""))
    left = sorted(set(args.ids or []) - set(retried))
    if left:
        raise UserError(
            f"not retried (not FAILED/CANCELLED, missing, or their unique key is taken): {', '.join(map(str, left))}"
        )


def cmd_purge(args: argparse.Namespace) -> None:
    from damops.lifecycle import count_purgeable, purge
    from damops.operations import FINAL_STATUSES

    status = _status(args.status, FINAL_STATUSES)
    assert status is not None
    with connect("purge", migrate=False) as conn:
        if not args.yes:
            count = count_purgeable(conn, [status], older_than=args.older_than, pool=args.pool)
            print(f"{count} {status} operation(s) would be deleted; run again with --yes to delete them")
            return
        deleted = purge(conn, [status], older_than=args.older_than, pool=args.pool)
    print(f"deleted {deleted} {status} operation(s)")


def cmd_stats(args: argparse.Namespace) -> None:
    from rich.table import Table

    from damops.lifecycle import stats

    with connect("stats", migrate=False) as conn:
        rows = stats(conn, args.pool, window=args.window)
    if args.json:
        print_json([row.__dict__ for row in rows])
        return
    table = Table(title=f"operations per pool and status (finished: last {_span(args.window)})")
    for name in ("pool", "status", "count", "scheduled", "oldest waiting", "finished", "per minute"):
        table.add_column(name, justify="left" if name in ("pool", "status") else "right")
    for row in rows:
        _row(
            table,
            row.pool,
            row.status,
            str(row.count),
            str(row.scheduled or ""),
            _span(row.oldest_waiting_seconds) if row.oldest_waiting_seconds is not None else "",
            str(row.finished_recently or ""),
            f"{row.finished_recently * 60 / args.window:.1f}" if row.finished_recently else "",
        )
    _console().print(table)


def cmd_status(args: argparse.Namespace) -> None:
    from rich.table import Table

    from damops.operations import attempts, get

    with connect("status", migrate=False) as conn:
        row = get(conn, args.id)
        history = attempts(conn, args.id) if row else []
    if row is None:
        raise UserError(f"no operation with id {args.id}")
    if args.json:
        print_json({**row.as_dict(), "history": [a.as_dict() for a in history]})
        return
    table = Table(show_header=False, title=f"operation {row.id}")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    progress = ""
    if row.progress_message or row.progress_fraction is not None:
        fraction = f"{row.progress_fraction:.0%} " if row.progress_fraction is not None else ""
        progress = f"{fraction}{row.progress_message or ''}"
    max_attempts = row.max_attempts if row.max_attempts is not None else "MAX_ATTEMPTS"
    for name, value in (
        ("status", row.status + (" (cancel requested)" if row.cancel_requested and row.status == "PROCESSING" else "")),
        ("trigger function", row.trigger_function),
        ("pool / priority", f"{row.pool} / {row.priority}"),
        ("attempts", f"{row.attempts} of {max_attempts}"),
        ("worker", row.worker or (f"(last: {row.last_worker})" if row.last_worker else "")),
        ("progress", progress),
        ("unique key", row.unique_key or ""),
        ("created", f"{row.created.isoformat()} ({_age(row.created)})"),
        ("run after", f"{row.run_after.isoformat()} ({_age(row.run_after)})" if row.run_after else ""),
        ("started", row.started.isoformat() if row.started else ""),
        ("finished", row.finished.isoformat() if row.finished else ""),
        ("inputs", json.dumps(row.inputs)),
        ("result", json.dumps(row.result) if row.result is not None else ""),
        ("error", row.error or ""),
    ):
        if value:
            _row(table, name, str(value))
    console = _console()
    console.print(table)
    if history:
        attempts_table = Table(title="attempts")
        for name in ("#", "worker", "outcome", "status", "started", "seconds", "error"):
            attempts_table.add_column(name, overflow="fold")
        for a in history:
            seconds = f"{(a.finished - a.started).total_seconds():.2f}" if a.started else ""
            _row(
                attempts_table,
                str(a.attempt),
                a.worker or "",
                a.outcome,
                a.status,
                a.started.isoformat(timespec="seconds") if a.started else "",
                seconds,
                (a.error or "")[:200],
            )
        console.print(attempts_table)
        last = history[-1]
        if last.traceback:
            # The innermost frames and the error: the end of the traceback.
            console.print(f"traceback of attempt {last.attempt} (last 20 lines):", markup=False)
            console.print("\n".join(last.traceback.splitlines()[-20:]), markup=False, highlight=False)


def cmd_list(args: argparse.Namespace) -> None:
    from rich.table import Table

    from damops.operations import Status, list_operations

    status = _status(args.status, list(Status.__members__))
    with connect("list", migrate=False) as conn:
        rows = list_operations(conn, status, args.pool, args.limit)
    if args.json:
        print_json([row.as_dict() for row in rows])
        return
    table = Table()
    for name in ("id", "pool", "status", "att", "trigger", "updated", "progress / error"):
        table.add_column(name, justify="right" if name in ("id", "att") else "left", no_wrap=True, overflow="ellipsis")
    for row in rows:
        note = row.error or row.progress_message or ""
        if row.status == "NEW" and row.run_after:
            note = f"runs {_age(row.run_after)}"
        _row(
            table,
            str(row.id),
            row.pool,
            row.status,
            str(row.attempts),
            row.trigger_function,
            _age(row.updated),
            note[:80],
        )
    _console().print(table)


def cmd_migrate(args: argparse.Namespace) -> None:
    from damops.db import migrate

    url = database_url(load_settings(), create=True)
    try:
        applied = migrate(url)
    except Exception as exc:
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot connect to the database at {redacted(url)}: {first}") from None
        raise
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")


def cmd_db_url(args: argparse.Namespace) -> None:
    settings = load_settings()
    url = database_url(settings, create=False)
    print(url)
    if not settings.database_url:
        print(
            f"(the embedded PostgreSQL under {settings.damops_home}; it runs while `damops run` does)", file=sys.stderr
        )


def cmd_sidecar(args: argparse.Namespace) -> None:
    from damops.sidecar import main as sidecar_main

    secret = os.environ.get("DAMOPS_SECRET")
    if not secret:
        raise UserError("DAMOPS_SECRET must be set (the channel's shared secret)")
    if args.listen is None and args.listen_fd is None:
        raise UserError("give --listen HOST:PORT or --listen-fd N")
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
        raise UserError("DAMOPS_SECRET must be set (the channel's shared secret)")
    worker_main(args.socket, secret, args.name)


# --- the parser ------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from damops import __version__

    parser = Parser(
        prog="damops",
        description="damops: operations in PostgreSQL, handled by pre-heated workers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"damops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    run = sub.add_parser("run", help="start the scheduler with pre-heated local workers")
    run.add_argument("--workers", type=int, help="number of workers (default WORKER_COUNT)")
    run.add_argument("--pool", help="which pool's operations to claim (default DAMOPS_POOL)")
    run.add_argument("--demo", action="store_true", help="enqueue sample operations, show progress, exit when done")
    run.add_argument("--demo-count", type=int, default=200, help="how many sample operations --demo enqueues")
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port (default DAMOPS_RUN_METRICS_PORT, 0 = off)",
    )
    run.add_argument(
        "--ui", nargs="?", const="127.0.0.1:8765", metavar="HOST:PORT", help="serve the dashboard too (127.0.0.1:8765)"
    )
    run.set_defaults(func=cmd_run)

    ui = sub.add_parser("ui", help="serve the web dashboard (read-only unless DAMOPS_UI_TOKEN is set)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=8765)
    ui.set_defaults(func=cmd_ui)

    enqueue = sub.add_parser("enqueue", help="create one operation; prints its id")
    enqueue.add_argument("trigger_function")
    enqueue.add_argument("--inputs", default="{}", help="JSON inputs, @FILE to read them from a file, - for stdin")
    enqueue.add_argument("--pool", default="default")
    enqueue.add_argument("--priority", type=int, default=0, help="lower runs first")
    enqueue.add_argument("--max-attempts", type=int, help="default: MAX_ATTEMPTS when it fails")
    enqueue.add_argument("--delay", type=duration(), help="not before this long from now (30s, 5m, 1h)")
    enqueue.add_argument("--at", help="not before this ISO-8601 time (without an offset: local time)")
    enqueue.add_argument("--unique-key", help="while an unfinished operation has this key, print its id instead")
    enqueue.set_defaults(func=cmd_enqueue)

    cancel = sub.add_parser("cancel", help="cancel operations (running ones are told to stop)")
    cancel.add_argument("ids", nargs="+", type=positive_id, metavar="ID")
    cancel.set_defaults(func=cmd_cancel)

    retry = sub.add_parser("retry", help="put FAILED or CANCELLED operations back to NEW, by id or by filter")
    retry.add_argument("ids", nargs="*", type=positive_id, metavar="ID")
    retry.add_argument("--status", help="FAILED or CANCELLED (default: both, with ids)")
    retry.add_argument("--pool")
    retry.add_argument("--trigger", help="only this trigger function")
    retry.add_argument("--since", help="finished since: ISO-8601 time, or an age such as 2h")
    retry.add_argument("--until", help="finished before: ISO-8601 time, or an age such as 10m")
    retry.add_argument("--error", help="only those whose error contains this text (any case)")
    retry.set_defaults(func=cmd_retry)

    purge = sub.add_parser("purge", help="delete finished operations and their history")
    purge.add_argument("--status", required=True, help="SUCCESS, FAILED or CANCELLED")
    purge.add_argument("--older-than", required=True, type=duration(), help="finished longer ago: 7d")
    purge.add_argument("--pool")
    purge.add_argument("--yes", action="store_true", help="really delete (without it: say how many)")
    purge.set_defaults(func=cmd_purge)

    stats = sub.add_parser("stats", help="counts, oldest waiting age and recent throughput per pool and status")
    stats.add_argument("--pool")
    stats.add_argument("--window", type=duration(), default=300.0, help="throughput window (default 5m)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)

    status = sub.add_parser("status", help="show one operation and its attempts")
    status.add_argument("id", type=positive_id)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    listing = sub.add_parser("list", help="list recent operations")
    listing.add_argument("--status")
    listing.add_argument("--pool")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=Parser, metavar="COMMAND")
    db_sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(func=cmd_migrate)
    db_sub.add_parser("url", help="print the database URL (the embedded one's without DATABASE_URL)").set_defaults(
        func=cmd_db_url
    )

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

    # Handed to their own parsers by main(); listed here for the help.
    sub.add_parser("operator", help="run the Kubernetes operator (kopf options follow)", add_help=False)
    sub.add_parser(
        "crd", help="print the WorkerPool CustomResourceDefinition generated from the models", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # These two hand their options to another parser (kopf's, the generator's).
        if argv and argv[0] in ("operator", "crd"):
            setup_logging()
            try:
                import kopf  # noqa: F401
                import kubernetes  # noqa: F401
            except ModuleNotFoundError:
                raise UserError("needs the k8s extra: pip install 'damops[k8s]'") from None
            if argv[0] == "operator":
                from damops.k8s.main import main as operator_main

                operator_main(argv[1:])
                raise SystemExit(0)
            from damops.k8s.crdgen import main as crd_main

            raise SystemExit(crd_main(argv[1:]))
        args = build_parser().parse_args(argv)
        setup_logging("INFO" if args.command == "run" else "WARNING")
        if args.command in ("run", "enqueue"):  # no-op unless DAMOPS_TRACING (the worker configures its own)
            tracing.configure("scheduler" if args.command == "run" else "cli")
        args.func(args)
    except (UserError, ConfigError) as exc:
        command = f"damops {argv[0]}" if argv and not argv[0].startswith("-") else "damops"
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(line if line.startswith("invalid configuration") else f"{command}: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:
        # `damops list | head`: the reader is gone; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
