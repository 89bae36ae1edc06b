"""Queue positions beyond the counted bound: how far the estimate is from the true place.

    .venv/bin/python bench/bench_positions.py                   # 20k jobs, 200 owners, PostgreSQL
    .venv/bin/python bench/bench_positions.py --jobs 100000 --owners 500

A queue is built the way service builds it: owners (a tenth of them with weight 2, a tenth with
0.5) queue bursts of jobs of two kinds of batch, through the real trigger that gives each job its
start tag (``core.db.fair_keys``), while claims take batches of up to 16 jobs the way a worker
does (the head of the fair order, then compatible jobs in the same order:
``core.queue.fairness.next_in_line``), and a few claimed jobs go back to the queue (a lost lease)
with their old tags. Batch fills and requeues are what leave gaps in an owner's tags, which the
estimate does not see.

Then, for a sample of the queued jobs more than ``POSITION_EXACT_UP_TO`` back, the estimated
place (``core.queue.fairness.places``) is compared with the true one (a full sort of the queue).
Prints the error as a share of the true place, by depth. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, select, update  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from core.db import ApiToken, Base, Job, JobStatus, make_engine, session_scope, utcnow  # noqa: E402
from core.db.models import Role  # noqa: E402
from core.queue import fairness  # noqa: E402
from core.runtime.machine import cpu_name  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_web import postgres_schema  # noqa: E402

KINDS = [(20, "dpmpp-2m"), (10, "dpmpp-3m")]


def build_queue(engine, jobs: int, owners: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    with session_scope(engine) as s:
        names = []
        for i in range(owners):
            weight = 2.0 if i % 10 == 0 else 0.5 if i % 10 == 1 else 1.0
            token = ApiToken(token_hash=uuid.uuid4().hex, role=Role.USER, weight=weight)
            s.add(token)
            s.flush()
            names.append(f"token:{token.id}")
    queued = 0
    start = utcnow()
    while queued < jobs:
        # A burst from a few owners, each a few jobs of one kind.
        rows = []
        for owner in rng.sample(names, k=min(len(names), 20)):
            steps, sampler = rng.choice(KINDS)
            for _ in range(rng.randint(1, 40)):
                rows.append(
                    dict(
                        id=uuid.uuid4(),
                        status=JobStatus.QUEUED,
                        prompt="p",
                        negative_prompt="",
                        steps=steps,
                        guidance=4.0,
                        sampler=sampler,
                        seed=1,
                        width=32,
                        height=32,
                        num_images=1,
                        progress_total=steps,
                        owner=owner,
                        created_at=start,
                    )
                )
        with session_scope(engine) as s:
            s.execute(insert(Job), rows)
        queued += len(rows)
        # Claims take a few batches while the queue fills: heads and fills, some put back.
        with session_scope(engine) as s:
            for _ in range(rng.randint(0, 6)):
                heads = fairness.next_in_line(s, 1)
                if not heads:
                    break
                batch = [heads[0].id] + [
                    r.id for r in fairness.next_in_line(s, 15, like=heads[0]) if r.id != heads[0].id
                ]
                status = JobStatus.QUEUED if rng.random() < 0.05 else JobStatus.SUCCEEDED
                s.execute(update(Job).where(Job.id.in_(batch)).values(status=JobStatus.RUNNING))
                s.execute(update(Job).where(Job.id.in_(batch)).values(status=status))
                queued -= len(batch) if status is JobStatus.SUCCEEDED else 0


def measure(engine, sample: int, seed: int) -> list[tuple[int, int, bool]]:  # type: ignore[no-untyped-def]
    """(true place, reported place, exact?) for a sample of queued jobs."""
    rng = random.Random(seed)
    with Session(engine) as s:
        order = s.execute(
            select(Job.id, Job.fair_key, Job.created_at)
            .where(Job.status == JobStatus.QUEUED)
            .order_by(*fairness.ORDER)
        ).all()
        picks = sorted(rng.sample(range(len(order)), k=min(sample, len(order))))
        out = []
        for i in picks:
            place = fairness.places(s, [order[i]])[order[i].id]
            out.append((i, place.ahead, place.exact))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--owners", type=int, default=200)
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    def run(url: str, backend: str) -> None:
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        t0 = time.perf_counter()
        build_queue(engine, args.jobs, args.owners, args.seed)
        built = time.perf_counter() - t0
        rows = measure(engine, args.sample, args.seed)
        engine.dispose()
        exact = [r for r in rows if r[2]]
        assert all(t == got for t, got, _ in exact), "a counted place is wrong"
        bands: dict[str, list[float]] = defaultdict(list)
        for true, got, is_exact in rows:
            if is_exact:
                continue
            band = next(b for b in (2_000, 10_000, 50_000, 200_000, 10**9) if true < b)
            bands[f"< {band:,}" if band < 10**9 else "≥ 200,000"].append(abs(got - true) / true)
        print(f"\nCPU: {cpu_name()}; {backend}; queue built in {built:.0f} s")
        print(
            f"{len(rows)} sampled jobs: {len(exact)} within the counted bound "
            f"({fairness.POSITION_EXACT_UP_TO}), all exact\n"
        )
        print("| true place | jobs | median error | p90 error | max error |")
        print("|---|---:|---:|---:|---:|")
        for band, errors in bands.items():
            errors.sort()
            p90 = errors[int(0.9 * (len(errors) - 1))]
            print(
                f"| {band} | {len(errors)} | {statistics.median(errors):.1%} | {p90:.1%} "
                f"| {errors[-1]:.1%} |"
            )

    if args.sqlite:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            run(f"sqlite:///{d}/bench.sqlite3", "SQLite")
        return
    with postgres_schema() as url:
        if url is None:
            sys.exit("bench_positions: PostgreSQL is not reachable (use --sqlite)")
        run(url, "PostgreSQL")


if __name__ == "__main__":
    main()
