"""Warm models: what model affinity buys with three versions and two workers, in one run.

    .venv/bin/python bench/bench_models.py                  # 96 jobs a mode, ~6 min on 2 cores
    .venv/bin/python bench/bench_models.py --jobs 48 --rounds 1     # quicker

Three model versions (the shipped checkpoint uploaded three times: the same weights, three
versions to load), two real workers (``dq worker``, one torch thread each), and each worker's
DQ_WORKER_MODEL_MEMORY_MB sized to hold two of the three (``--models-per-worker``). Eight owners
queue one-image jobs on a version drawn at random (seeded), all committed at once and published
together, and the two workers run them:

- **affinity, reading presence**: DQ_MODEL_AFFINITY_WAIT_SECONDS at its default (10 s), and a
  worker leaves a head whose version another worker holds to that worker when a job for a
  version nobody holds is within the same rounds (the default);
- **affinity, presence not read**: the same with DQ_MODEL_AFFINITY_PRESENCE=false;
- **without**: DQ_MODEL_AFFINITY_WAIT_SECONDS=0, the strict fair order.

It prints images/s (jobs / (last finish − first submit)) and model loads per 100 jobs (the
workers' "loaded model version" log lines, the first loads of each worker included), the modes
rotated ``--rounds`` times on the same job mix. Uses PostgreSQL and Redis when they answer,
else SQLite and the server-less broker. DQ_PRECISION is pinned to fp32, so a model's bytes and
the budget do not depend on the CPU.

``--depths 1000,100000,1000000`` adds what a claim's queries cost at those depths on PostgreSQL
(``--depths-only``: that alone): N queued jobs of 500 owners on the three versions, inserted by
one SQL statement into a migrated schema (as bench_scale.py does), then, each the median of 15 in
a rolled-back transaction: the claim's read when the head is warm for the worker
(``next_in_line`` of 8, as before affinity), when it is cold (that, the lookahead of 32 and
``Affinity.order``), and a plain ``FOR UPDATE SKIP LOCKED`` of 16 for reference.

Not a test: it prints tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.db import Base, Job, JobStatus, ModelKind, ModelVersion, make_engine  # noqa: E402
from core.db.session import session_scope  # noqa: E402
from core.queue.dispatch import publish_job  # noqa: E402
from core.runtime.machine import cpu_name  # noqa: E402
from core.runtime.settings import Settings  # noqa: E402
from core.services.jobs import JobRequest, submit_job  # noqa: E402
from core.services.model_versions import DEFAULT_MODEL_DIR  # noqa: E402

VERSIONS = ("bench-a", "bench-b", "bench-c")
WITH = "affinity, reading presence"
NO_PRESENCE = "affinity, presence not read"
WITHOUT = "without affinity"
OWNERS = 8
REDIS_DB = "redis://127.0.0.1:6379/13"


def topology(tmp: Path, tag: str) -> tuple[str, dict[str, str]]:
    """A fresh PostgreSQL schema and a flushed Redis database, or SQLite files of their own."""
    import redis
    from sqlalchemy import create_engine, text

    try:
        redis.Redis.from_url(REDIS_DB, socket_connect_timeout=1).flushdb()
        schema = f"dq_bench_models_{uuid.uuid4().hex[:8]}"
        admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
        return "PostgreSQL + Redis", {"DQ_DATABASE_URL": url, "DQ_BROKER_URL": REDIS_DB}
    except Exception:
        return "SQLite + SQLAlchemy broker", {
            "DQ_DATABASE_URL": f"sqlite:///{tmp / f'dq-{tag}.sqlite3'}",
            "DQ_BROKER_URL": f"sqla+sqlite:///{tmp / f'broker-{tag}.sqlite3'}",
        }


def drop_schema(env: dict[str, str]) -> None:
    url = env["DQ_DATABASE_URL"]
    if "search_path%3D" not in url:
        return
    from sqlalchemy import create_engine, text

    schema = url.split("search_path%3D", 1)[1]
    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def shipped_model_bytes() -> int:
    from core.diffusion.pipeline import LatentDiffusion
    from worker.models import model_bytes

    return model_bytes(LatentDiffusion.load(DEFAULT_MODEL_DIR, device="cpu", precision="fp32"))


def register_versions(engine: Any, storage: Any) -> None:
    """The shipped checkpoint under three versions' names (each its own prefix)."""
    config = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
    with session_scope(engine) as s:
        for name in VERSIONS:
            for f in ("model.json", "model.safetensors"):
                storage.put(f"models/{name}/{f}", (DEFAULT_MODEL_DIR / f).read_bytes())
            s.add(
                ModelVersion(
                    name=name,
                    kind=ModelKind.DENOISER,
                    checkpoint_key=f"models/{name}",
                    config=config,
                )
            )


def job_mix(n: int, seed: int) -> list[tuple[str, str]]:
    """(owner, version) of each job: owners in turn, versions at random."""
    rng = random.Random(seed)
    return [(f"session:owner-{i % OWNERS}", rng.choice(VERSIONS)) for i in range(n)]


def start_worker(env: dict[str, str], tmp: Path, name: str) -> subprocess.Popen[bytes]:
    log = tmp / f"{name}.log"
    return subprocess.Popen(
        [sys.executable, "-m", "core.cli", "worker", "--queues", "generate", "--threads", "1",
         "--name", f"{name}@%h"],
        cwd=tmp,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def wait_ready(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + 180
    for proc, log in zip(procs, logs, strict=True):
        while "ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


def run_mode(
    tmp: Path, base_env: dict[str, str], mode: dict[str, str], mix: list[tuple[str, str]], args: Any
) -> dict[str, float]:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from core.queue.broker import CeleryPublisher
    from core.storage import make_storage

    tag = f"m{uuid.uuid4().hex[:6]}"
    name, env = topology(tmp, tag)
    env |= base_env | mode
    settings = Settings.from_env(env)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    storage = make_storage(settings)
    register_versions(engine, storage)
    publisher = CeleryPublisher.from_settings(settings)
    names = [f"bench-{tag}-{k}" for k in range(2)]
    logs = [tmp / f"{n}.log" for n in names]
    procs = [start_worker(env, tmp, n) for n in names]
    try:
        wait_ready(procs, logs)
        with session_scope(engine) as s:
            ids = [
                submit_job(
                    s,
                    JobRequest(prompt=f"a small red circle {i}", steps=args.steps, seed=i,
                               model=version),
                    owner,
                    settings,
                )[0].id
                for i, (owner, version) in enumerate(mix)
            ]  # fmt: skip
        for job_id in ids:
            publish_job(engine, publisher, job_id)
        deadline = time.monotonic() + args.timeout
        while True:
            with Session(engine) as s:
                left = s.scalar(
                    select(func.count()).where(
                        Job.id.in_(ids), Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
                    )
                )
            if left == 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{left} jobs still queued or running after {args.timeout} s")
            time.sleep(0.5)
        with Session(engine) as s:
            jobs = list(s.scalars(select(Job).where(Job.id.in_(ids))))
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        engine.dispose()
        drop_schema(env)
    failed = [j.error for j in jobs if j.status is not JobStatus.SUCCEEDED]
    if failed:
        raise SystemExit(f"{len(failed)} jobs failed: {failed[:3]}")
    text = [log.read_text(errors="replace") for log in logs]
    loads = sum(t.count("loaded model version") for t in text)
    picks = sum(t.count("model affinity: took job") for t in text)
    batches = sum(t.count("running ") for t in text)
    start = min(j.created_at for j in jobs)
    end = max(j.finished_at for j in jobs if j.finished_at)
    lat = sorted((j.finished_at - j.created_at).total_seconds() for j in jobs if j.finished_at)
    n = len(jobs)
    return {
        "img_s": n / (end - start).total_seconds(),
        "loads_per_100": 100 * loads / n,
        "loads": loads,
        "picks": picks,
        "batches": batches,
        "p50": statistics.median(lat),
        "p95": lat[min(n - 1, round(0.95 * (n - 1)))],
        "topology": name,  # type: ignore[dict-item]
    }


def claim_at_depth(depths: list[int], rounds: int = 15) -> list[dict[str, float]]:
    """Per depth: the claim's read with the head warm, with it cold (affinity), and SKIP LOCKED."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from core.db import migrate
    from core.queue.fairness import next_in_line
    from worker.generation import HEAD_CANDIDATES

    out = []
    for depth in depths:
        _, env = topology(Path(tempfile.gettempdir()), "depth")
        url = env["DQ_DATABASE_URL"]
        if not url.startswith("postgresql"):
            raise SystemExit("--depths needs PostgreSQL at 127.0.0.1:5432")
        migrate.upgrade(url)
        engine = make_engine(url, statement_timeout=0)
        try:
            with session_scope(engine) as s:
                versions = [ModelVersion(name=n, kind=ModelKind.DENOISER, checkpoint_key=n)
                            for n in VERSIONS]  # fmt: skip
                s.add_all(versions)
                s.flush()
                version_ids = [v.id for v in versions]
            ids = [str(v) for v in version_ids]
            first = datetime.now(UTC) - timedelta(milliseconds=depth, minutes=1)
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, status, prompt, negative_prompt, steps, guidance, "
                        "sampler, seed, width, height, num_images, progress_step, progress_total, "
                        "attempts, cancel_requested, owner, created_at, fair_key, "
                        "model_version_id) SELECT gen_random_uuid(), 'queued', 'a red circle', "
                        "'', 20, 4.0, 'dpmpp-2m', n, 64, 64, 1, 0, 20, 0, false, "
                        "'session:bench-' || (n % 500), "
                        "CAST(:first AS timestamptz) + n * interval '1 millisecond', n / 500, "
                        "(CAST(:ids AS uuid[]))[1 + (n * 7 + n / 500) % 3] "
                        "FROM generate_series(0, :depth - 1) AS s(n)"
                    ),
                    {"depth": depth, "first": first, "ids": "{" + ",".join(ids) + "}"},
                )
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE"))
            with Session(engine) as s:
                head = next_in_line(s, 1)[0].model_version_id
            held = [v for v in version_ids if v != head][:1]  # one version, not the head's

            reads = {
                "head warm": lambda s: next_in_line(s, HEAD_CANDIDATES),
                "head cold (affinity)": functools.partial(cold_claim_read, held=held),
                "SKIP LOCKED 16": fifo_claim_read,
            }
            times: dict[str, list[float]] = {name: [] for name in reads}
            for r in range(2 + rounds):
                for name, read in reads.items():
                    with Session(engine) as s:
                        s.execute(text("SELECT 1"))
                        start = time.perf_counter()
                        read(s)
                        elapsed = time.perf_counter() - start
                        s.rollback()
                    if r >= 2:
                        times[name].append(elapsed * 1000)
            row = {name: statistics.median(t) for name, t in times.items()}
            out.append({"depth": depth, **row})
            print(f"  depth {depth}: {row}", file=sys.stderr)
        finally:
            engine.dispose()
            drop_schema(env)
    return out


def fifo_claim_read(s: Any) -> list[Any]:
    """The claim of a plain FIFO queue, for reference."""
    from sqlalchemy import text

    fifo = "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at LIMIT 16 FOR UPDATE "
    return list(s.execute(text(fifo + "SKIP LOCKED")).all())


def cold_claim_read(s: Any, held: list[uuid.UUID]) -> list[Any]:
    """What claim_batch reads when the head needs a version the worker does not hold."""
    from core.queue.fairness import AFFINITY_LOOKAHEAD, Affinity, next_in_line
    from worker.generation import HEAD_CANDIDATES

    heads = next_in_line(s, HEAD_CANDIDATES)
    assert heads[0].model_version_id not in held
    ordered = Affinity(10.0).order(next_in_line(s, AFFINITY_LOOKAHEAD), held)
    assert ordered[0].model_version_id == held[0]  # a warm job of the head's round was found
    return ordered


def print_depths(rows: list[dict[str, float]]) -> None:
    print(f"\n**A claim's reads at depth** — {cpu_name()}; PostgreSQL, 500 owners, 3 versions; "
          "ms, median of 15\n")  # fmt: skip
    print("| queued | head warm (8 in line) | head cold: + lookahead of 32 and the pick | "
          "plain SKIP LOCKED (16) |")  # fmt: skip
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['depth']:,.0f} | {r['head warm']:.2f} | {r['head cold (affinity)']:.2f} | "
              f"{r['SKIP LOCKED 16']:.2f} |")  # fmt: skip
    grow = {k: rows[-1][k] / rows[0][k] for k in ("head warm", "head cold (affinity)")}
    print(f"\nfrom {rows[0]['depth']:,.0f} to {rows[-1]['depth']:,.0f} queued: head warm "
          f"×{grow['head warm']:.2f}, head cold ×{grow['head cold (affinity)']:.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=96)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="DQ_MAX_BATCH_SIZE of both workers.")
    ap.add_argument(
        "--models-per-worker", type=float, default=2, help="Versions each worker's budget holds."
    )
    ap.add_argument("--wait", type=float, default=10.0, help="The affinity mode's wait.")
    ap.add_argument("--rounds", type=int, default=2, help="Each mode this many times, in turn.")
    ap.add_argument("--seed", type=int, default=27)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--depths", help="Comma-separated queue depths for the claim's reads.")
    ap.add_argument("--depths-only", action="store_true", help="Only the claim's reads.")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")] if args.depths else []
    if args.depths_only:
        print_depths(claim_at_depth(depths or [1000, 100_000, 1_000_000]))
        return
    import torch

    size = shipped_model_bytes()
    budget_mb = math.ceil((args.models_per_worker + 0.5) * size / 2**20)
    mix = job_mix(args.jobs, args.seed)
    wait = str(args.wait)
    modes = {
        WITH: {"DQ_MODEL_AFFINITY_WAIT_SECONDS": wait, "DQ_MODEL_AFFINITY_PRESENCE": "true"},
        NO_PRESENCE: {
            "DQ_MODEL_AFFINITY_WAIT_SECONDS": wait,
            "DQ_MODEL_AFFINITY_PRESENCE": "false",
        },
        WITHOUT: {"DQ_MODEL_AFFINITY_WAIT_SECONDS": "0"},
    }
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base_env = {
            "DQ_STORAGE_URL": f"file://{tmp / 'objects'}",
            "DQ_MODEL_CACHE_DIR": str(tmp / "models"),
            "DQ_SECRET_KEY": "bench",
            "DQ_DEVICE": "cpu",
            "DQ_PRECISION": "fp32",
            "DQ_MAX_BATCH_SIZE": str(args.batch),
            "DQ_MAX_ACTIVE_JOBS_PER_OWNER": str(args.jobs),
            "DQ_WORKER_MODEL_MEMORY_MB": str(budget_mb),
        }
        order = list(modes)
        for r in range(args.rounds):
            for mode in order[r % len(order) :] + order[: r % len(order)]:  # rotated each round
                result = run_mode(tmp, base_env, modes[mode], mix, args)
                results[mode].append(result)
                print(f"  {mode}: {result}", file=sys.stderr)

    from core.queue.fairness import AFFINITY_ROUNDS

    topo = results[WITH][0]["topology"]
    print(
        f"\n**Warm models** — {cpu_name()}, torch {torch.__version__}; {topo}; 2 workers × 1 "
        f"thread, 3 versions of the shipped model ({size / 2**20:.1f} MB each at fp32), "
        f"DQ_WORKER_MODEL_MEMORY_MB={budget_mb} (holds {args.models_per_worker:g}); {args.jobs} "
        f"one-image jobs of {OWNERS} owners on random versions, {args.steps} steps, batches of at "
        f"most {args.batch}; affinity within {AFFINITY_ROUNDS:g} rounds; {args.rounds} run(s) a "
        "mode, alternated, median shown\n"
    )
    print("| mode | images/s | model loads / 100 jobs | batches | affinity picks | p50 s | p95 s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    med = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "topology"}
        for mode, rs in results.items()
    }
    for mode, m in med.items():
        wait = "W = 0" if mode == WITHOUT else f"W = {args.wait:g} s"
        print(
            f"| {mode} ({wait}) | {m['img_s']:.3f} | {m['loads_per_100']:.1f} | "
            f"{m['batches']:.0f} | {m['picks']:.0f} | {m['p50']:.1f} | {m['p95']:.1f} |"
        )
    print()
    for a, b in ((WITH, WITHOUT), (NO_PRESENCE, WITHOUT), (WITH, NO_PRESENCE)):
        x, y = med[a], med[b]
        print(
            f"{a} / {b}: images/s {x['img_s'] / y['img_s']:.2f}×, model loads "
            f"{x['loads_per_100'] / max(y['loads_per_100'], 1e-9):.2f}×"
        )
    for mode, rs in results.items():
        runs = ", ".join(f"{r['img_s']:.3f} img/s, {r['loads']:.0f} loads" for r in rs)
        print(f"- {mode}, each run: {runs}")
    if depths:
        print_depths(claim_at_depth(depths))


if __name__ == "__main__":
    main()
