"""Worker benchmark: what batching across jobs buys, and what the service costs, in one run.

    .venv/bin/python bench/bench_worker.py               # 16 jobs, the shipped model, ~2 min
    .venv/bin/python bench/bench_worker.py --jobs 8 --steps 10   # quicker

With one real worker (``dq worker``) and the shipped default model, it measures:

1. N one-image jobs run one at a time (DQ_MAX_BATCH_SIZE=1): what AUTOMATIC1111's API and
   ComfyUI do, a job after a job;
2. the same N jobs with batching across jobs (DQ_MAX_BATCH_SIZE=N);
3. in-process ``LatentDiffusion.generate()`` on the same prompts and seeds, at batch N and at
   batch 1: the limit the service can approach.

Jobs are committed in one transaction and published together, so all N wait when the worker
takes the first. Throughput is N / (last finish − first submit); latency is finish − submit per
job. Uses PostgreSQL and Redis when they answer (the production topology), else SQLite and the
server-less broker. Not a test: it prints a table.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.db import Base, Job, JobStatus, make_engine  # noqa: E402
from core.db.session import session_scope  # noqa: E402
from core.queue.dispatch import publish_job  # noqa: E402
from core.runtime.machine import cpu_name  # noqa: E402
from core.runtime.settings import Settings  # noqa: E402
from core.services.jobs import JobRequest, submit_job  # noqa: E402

COLORS = ["red", "blue", "green", "white", "yellow", "purple", "orange", "black"]
SHAPES = ["circle", "square", "triangle"]


def prompts(n: int) -> list[str]:
    return [f"a small {COLORS[i % 8]} {SHAPES[i % 3]} in the center" for i in range(n)]


def topology(tmp: Path) -> tuple[str, dict[str, str]]:
    import redis
    from sqlalchemy import create_engine, text

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/14", socket_connect_timeout=1).flushdb()
        schema = f"dq_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
        return "PostgreSQL + Redis", {
            "DQ_DATABASE_URL": url,
            "DQ_BROKER_URL": "redis://127.0.0.1:6379/14",
        }
    except Exception:
        return "SQLite + SQLAlchemy broker", {
            "DQ_DATABASE_URL": f"sqlite:///{tmp / 'dq.sqlite3'}",
            "DQ_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.sqlite3'}",
        }


def start_worker(
    env: dict[str, str], tmp: Path, batch: int, threads: int | None = None, tag: str = ""
) -> subprocess.Popen[bytes]:
    log = tmp / f"worker-{batch}{tag}.log"
    extra = ["--threads", str(threads)] if threads else []
    name = ["--name", f"bench{tag}@%h"] if tag else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "worker", "--queues", "generate", *extra, *name],
        cwd=tmp,
        env={**os.environ, **env, "DQ_MAX_BATCH_SIZE": str(batch), "PYTHONPATH": str(ROOT)},
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


def run_jobs(settings: Settings, engine, publisher, reqs: list[JobRequest]) -> list[Job]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        ids = [submit_job(s, r, "token:bench", settings)[0].id for r in reqs]
    for job_id in ids:
        publish_job(engine, publisher, job_id)
    return wait_for_jobs(engine, ids)


def wait_for_jobs(engine, ids: list[uuid.UUID], timeout: float | None = None) -> list[Job]:  # type: ignore[no-untyped-def]
    """The jobs once none is queued or running; exits naming failures, or after ``timeout``."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        with Session(engine) as s:
            left = s.scalar(
                select(func.count()).where(
                    Job.id.in_(ids), Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
                )
            )
            if left == 0:
                jobs = list(s.scalars(select(Job).where(Job.id.in_(ids))))
                failed = [j.error for j in jobs if j.status is not JobStatus.SUCCEEDED]
                if failed:
                    raise SystemExit(f"jobs failed: {failed[:3]}")
                return jobs
        time.sleep(0.5)  # poll gently: this process shares the CPU with the worker
    raise SystemExit("jobs did not finish in time")


def service(
    env: dict[str, str], tmp: Path, batch: int, n: int, steps: int, seed0: int
) -> dict[str, float]:
    from core.queue.broker import CeleryPublisher

    settings = Settings.from_env({**env, "DQ_MAX_BATCH_SIZE": str(batch)})
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    publisher = CeleryPublisher.from_settings(settings)
    proc = start_worker(env, tmp, batch)
    try:
        # Warm-up: the worker loads the model on its first job.
        run_jobs(
            settings, engine, publisher, [JobRequest(prompt="a red circle", steps=steps, seed=1)]
        )
        reqs = [JobRequest(prompt=p, steps=steps, seed=seed0 + i) for i, p in enumerate(prompts(n))]
        jobs = run_jobs(settings, engine, publisher, reqs)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        engine.dispose()
    log = (tmp / f"worker-{batch}.log").read_text(errors="replace")
    for line in log.splitlines():
        if "batch done" in line or "running " in line:
            print(f"  [max batch {batch}] {line.split('] ')[-1]}", file=sys.stderr)
    start = min(j.created_at for j in jobs)
    end = max(j.finished_at for j in jobs if j.finished_at)
    lat = sorted((j.finished_at - j.created_at).total_seconds() for j in jobs if j.finished_at)
    return {
        "img_s": n / (end - start).total_seconds(),
        "p50": statistics.median(lat),
        "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
    }


def scaling(
    env: dict[str, str], tmp: Path, n: int, steps: int, seed0: int, batch: int, layout: list[int]
) -> float:
    """images/s of the service with one worker per entry of ``layout`` (its torch threads), all
    on one queue of ``n`` one-image jobs, batches of at most ``batch``."""
    from core.queue.broker import CeleryPublisher

    settings = Settings.from_env({**env, "DQ_MAX_BATCH_SIZE": str(batch)})
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    publisher = CeleryPublisher.from_settings(settings)
    tag = "-" + "x".join(map(str, layout))
    procs = [
        start_worker(env, tmp, batch, threads, f"{tag}-{k}") for k, threads in enumerate(layout)
    ]
    try:
        # Warm-up: every worker loads the model on its first job. Jobs of different step counts
        # cannot share a batch, so each claim takes one; repeat until every worker has run one.
        logs = [tmp / f"worker-{batch}{tag}-{k}.log" for k in range(len(layout))]
        for attempt in range(10):
            run_jobs(
                settings,
                engine,
                publisher,
                [
                    JobRequest(prompt="a red circle", steps=steps + k + 1, seed=attempt)
                    for k in range(2 * len(layout))
                ],
            )
            if all("running " in log.read_text(errors="replace") for log in logs):
                break
        reqs = [JobRequest(prompt=p, steps=steps, seed=seed0 + i) for i, p in enumerate(prompts(n))]
        jobs = run_jobs(settings, engine, publisher, reqs)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        engine.dispose()
    start = min(j.created_at for j in jobs)
    end = max(j.finished_at for j in jobs if j.finished_at)
    return n / (end - start).total_seconds()


def in_process(n: int, steps: int, seed0: int, batch: int) -> float:
    import torch

    from core.diffusion.pipeline import LatentDiffusion
    from core.services.model_versions import DEFAULT_MODEL_DIR

    model = LatentDiffusion.load(DEFAULT_MODEL_DIR, device="cpu")
    ps = prompts(n)
    model.generate(ps[:batch], steps=steps, seeds=list(range(batch)))  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch):
            model.generate(
                ps[i : i + batch], steps=steps, seeds=[seed0 + k for k in range(i, i + batch)]
            )
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--scaling-only",
        action="store_true",
        help="Only the worker-scaling table (workers × torch threads on one host).",
    )
    ap.add_argument("--scaling-batch", type=int, default=4, help="DQ_MAX_BATCH_SIZE for scaling.")
    args = ap.parse_args()
    n, steps = args.jobs, args.steps
    import torch

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        name, env = topology(tmp)
        env |= {
            "DQ_STORAGE_URL": f"file://{tmp / 'objects'}",
            "DQ_MAX_IMAGES_PER_JOB": "16",
            "DQ_MODEL_CACHE_DIR": str(tmp / "models"),
            "DQ_SECRET_KEY": "bench",
        }
        # Workers × threads on this host, each layout on the same queue; the noisy machine is
        # measured twice, in alternating order, and the better run of each layout is kept.
        layouts = {
            "1 worker × 1 thread": [1],
            "1 worker × 2 threads": [2],
            "2 workers × 1 thread": [1, 1],
        }
        rates: dict[str, float] = {}
        for name_ in [*layouts, *reversed(layouts)]:
            rate = scaling(env, tmp, n, steps, 2000, args.scaling_batch, layouts[name_])
            rates[name_] = max(rates.get(name_, 0.0), rate)
        if args.scaling_only:
            print_scaling(rates, n, steps, args.scaling_batch, name)
            return
        # The machine is shared and noisy: the in-process reference runs before and after the
        # service, and the better figure (the harder target) is kept.
        ref_batch, ref_one = in_process(n, steps, 1000, n), in_process(n, steps, 1000, 1)
        one = service(env, tmp, 1, n, steps, 1000)
        batched = service(env, tmp, n, n, steps, 1000)
    ref_batch = max(ref_batch, in_process(n, steps, 1000, n))
    ref_one = max(ref_one, in_process(n, steps, 1000, 1))
    print_scaling(rates, n, steps, args.scaling_batch, name)

    print(f"\n**Worker benchmark** — {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {name}; shipped model, DPM-Solver++ {steps} steps, "
          f"guidance 4, {n} one-image jobs waiting\n")  # fmt: skip
    print("| mode | images/s | p50 latency s | p95 latency s | vs one-at-a-time |")
    print("|---|---|---|---|---|")
    print(f"| service, one job at a time (A1111/ComfyUI style) | {one['img_s']:.2f} | "
          f"{one['p50']:.1f} | {one['p95']:.1f} | 1.00× |")  # fmt: skip
    print(f"| service, batching across jobs (max {n}) | {batched['img_s']:.2f} | "
          f"{batched['p50']:.1f} | {batched['p95']:.1f} | "
          f"{batched['img_s'] / one['img_s']:.2f}× |")  # fmt: skip
    print(f"| in-process generate(), batch {n} (the limit) | {ref_batch:.2f} | | | "
          f"{ref_batch / one['img_s']:.2f}× |")  # fmt: skip
    print(f"| in-process generate(), batch 1 | {ref_one:.2f} | | | {ref_one / one['img_s']:.2f}× |")
    speedup, efficiency = batched["img_s"] / one["img_s"], batched["img_s"] / ref_batch
    print(f"\nbatching / one-at-a-time: {speedup:.2f}× (target ≥ 3×); "
          f"service / in-process at batch {n}: {efficiency:.0%} (target ≥ 85%)")  # fmt: skip


def print_scaling(rates: dict[str, float], n: int, steps: int, batch: int, name: str) -> None:
    import torch

    base = rates["1 worker × 1 thread"]
    print(
        f"\n**Worker scaling** — {cpu_name()}, torch {torch.__version__}; {name}; shipped "
        f"model, {steps} steps, {n} one-image jobs waiting, batches of at most {batch}\n"
    )
    print("| layout | images/s | vs 1 worker × 1 thread |")
    print("|---|---|---|")
    for layout, rate in rates.items():
        print(f"| {layout} | {rate:.2f} | {rate / base:.2f}× |")
    two = rates["2 workers × 1 thread"] / base
    print(f"\n2 workers / 1 worker at 1 thread each: {two:.2f}× (target ≥ 1.8×)")


if __name__ == "__main__":
    main()
