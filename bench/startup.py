"""Start-up: how long a pool of N workers takes to be pre-heated (every worker free).

Each sample starts a pool as ``damops run`` does (``damops_suite.DamopsPool``:
scheduler, housekeeping, supervisor) and times ``supervisor.start()`` -> the
scheduler sees every worker free; then stops it. Standalone:

    .venv/bin/python bench/startup.py --database-url URL [--workers 16] [--samples 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from damops_suite import DamopsPool

from damops.db import migrate


async def one_start(url: str, workers: int, pool_name: str) -> float:
    pool = DamopsPool(url, workers, pool_name)
    try:
        await pool.start(timeout=120, poll_interval=0.005)
        return pool.preheat_seconds
    finally:
        await pool.stop()


async def run_startup(url: str, workers: int, samples: int, run_tag: str) -> dict[str, Any]:
    await asyncio.to_thread(migrate, url)
    seconds = [await one_start(url, workers, f"bench-start-{run_tag}-{i}") for i in range(samples)]
    return {
        "workers": workers,
        "samples_seconds": [round(s, 3) for s in seconds],
        "median_seconds": round(statistics.median(seconds), 3),
        "max_seconds": round(max(seconds), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", required=True)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--samples", type=int, default=3)
    args = p.parse_args()
    result = asyncio.run(run_startup(args.database_url, args.workers, args.samples, str(int(time.time()))))
    print(result)


if __name__ == "__main__":
    main()
