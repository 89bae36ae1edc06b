"""/metrics benchmark: what one scrape costs at 1,000 and at 100,000 jobs.

    .venv/bin/python bench/bench_metrics.py            # SQLite, and PostgreSQL when reachable
    .venv/bin/python bench/bench_metrics.py --quick    # 1,000 and 10,000 jobs

"ours" is the collector /metrics runs (web.metrics.QueueCollector: counts from status_counts,
which triggers keep, plus the newest 1,000 succeeded jobs through an index). "reference" is
what a scrape ran before: COUNT(*) … GROUP BY status over jobs and training_runs, plus the same
latency query. Both are timed in interleaved rounds on the same database; the figure that
matters is how each grows from the small table to the large one (target: ours flat).

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.orm import Session

from core.db import Base, Job, JobStatus, TrainingRun, make_engine
from core.db.counts import fold
from core.runtime.machine import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_web import postgres_schema

STATUSES = [JobStatus.SUCCEEDED] * 90 + [JobStatus.FAILED] * 6 + [JobStatus.CANCELED] * 4


def fill(engine: Engine, total: int) -> None:
    """``total`` jobs, mostly finished, 50 queued and 4 running, inserted in chunks (the triggers
    count each row), then folded as the reaper would."""
    now = datetime.now(UTC)
    have = 0
    with Session(engine) as session:
        have = session.scalar(select(func.count()).select_from(Job)) or 0
    rows = []
    for i in range(have, total):
        status = STATUSES[i % len(STATUSES)]
        if i < 54:
            status = JobStatus.QUEUED if i < 50 else JobStatus.RUNNING
        created = now - timedelta(seconds=total - i)
        rows.append(
            {
                "id": uuid.uuid4(),
                "status": status,
                "prompt": "a red circle",
                "negative_prompt": "",
                "steps": 20,
                "guidance": 4.0,
                "sampler": "dpmpp-2m",
                "seed": i,
                "width": 64,
                "height": 64,
                "num_images": 1,
                "owner": f"token:{i % 50}",
                "created_at": created,
                "finished_at": created + timedelta(seconds=3) if status.is_terminal else None,
                "attempts": 1,
                "progress_step": 0,
                "progress_total": 0,
            }
        )
    with Session(engine) as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(Job), rows[start : start + 5000])
            session.commit()
        while fold(session):
            session.commit()
        session.commit()
        if engine.dialect.name == "postgresql":
            session.execute(text("ANALYZE"))
            session.commit()


def ours(engine: Engine) -> Callable[[], object]:
    from web.metrics import QueueCollector

    class Svc:
        pass

    svc = Svc()
    svc.engine = engine  # type: ignore[attr-defined]
    collector = QueueCollector(svc)  # type: ignore[arg-type]
    return lambda: collector._from_database()


def reference(engine: Engine) -> Callable[[], object]:
    def scrape() -> object:
        with Session(engine) as session:
            out = [
                session.execute(select(m.status, func.count()).group_by(m.status)).all()
                for m in (Job, TrainingRun)
            ]
            out.append(
                session.execute(
                    select(Job.created_at, Job.finished_at)
                    .where(Job.status == JobStatus.SUCCEEDED, Job.finished_at.is_not(None))
                    .order_by(Job.finished_at.desc())
                    .limit(1000)
                ).all()
            )
            return out

    return scrape


def time_ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    sizes = (1_000, 10_000) if args.quick else (1_000, 100_000)
    print(f"CPU: {cpu_name()}, Python {platform.python_version()}")
    print(f"median of {args.rounds} scrapes, interleaved\n")
    print("| backend | jobs | ours (ms) | reference GROUP BY (ms) | reference / ours |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, postgres_schema() as pg_url:
        urls = {"sqlite": f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"}
        if pg_url:
            urls["postgresql"] = pg_url
        else:
            print("(PostgreSQL not reachable: SQLite only)", file=sys.stderr)
        for backend, url in urls.items():
            engine = make_engine(url)
            Base.metadata.create_all(engine)
            for size in sizes:
                fill(engine, size)
                a, b = ours(engine), reference(engine)
                a(), b()  # warm caches
                t_ours, t_ref = [], []
                for _ in range(3):
                    t_ours.append(time_ms(a, args.rounds // 3 or 1))
                    t_ref.append(time_ms(b, args.rounds // 3 or 1))
                mo, mr = statistics.median(t_ours), statistics.median(t_ref)
                print(f"| {backend} | {size:,} | {mo:.2f} | {mr:.2f} | {mr / mo:.1f}× |")
            engine.dispose()


if __name__ == "__main__":
    main()
