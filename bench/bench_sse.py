"""Live push (SSE) benchmark: how many open event streams one web process holds, and at what
CPU, memory and event latency.

    .venv/bin/python bench/bench_sse.py                        # embedded: SQLite, no Redis
    .venv/bin/python bench/bench_sse.py --redis redis://127.0.0.1:6379/7
    .venv/bin/python bench/bench_sse.py --runs 64:50,64:200,216:200,516:500

Each run starts ``dq web --workers 1 --threads T`` on a fresh SQLite database with K queued
jobs, then opens K concurrent streams (GET /api/v1/jobs/<id>/events, one per job, over raw
sockets from one asyncio loop). Reported, for the gunicorn worker process:

- held: streams that got their first bytes (the ``retry:`` hint) within 15 s; the rest wait
  for a free thread (gthread holds one thread per open stream);
- CPU% and RSS while the K streams sit idle (heartbeats only, DQ_SSE_HEARTBEAT_SECONDS=15),
  then CPU% while 10 jobs start, one every 0.5 s: each start is an event for its own stream,
  and moves the queue, so every waiting stream re-reads its job once (the ``queue`` event);
- latency: from the commit of a job's start to its ``running`` event on the client, median
  and max of the 10. Without Redis the hub polls every 0.5 s; with --redis the bench publishes
  on dq:job-events after the commit, as the worker does.

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import update

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.db import Job, JobStatus, make_engine, session_scope, utcnow  # noqa: E402
from core.queue.notify import notify  # noqa: E402
from core.runtime.machine import cpu_name  # noqa: E402
from core.runtime.settings import Settings  # noqa: E402
from core.services.tokens import create_token  # noqa: E402

STREAMS_PER_TOKEN = 100  # web.events.MAX_STREAMS_PER_OWNER
CHANGES = 10
IDLE_SECONDS = 10.0
CONNECT_SECONDS = 15.0
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Client:
    job_id: uuid.UUID
    token: str
    connected_at: float | None = None
    running_at: float | None = None
    failed: str | None = None
    buffer: bytes = b""
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def worker_pid(master: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("gunicorn started no worker")


async def follow(client: Client, port: int) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client.writer = writer
        writer.write(
            f"GET /api/v1/jobs/{client.job_id}/events?timeout=600 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {client.token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                if client.running_at is None:
                    client.failed = client.failed or "closed"
                return
            client.buffer += chunk
            if client.connected_at is None:
                if not client.buffer.startswith(b"HTTP/1.1 200"):
                    client.failed = client.buffer.split(b"\r\n", 1)[0].decode()
                    return
                if b"retry:" in client.buffer:
                    client.connected_at = time.monotonic()
            if client.running_at is None and b'"status":"running"' in client.buffer:
                client.running_at = time.monotonic()
            if len(client.buffer) > 1 << 16:
                client.buffer = client.buffer[-4096:]
    except (OSError, asyncio.IncompleteReadError) as e:
        client.failed = type(e).__name__


def make_jobs(url: str, count: int) -> list[tuple[uuid.UUID, str]]:
    engine = make_engine(url)
    pairs = []
    with session_scope(engine) as s:
        tokens = []
        for i in range(-(-count // STREAMS_PER_TOKEN)):
            token, plain = create_token(s, "user", f"bench {i}")
            s.flush()
            tokens.append((f"token:{token.id}", plain))
        now = utcnow()
        for i in range(count):
            owner, plain = tokens[i // STREAMS_PER_TOKEN]
            job = Job(
                id=uuid.uuid4(), status=JobStatus.QUEUED, prompt="a red circle", owner=owner,
                created_at=now, negative_prompt="", steps=20, guidance=4.0, sampler="ddim",
                seed=i, width=64, height=64, num_images=1, progress_total=20,
            )  # fmt: skip
            s.add(job)
            pairs.append((job.id, plain))
    engine.dispose()
    return pairs


async def one_run(
    threads: int, streams: int, redis: str | None, workdir: Path
) -> dict[str, str | float | int]:
    db = workdir / f"sse-{threads}-{streams}.sqlite3"
    url = f"sqlite:///{db}"
    env = {
        **os.environ,
        "DQ_DATABASE_URL": url,
        "DQ_STORAGE_URL": f"file://{workdir / 'objects'}",
        "DQ_SECRET_KEY": "b" * 40,
        "DQ_SSE_HEARTBEAT_SECONDS": "15",
        "DQ_LOG_FORMAT": "text",
    }
    if redis:
        env["DQ_BROKER_URL"] = redis
    else:
        env["DQ_BROKER_URL"] = f"sqla+sqlite:///{workdir / 'broker.sqlite3'}"
    dq = str(Path(sys.executable).parent / "dq")
    subprocess.run([dq, "db", "upgrade"], env=env, check=True, capture_output=True)
    pairs = make_jobs(url, streams)
    port = free_port()
    log = open(workdir / f"web-{threads}-{streams}.log", "w")  # noqa: SIM115
    web = subprocess.Popen(
        [dq, "web", "--workers", "1", "--threads", str(threads), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    clients = [Client(job_id, token) for job_id, token in pairs]
    tasks: list[asyncio.Task[None]] = []
    try:
        pid = worker_pid(web.pid)
        for _ in range(100):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        # One request first, so that "before" counts the imports a first request makes.
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/jobs/{pairs[0][0]}",
            headers={"Authorization": f"Bearer {pairs[0][1]}"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        rss_before = status_field(pid, "VmRSS")
        opened = time.monotonic()
        tasks = [asyncio.create_task(follow(c, port)) for c in clients]
        while time.monotonic() - opened < CONNECT_SECONDS:
            if all(c.connected_at or c.failed for c in clients):
                break
            await asyncio.sleep(0.1)
        held = [c for c in clients if c.connected_at]
        connect_s = max((c.connected_at or 0) - opened for c in held) if held else 0.0

        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)
        idle_cpu = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        rss = status_field(pid, "VmRSS")
        os_threads = status_field(pid, "Threads")

        engine = make_engine(url)
        settings = Settings.from_env({}, database_url=url, broker_url=redis or "redis://x:1/0")
        changed: dict[uuid.UUID, float] = {}
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        for c in held[:CHANGES]:
            with session_scope(engine) as s:
                s.execute(update(Job).where(Job.id == c.job_id).values(status=JobStatus.RUNNING))
            changed[c.job_id] = time.monotonic()
            if redis:
                notify(settings, [c.job_id])
            await asyncio.sleep(0.5)
        await asyncio.sleep(5.5)  # the waiting streams' queue refresh comes within 5 s
        busy_cpu = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        engine.dispose()
        latencies = [
            c.running_at - changed[c.job_id] for c in held[:CHANGES] if c.running_at is not None
        ]
        failures = sum(1 for c in clients if c.failed)
        return {
            "threads": threads,
            "streams": streams,
            "held": len(held),
            "failed": failures,
            "connect_s": connect_s,
            "idle_cpu": idle_cpu,
            "busy_cpu": busy_cpu,
            "rss_before": rss_before,
            "rss": rss,
            "os_threads": os_threads,
            "lat_median_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "lat_max_ms": 1000 * max(latencies) if latencies else float("nan"),
            "lat_n": len(latencies),
        }
    finally:
        for c in clients:
            if c.writer is not None:
                c.writer.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Quick shutdown: a graceful one waits for every stream's next write (its heartbeat).
        web.send_signal(signal.SIGINT)
        try:
            web.wait(timeout=40)
        except subprocess.TimeoutExpired:
            web.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        default="64:50,64:200,216:200,516:500",
        help="comma-separated THREADS:STREAMS pairs (default %(default)s)",
    )
    parser.add_argument("--redis", help="redis://… to notify through, as production does")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs = [tuple(int(x) for x in pair.split(":")) for pair in args.runs.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads, streams in runs:
            results.append(asyncio.run(one_run(threads, streams, args.redis, Path(tmp))))
            print(f"  done: {threads} threads, {streams} streams", file=sys.stderr)
    print(f"SSE streams on one web process (gunicorn gthread) · {cpu_name()}")
    notifications = f"Redis {args.redis}" if args.redis else "none (the hub polls every 0.5 s)"
    print(f"database SQLite · notifications: {notifications}")
    print()
    print(
        "| threads | streams opened | held | failed | time to open all | CPU% idle | "
        "CPU% while 10 jobs start | RSS before → with streams | OS threads | "
        "event latency median / max |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in results:
        print(
            f"| {r['threads']} | {r['streams']} | {r['held']} | {r['failed']} | "
            f"{r['connect_s']:.1f} s | {r['idle_cpu']:.1f} | {r['busy_cpu']:.1f} | "
            f"{r['rss_before']} → {r['rss']} | {r['os_threads']} | "
            f"{r['lat_median_ms']:.0f} / {r['lat_max_ms']:.0f} ms (n={r['lat_n']}) |"
        )


if __name__ == "__main__":
    main()
