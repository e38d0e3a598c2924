"""The CLI a person runs damops by: real processes against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from damops import __version__
from damops.operations import enqueue, get


def cli(database_url, *args, check=True, stdin=None, env=None):
    environment = dict(os.environ, DATABASE_URL=database_url) if database_url else dict(os.environ)
    environment.pop("DAMOPS_PERIODIC", None)
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "damops", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def user_error(result, *fragments):
    """One line naming the problem, exit code 2, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def count(conn):
    return conn.execute("SELECT count(*) FROM damops.operations").fetchone()[0]


def test_enqueue_with_every_option_and_inputs_from_a_file_or_stdin(database_url, conn, tmp_path):
    inputs = tmp_path / "inputs.json"
    inputs.write_text('{"width": 256}')
    op_id = int(
        cli(
            database_url,
            "enqueue",
            "render_rendition",
            "--inputs",
            f"@{inputs}",
            "--pool",
            "images",
            "--priority",
            "-3",
            "--max-attempts",
            "5",
            "--delay",
            "10m",
            "--unique-key",
            "asset-1",
        ).stdout
    )
    row = get(conn, op_id)
    assert (row.inputs, row.pool, row.priority, row.max_attempts, row.unique_key) == (
        {"width": 256},
        "images",
        -3,
        5,
        "asset-1",
    )
    assert 590 < (row.run_after - row.created).total_seconds() < 610
    again = cli(database_url, "enqueue", "render_rendition", "--unique-key", "asset-1").stdout
    assert int(again) == op_id
    piped = int(cli(database_url, "enqueue", "noop", "--inputs", "-", stdin='{"from": "stdin"}').stdout)
    assert get(conn, piped).inputs == {"from": "stdin"} and get(conn, piped).max_attempts is None
    at = int(cli(database_url, "enqueue", "noop", "--at", "2099-01-01T00:00:00+00:00").stdout)
    assert get(conn, at).run_after.year == 2099


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["enqueue", "noop", "--inputs", "NaN"], "NaN"),
        (["enqueue", "noop", "--inputs", '{"a": Infinity}'], "Infinity"),
        (["enqueue", "noop", "--inputs", '"\\ud800"'], "lone surrogate"),
        (["enqueue", "noop", "--inputs", "[" * 5000 + "]" * 5000], "nested"),
        (["enqueue", "noop", "--inputs", "[" * 100 + "]" * 100], "nested deeper than 64"),
        (["enqueue", "noop", "--inputs", "{not json"], "--inputs is not valid JSON"),
        (["enqueue", "noop", "--inputs", "@/nonexistent/inputs.json"], "cannot read the file"),
        (["enqueue", ""], "trigger_function must be a non-empty name"),
        (["enqueue", "noop", "--priority", "99999999999"], "priority must be between"),
        (["enqueue", "noop", "--max-attempts", "0"], "max_attempts"),
        (["enqueue", "noop", "--pool", ""], "pool name must not be empty"),
        (["enqueue", "noop", "--pool", "p" * 64], "at most 63"),
        (["enqueue", "noop", "--delay", "soon"], "not a duration"),
        (["enqueue", "noop", "--at", "tomorrow"], "ISO-8601"),
        (["enqueue", "noop", "--delay", "1m", "--at", "2099-01-01"], "not both"),
        (["list", "--status", "DONE"], "unknown status"),
        (["status", "abc"], "not an operation id"),
        (["status", "999999"], "no operation with id 999999"),
        (["retry"], "give operation ids"),
        (["retry", "--status", "SUCCESS"], "unknown status"),
        (["purge", "--status", "NEW", "--older-than", "1d"], "unknown status"),
        (["purge", "--status", "SUCCESS"], "--older-than"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(database_url, conn, args, fragment):
    user_error(cli(database_url, *args, check=False), fragment)
    assert count(conn) == 0


def test_bad_database_urls_are_named(database_url):
    user_error(cli("notaurl", "list", check=False), "DATABASE_URL", "not a PostgreSQL URL")
    unreachable = cli("postgresql://nobody@127.0.0.1:1/db", "enqueue", "noop", check=False)
    user_error(unreachable, "cannot connect to the database", "127.0.0.1")
    with_password = cli("postgresql://me:s3cret@127.0.0.1:1/db", "list", check=False)
    assert "s3cret" not in with_password.stderr


def test_read_commands_never_migrate(server_url):
    name = f"e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        for command in (["list"], ["status", "1"], ["stats"], ["purge", "--status", "SUCCESS", "--older-than", "1d"]):
            user_error(cli(url, *command, check=False), "has no damops schema", "damops db migrate")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regnamespace('damops')").fetchone()[0] is None
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_without_database_url_a_missing_embedded_database_is_not_created(tmp_path):
    home = tmp_path / "home"
    result = cli(None, "list", check=False, env={"DAMOPS_HOME": str(home)})
    user_error(result, "no embedded database under DAMOPS_HOME", str(home))
    assert not (home / "pgdata").exists()
    user_error(cli(None, "db", "url", check=False, env={"DAMOPS_HOME": str(home)}), "no embedded database")


def test_list_and_status_are_tables_and_json(database_url, conn):
    op_id = enqueue(conn, "render_rendition", {"width": 8}, pool="p9", priority=4)
    conn.execute(
        "UPDATE damops.operations SET status = 'FAILED', attempts = 1, error = 'RuntimeError: disk full',"
        " last_worker = 'w7', finished = now() WHERE id = %s",
        (op_id,),
    )
    conn.execute(
        "INSERT INTO damops.attempts (operation_id, attempt, worker, outcome, status, error, traceback, started)"
        " VALUES (%s, 1, 'w7', 'failure', 'FAILED', 'RuntimeError: disk full [/]', 'Traceback...', now())",
        (op_id,),
    )
    table = cli(database_url, "list").stdout
    assert "render_rendition" in table and "FAILED" in table and "disk full" in table and "─" in table
    listed = json.loads(cli(database_url, "list", "--status", "failed", "--json").stdout)
    assert [r["id"] for r in listed] == [op_id] and listed[0]["last_worker"] == "w7"
    shown = cli(database_url, "status", str(op_id)).stdout
    assert "render_rendition" in shown and "p9 / 4" in shown and "last: w7" in shown and "attempts" in shown
    assert "disk full [/]" in shown and "Traceback..." in shown  # data, not markup
    detail = json.loads(cli(database_url, "status", str(op_id), "--json").stdout)
    assert detail["trigger_function"] == "render_rendition" and detail["history"][0]["traceback"] == "Traceback..."


def test_cancel_retry_purge_and_stats(database_url, conn):
    new = enqueue(conn, "noop")
    failed = enqueue(conn, "fail")
    conn.execute(
        "UPDATE damops.operations SET status = 'FAILED', error = 'S3 timeout', finished = now() WHERE id = %s",
        (failed,),
    )
    out = cli(database_url, "cancel", str(new), str(failed)).stdout
    assert f"{new} cancelled" in out and f"{failed} already FAILED" in out
    user_error(cli(database_url, "cancel", "424242", check=False), "no operation with id 424242")

    assert (
        "1 operation(s) back to NEW"
        in cli(database_url, "retry", "--status", "FAILED", "--error", "s3", "--since", "1h").stdout
    )
    assert get(conn, failed).status == "NEW"
    user_error(cli(database_url, "retry", "--status", "FAILED", "--since", "whenever", check=False), "--since")
    assert f": {new}" in cli(database_url, "retry", str(new)).stdout
    user_error(cli(database_url, "retry", str(new), check=False), "not retried", str(new))

    conn.execute("UPDATE damops.operations SET status = 'SUCCESS', finished = now() - interval '8 days'")
    dry = cli(database_url, "purge", "--status", "success", "--older-than", "7d").stdout
    assert "2 SUCCESS operation(s) would be deleted" in dry and count(conn) == 2
    stats = json.loads(cli(database_url, "stats", "--json").stdout)
    assert stats == [
        {
            "pool": "default",
            "status": "SUCCESS",
            "count": 2,
            "scheduled": 0,
            "oldest_waiting_seconds": None,
            "finished_recently": 0,
        }
    ]
    assert "default" in cli(database_url, "stats").stdout
    assert (
        "deleted 2 SUCCESS" in cli(database_url, "purge", "--status", "SUCCESS", "--older-than", "7d", "--yes").stdout
    )
    assert count(conn) == 0


def test_version_help_and_db_url(database_url):
    assert cli(database_url, "--version").stdout.strip() == f"damops {__version__}"
    help_text = cli(database_url, "--help").stdout
    assert "``" not in help_text and "examples:" in help_text
    assert cli(database_url, "db", "url").stdout.strip() == database_url


def test_operator_without_a_cluster_fails_fast_in_one_line(tmp_path):
    env = {"KUBECONFIG": str(tmp_path / "no-kubeconfig"), "HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": ""}
    started = time.monotonic()
    result = cli(None, "operator", check=False, env=env)
    user_error(result, "no Kubernetes cluster configured")
    assert time.monotonic() - started < 30


def test_operator_with_a_bad_worker_env_stops_naming_the_variable(tmp_path):
    env = {"KUBECONFIG": str(tmp_path / "no-kubeconfig"), "HOME": str(tmp_path), "DAMOPS_WORKER_ENV": '{"name": "A"}'}
    user_error(cli(None, "operator", check=False, env=env), "DAMOPS_WORKER_ENV", "list")


def test_a_reader_that_goes_away_is_not_an_error(database_url, conn):
    enqueue_many_rows = [enqueue(conn, "noop") for _ in range(300)]
    assert enqueue_many_rows
    shell = subprocess.run(
        f"{sys.executable} -m damops list --limit 300 | head -1",
        shell=True,
        env=dict(os.environ, DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr


def test_write_commands_do_not_create_an_embedded_database_either(tmp_path):
    home = tmp_path / "elsewhere"
    user_error(cli(None, "enqueue", "noop", check=False, env={"DAMOPS_HOME": str(home)}), "no embedded database")
    user_error(cli(None, "cancel", "1", check=False, env={"DAMOPS_HOME": str(home)}), "no embedded database")
    assert not home.exists() or not (home / "pgdata").exists()
