"""Shared helpers for the benchmark: the server, databases, statistics, machine load."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def prefetch_label(depth: int) -> str:
    """'' off, ' prefetch' at depth 1 (WORKER_PREFETCH alone), ' prefetch depth N' deeper."""
    return "" if not depth else " prefetch" + (f" depth {depth}" if depth > 1 else "")


def prefetch_setting(depth: int) -> str:
    """How a utilisation line names WORKER_PREFETCH (and its depth): off and on padded alike."""
    return "prefetch off" if not depth else "prefetch on " if depth == 1 else prefetch_label(depth).strip()


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` (dropping any old one) and return its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(admin_url, dbname=name)


def as_uri(conninfo: str) -> str:
    """A postgresql:// URI for drivers that want one (asyncpg), Unix socket included."""
    params = conninfo_to_dict(conninfo)
    from urllib.parse import quote

    user = quote(str(params.get("user", "postgres")))
    password = params.get("password")
    auth = user + (":" + quote(str(password)) if password else "")
    host = str(params.get("host", ""))
    port = params.get("port")
    dbname = quote(str(params.get("dbname", "postgres")))
    if host.startswith("/"):
        query = f"?host={quote(host)}" + (f"&port={port}" if port else "")
        return f"postgresql://{auth}@/{dbname}{query}"
    return f"postgresql://{auth}@{host}{':' + str(port) if port else ''}/{dbname}"


def server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def server_settings(url: str, names: list[str]) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def latency_summary(latencies_ms: list[float]) -> dict[str, Any]:
    if not latencies_ms:
        return {"samples": 0}
    return {
        "samples": len(latencies_ms),
        "p50_ms": round(percentile(latencies_ms, 50), 3),
        "p90_ms": round(percentile(latencies_ms, 90), 3),
        "p99_ms": round(percentile(latencies_ms, 99), 3),
        "max_ms": round(max(latencies_ms), 3),
        "mean_ms": round(statistics.fmean(latencies_ms), 3),
    }


def latency_block(
    start_ms: list[float],
    commit_ms: list[float],
    after_commit_ms: list[float],
    done_ms: list[float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Enqueue -> start summary, with the raw samples kept so that rounds can be merged.

    start_ms: just before the INSERT -> the job starts; commit_ms: the INSERT+COMMIT
    itself; after_commit_ms: COMMIT returned -> start; done_ms: -> recorded as done."""
    block = latency_summary(start_ms)
    block["insert_commit_p50_ms"] = latency_summary(commit_ms).get("p50_ms")
    block["commit_to_start_p50_ms"] = latency_summary(after_commit_ms).get("p50_ms")
    block["commit_to_start_p99_ms"] = latency_summary(after_commit_ms).get("p99_ms")
    if done_ms:
        block["enqueue_to_success_p50_ms"] = latency_summary(done_ms).get("p50_ms")
        block["enqueue_to_success_p99_ms"] = latency_summary(done_ms).get("p99_ms")
    block.update(extra)
    block["raw"] = {
        "start_ms": [round(x, 3) for x in start_ms],
        "commit_ms": [round(x, 3) for x in commit_ms],
        "after_commit_ms": [round(x, 3) for x in after_commit_ms],
        "done_ms": [round(x, 3) for x in done_ms or []],
    }
    return block


def merge_latency(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    raws = [b["raw"] for b in blocks if "raw" in b]
    extra = {k: v for k, v in blocks[0].items() if k in ("pause_ms",)}
    extra["not_success"] = sum(b.get("not_success", 0) for b in blocks)
    extra["missing"] = sum(b.get("missing", 0) for b in blocks)
    return latency_block(
        *([x for r in raws for x in r[key]] for key in ("start_ms", "commit_ms", "after_commit_ms")),
        [x for r in raws for x in r["done_ms"]],
        **extra,
    )


def throughput_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of the repeats (and all of them), operations/s."""
    rates = [r["ops_per_s"] for r in runs]
    return {
        "ops_per_s": round(statistics.median(rates), 1),
        "min_ops_per_s": round(min(rates), 1),
        "max_ops_per_s": round(max(rates), 1),
        "runs": runs,
    }


def load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {
        "loadavg_1m": round(one, 2),
        "loadavg_5m": round(five, 2),
        "loadavg_15m": round(fifteen, 2),
        "uptime": uptime(),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


@dataclass
class Timed:
    """The result of waiting for a batch: seconds from the enqueue to all done."""

    ops: int
    seconds: float
    insert_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "seconds": round(self.seconds, 4),
            "insert_seconds": round(self.insert_seconds, 4),
            "ops_per_s": round(self.ops / self.seconds, 1) if self.seconds > 0 else None,
        }


async def wait_until(check: Callable[[], Awaitable[bool]], poll_interval: float, timeout: float, what: str) -> None:
    """Call ``check`` every ``poll_interval`` seconds until it is true."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(poll_interval)
