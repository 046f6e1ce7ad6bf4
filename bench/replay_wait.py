"""What ``WAIT`` costs a console: ``SentinelReplayStore.add`` with ``store_wait_replicas`` 0 and 1.

Starts a primary, a replica and three Sentinels on loopback (tests/sentinel_helpers.py), then
times ``N`` adds for each setting, twice, alternating. Run it alone, not under ``make bench``:

    .venv/bin/python bench/replay_wait.py [N]

Prints median, p99 and max per setting and how many marks were not acknowledged in time.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sentinel_helpers import running_group

from consoleproxy.policy.replay_redis import SentinelReplayStore
from consoleproxy.policy.replay_url import parse_store_url


async def measure(url: str, replicas: int, n: int) -> str:
    unacked: list[int] = []
    store = SentinelReplayStore(
        parse_store_url(url), wait_replicas=replicas, wait_timeout=0.1,
        on_unacknowledged=lambda: unacked.append(1),
    )
    try:
        for i in range(200):  # connections open, code paths warm
            await store.add(f"warm-{replicas}-{i}-{time.time()}", time.time() + 60)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            assert await store.add(f"k-{replicas}-{i}-{t0}", time.time() + 60)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        await store.close()
    times.sort()
    return (
        f"store_wait_replicas={replicas} (timeout 100 ms): n={n} median {statistics.median(times):.3f} ms, "
        f"p99 {times[int(n * 0.99)]:.3f} ms, max {times[-1]:.3f} ms, unacknowledged {len(unacked)}"
    )


async def main(n: int) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/setup-system.sh)")
    with tempfile.TemporaryDirectory() as d:
        async with running_group(binary, Path(d)) as group:
            for replicas in (0, 1, 0, 1):
                print(await measure(group.url(), replicas, n), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
