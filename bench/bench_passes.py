"""Background work at depth: what one pass of each of the reaper's jobs costs with a thousand
jobs queued and with a million.

    .venv/bin/python bench/bench_passes.py                        # 1k, 100k and 1M on PostgreSQL
    .venv/bin/python bench/bench_passes.py --depths 1000,10000    # quicker

The queue is filled as ``bench/bench_scale.py`` fills it (one ``generate_series`` INSERT of N
queued jobs of 500 owners, their start tags and ``fair_owners`` rows), every job's message marked
sent, and each pass timed as the median of 7 on its own:

- the relay (``core.queue.dispatch.relay_once``: expired leases, the outbox, the check for lost
  messages against a broker that holds one message per queued job, due webhooks);
- folding the status counts and forgetting passed owners (``core.upkeep.reaper``'s
  ``fold_status_counts``);
- finishing ended batches (``core.services.batches.finish_batches``);
- one batch of a retention prune with nothing old enough to prune (``core.upkeep.retention``).

Each should cost the same at every depth: it touches a batch of rows, never the queue. Prints a
table; not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import database, fill  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from core.db import make_engine, migrate, session_scope  # noqa: E402
from core.queue.dispatch import relay_once  # noqa: E402
from core.runtime.machine import cpu_name  # noqa: E402
from core.runtime.settings import Settings  # noqa: E402
from core.services.batches import finish_batches  # noqa: E402
from core.storage import LocalStorage  # noqa: E402
from core.upkeep.reaper import fold_status_counts  # noqa: E402
from core.upkeep.retention import Pruner  # noqa: E402


class Broker:
    """A broker that holds one message per queued job and sends nothing anywhere."""

    def __init__(self, depth: int):
        self.depth = depth
        self.sent = 0

    def publish(self, task: str, queue: str, kwargs: dict[str, Any], countdown: Any = None) -> None:
        self.sent += 1

    def queue_depth(self, queue: str) -> int | None:
        return self.depth if queue == "generate" else 0


def median_ms(fn: Callable[[], Any], rounds: int = 7) -> float:
    fn()  # warm
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(depth: int) -> dict[str, float]:
    with database("postgresql") as url, tempfile.TemporaryDirectory() as tmp:
        migrate.upgrade(url)
        fill(url, depth, "token:1")
        # Every message sent; without the service's statement timeout (a million rows).
        raw = create_engine(url)
        with raw.begin() as c:
            c.execute(text("UPDATE jobs SET published_at = created_at"))
        with raw.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE jobs"))
        raw.dispose()
        engine = make_engine(url)
        settings = Settings.from_env({"DQ_DATABASE_URL": url})
        storage = LocalStorage(Path(tmp) / "objects", secret="bench")
        broker = Broker(depth)

        def batches() -> None:
            with session_scope(engine) as s:
                finish_batches(s)

        def prune() -> None:
            Pruner(engine, storage, settings, 30 * 86400, batch_size=100).step(1)

        out = {
            "relay pass": median_ms(lambda: relay_once(engine, broker, settings)),
            "fold counts + forget owners": median_ms(lambda: fold_status_counts(engine)),
            "finish batches": median_ms(batches),
            "retention, one batch": median_ms(prune),
        }
        assert broker.sent == 0, f"the relay sent {broker.sent} messages it should not have"
        engine.dispose()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="1000,100000,1000000")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    results = {}
    for depth in depths:
        print(f"{depth:,} queued …", file=sys.stderr, flush=True)
        results[depth] = measure(depth)
    names = list(results[depths[0]])
    print(f"\nCPU: {cpu_name()}; PostgreSQL; median of 7 passes, ms\n")
    print("| pass | " + " | ".join(f"{d:,} queued" for d in depths) + " | growth |")
    print("|---|" + "---:|" * (len(depths) + 1))
    for name in names:
        row = [results[d][name] for d in depths]
        growth = row[-1] / row[0] if row[0] else float("inf")
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + f" | ×{growth:.1f} |")


if __name__ == "__main__":
    main()
