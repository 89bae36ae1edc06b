"""ETA benchmark: how far the estimated finish given at submission is from the real finish.

    .venv/bin/python bench/bench_eta.py                       # 50 jobs, under a minute
    .venv/bin/python bench/bench_eta.py --steps 20 --batch 8  # longer waits

One real worker (``dq worker``) serves the shipped default model with batches of up to
``--batch`` images. A warm-up runs a few batches, so that the worker has measured its speed
(``throughput_samples``) and said it is alive (``worker_presence``). Then a backlog of
``--backlog`` jobs is queued by one owner, and ``--jobs`` jobs follow from five other owners, one
every ``--every`` seconds (default: all at once), while the worker drains the queue. Right after
each of those jobs is committed, its estimated finish is read the way the API reads it
(``core.queue.eta.estimate``).
When all have run, each estimate is compared with the job's real ``finished_at``.

The error is |estimated − actual finish| in seconds, and as a share of the job's wait (actual
finish − submission). Jobs submitted later by other owners can pass a waiting job (fair share):
that is part of the error, as it is in service. Uses PostgreSQL and Redis when they answer,
else SQLite and the server-less broker. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from core.db import Base, Job, make_engine  # noqa: E402
from core.db.models import ThroughputSample  # noqa: E402
from core.db.session import session_scope  # noqa: E402
from core.queue.dispatch import publish_job  # noqa: E402
from core.queue.eta import DEFAULT_SECONDS_PER_IMAGE_STEP, estimate, live_workers  # noqa: E402
from core.runtime.machine import cpu_name  # noqa: E402
from core.runtime.settings import Settings  # noqa: E402
from core.services.jobs import JobRequest, submit_job  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_worker import wait_for_jobs  # noqa: E402

COLORS = ["red", "blue", "green", "white", "yellow", "purple", "orange", "black"]
SHAPES = ["circle", "square", "triangle"]
REDIS_URL = os.environ.get("DQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")


def prompt(i: int) -> str:
    return f"a small {COLORS[i % 8]} {SHAPES[i % 3]} in the center"


def topology(tmp: Path) -> tuple[str, dict[str, str]]:
    import redis
    from sqlalchemy import create_engine, text

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).flushdb()
        schema = f"dq_bench_eta_{uuid.uuid4().hex[:8]}"
        admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
        return "PostgreSQL + Redis", {"DQ_DATABASE_URL": url, "DQ_BROKER_URL": REDIS_URL}
    except Exception:
        return "SQLite + SQLAlchemy broker", {
            "DQ_DATABASE_URL": f"sqlite:///{tmp / 'dq.sqlite3'}",
            "DQ_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.sqlite3'}",
        }


def start_worker(env: dict[str, str], tmp: Path) -> subprocess.Popen[bytes]:
    log = tmp / "worker.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "worker", "--queues", "generate"],
        cwd=tmp,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while "ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def submit(settings: Settings, engine, publisher, owner: str, i: int, steps: int) -> uuid.UUID:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        job, _ = submit_job(s, JobRequest(prompt=prompt(i), steps=steps, seed=i), owner, settings)
        job_id = job.id
    publish_job(engine, publisher, job_id)
    return job_id


def predicted_finish(engine, job_id: uuid.UUID, cap: int) -> datetime | None:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return estimate(s, [job], max_batch_size=cap)[job_id].finish


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--backlog", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--every", type=float, default=0.0, help="seconds between submissions")
    args = ap.parse_args()
    import torch

    from core.queue.broker import CeleryPublisher

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        name, env = topology(tmp)
        env |= {
            "DQ_STORAGE_URL": f"file://{tmp / 'objects'}",
            "DQ_MODEL_CACHE_DIR": str(tmp / "models"),
            "DQ_SECRET_KEY": "bench",
            "DQ_MAX_BATCH_SIZE": str(args.batch),
            "DQ_MAX_ACTIVE_JOBS_PER_OWNER": "1000",
        }
        settings = Settings.from_env(env)
        engine = make_engine(settings.database_url)
        Base.metadata.create_all(engine)
        publisher = CeleryPublisher.from_settings(settings)
        proc = start_worker(env, tmp)
        try:
            # Warm-up: the model loads, full and partial batches are measured, presence is said.
            warm = [submit(settings, engine, publisher, "session:warm", i, args.steps)
                    for i in range(2 * args.batch + 1)]  # fmt: skip
            wait_for_jobs(engine, warm, timeout=900)
            time.sleep(1.0)
            backlog = [submit(settings, engine, publisher, "token:backlog", 100 + i, args.steps)
                       for i in range(args.backlog)]  # fmt: skip
            measured: list[tuple[uuid.UUID, datetime, datetime | None]] = []
            for i in range(args.jobs):
                owner = f"token:user{i % 5}"
                job_id = submit(settings, engine, publisher, owner, 1000 + i, args.steps)
                with Session(engine) as s:
                    created = s.scalar(select(Job.created_at).where(Job.id == job_id))
                assert created is not None
                measured.append((job_id, created, predicted_finish(engine, job_id, args.batch)))
                time.sleep(args.every)
            jobs = {
                j.id: j
                for j in wait_for_jobs(engine, [m[0] for m in measured] + backlog, timeout=900)
            }
            with Session(engine) as s:
                rates = s.execute(
                    select(
                        ThroughputSample.batch_size,
                        ThroughputSample.seconds_per_image_step,
                        ThroughputSample.samples,
                    ).order_by(ThroughputSample.batch_size)
                ).all()
                live = live_workers(s)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
            engine.dispose()

    errors, shares, waits, signed = [], [], [], []
    for job_id, created, predicted in measured:
        finished = jobs[job_id].finished_at
        assert finished is not None and predicted is not None
        error = (predicted - finished).total_seconds()
        wait = (finished - created).total_seconds()
        signed.append(error)
        errors.append(abs(error))
        waits.append(wait)
        shares.append(abs(error) / wait)

    print(f"\n**ETA benchmark** — {cpu_name()}, torch {torch.__version__}; {name}; shipped "
          f"model, DPM-Solver++ {args.steps} steps, batches of up to {args.batch} images, one "
          f"worker ({live} live at the end); a backlog of {args.backlog} jobs, then {args.jobs} "
          f"one-image jobs from 5 owners, one every {args.every:g} s\n")  # fmt: skip
    print("| measure | median | p90 |")
    print("|---|---|---|")
    print(f"| wait: submission → finish, s | {statistics.median(waits):.1f} | "
          f"{pct(waits, 0.9):.1f} |")  # fmt: skip
    print(f"| absolute error of the estimated finish, s | {statistics.median(errors):.1f} | "
          f"{pct(errors, 0.9):.1f} |")  # fmt: skip
    print(f"| absolute error, % of the wait | {100 * statistics.median(shares):.0f}% | "
          f"{100 * pct(shares, 0.9):.0f}% |")  # fmt: skip
    print(f"| signed error (estimate − actual), s | {statistics.median(signed):+.1f} | "
          f"{pct(signed, 0.9):+.1f} |")  # fmt: skip
    print("\nmeasured seconds per image per step (batch size: rate, samples): " + ", ".join(
        f"{b}: {r:.4f} ({n})" for b, r, n in rates
    ) + f"; default before any measurement {DEFAULT_SECONDS_PER_IMAGE_STEP}")  # fmt: skip


if __name__ == "__main__":
    main()
