"""Web benchmark: requests/s and p99 latency of polling a job (GET /api/v1/jobs/<id>) and of
submitting one (POST /api/v1/jobs), against a trivial authenticated route (GET /api/v1/me: the
token checked, nothing read) and an unauthenticated one (/healthz) under the same server.

    .venv/bin/python bench/bench_web.py            # SQLite, and PostgreSQL when reachable
    .venv/bin/python bench/bench_web.py --quick    # smoke run

The server is `dq web` (gunicorn, 2 worker processes) on loopback, with the database on SQLite
(and on PostgreSQL when it answers at DQ_BENCH_POSTGRES_URL). Submissions go to a real broker:
Redis db 14 when it answers, else the embedded SQLite broker; nothing consumes them. The load
generator is this process: threads with keep-alive connections (http.client). The three routes
are timed in interleaved rounds, so a change in the machine's load shifts all of them alike; the
figure that matters is the ratio to the trivial authenticated route (target: polling >= 50% of
its requests/s, i.e. a poll costs at most twice as much). A second table splits each route's CPU
time per request between the server's processes, PostgreSQL's and the client's (from /proc), which
shows where a difference comes from: docs/QUEUE.md found connections opened and closed that way.

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.db import JobStatus
from core.runtime.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "DQ_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.flushdb()
        return True
    except Exception:
        return False


@contextmanager
def postgres_schema() -> Iterator[str | None]:
    """A fresh schema on the PostgreSQL server, or None when there is none to be had."""
    from sqlalchemy import create_engine, text

    schema = f"dq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception:
        admin.dispose()
        yield None
        return
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


# `dq web` becomes gunicorn's master (it replaces itself): its pid, while it runs.
SERVER_PIDS: list[int] = []
TICKS = os.sysconf("SC_CLK_TCK")
CPU_GROUPS = ("web", "PostgreSQL", "client")


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) so far of the web server's processes (gunicorn's master and its
    workers), of every process named ``postgres*`` (PostgreSQL must run
    on this machine), and of this process (the client threads). A process that ends takes its
    time with it: a PostgreSQL backend that disconnects between two readings is not counted."""
    out = dict.fromkeys(CPU_GROUPS, 0.0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # ppid, then utime and stime (fields 4, 14 and 15 of proc(5)).
        ppid, seconds = int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS
        if pid in SERVER_PIDS or ppid in SERVER_PIDS:
            out["web"] += seconds
        elif name.startswith("postgres"):
            out["PostgreSQL"] += seconds
        elif pid == os.getpid():
            out["client"] += seconds
    return out


@contextmanager
def server(database_url: str, broker_url: str, workdir: Path, workers: int) -> Iterator[int]:
    """`dq web` on a free loopback port; yields the port once /healthz answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env.update(
        DQ_DATABASE_URL=database_url,
        DQ_BROKER_URL=broker_url,
        DQ_STORAGE_URL=f"file://{workdir / 'objects'}",
        DQ_SECRET_KEY=secrets.token_hex(32),
        # Measure the endpoints, not the limiter's or the caps' refusals.
        DQ_RATE_LIMIT="100000000/minute",
        DQ_GLOBAL_RATE_LIMIT="100000000/minute",
        DQ_MAX_ACTIVE_JOBS_PER_OWNER="100000000",
        DQ_MAX_QUEUED_JOBS="100000000",
    )
    from core.db import migrate

    migrate.upgrade(database_url)  # `dq web` serves only a migrated schema
    process = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "web", "--port", str(port), "--workers", str(workers)],
        cwd=workdir,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    SERVER_PIDS.append(process.pid)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                _, err = process.communicate()
                raise RuntimeError(f"dq web exited: {err[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("dq web did not answer within 60 s")
            time.sleep(0.2)
        yield port
    finally:
        SERVER_PIDS.remove(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_token(database_url: str) -> tuple[str, str]:
    """A user token: (plaintext, owner string of its jobs)."""
    from core.db import dispose_engines, get_engine, session_scope
    from core.services.tokens import create_token

    with session_scope(get_engine(url=database_url)) as session:
        row, token = create_token(session, "user", "bench")
        owner = f"token:{row.id}"
    dispose_engines()
    return token, owner


def add_jobs(database_url: str, owner: str, count: int, **values: object) -> list[str]:
    """Job rows as a worker would leave them, straight into the database."""
    from core.db import Job, JobStatus, dispose_engines, get_engine, session_scope, utcnow

    ids = [uuid.uuid4() for _ in range(count)]
    columns: dict[str, object] = {
        "status": JobStatus.QUEUED,
        "prompt": "filler",
        "negative_prompt": "",
        "steps": 20,
        "guidance": 4.0,
        "sampler": "dpmpp-2m",
        "seed": 1,
        "width": 64,
        "height": 64,
        "num_images": 1,
        "progress_total": 20,
        "owner": owner,
        **values,
    }
    with session_scope(get_engine(url=database_url)) as session:
        session.add_all(Job(id=i, created_at=utcnow(), **columns) for i in ids)
    dispose_engines()
    return [str(i) for i in ids]


def cancel_queued_except(database_url: str, keep: list[str]) -> None:
    """Take the jobs the submit phase queued out of the queue, so every round polls alike."""
    from sqlalchemy import update

    from core.db import Job, JobStatus, dispose_engines, get_engine, session_scope, utcnow

    with session_scope(get_engine(url=database_url)) as session:
        session.execute(
            update(Job)
            .where(Job.status == JobStatus.QUEUED, Job.id.not_in([uuid.UUID(k) for k in keep]))
            .values(status=JobStatus.CANCELED, finished_at=utcnow())
        )
    dispose_engines()


def submit(port: int, headers: dict[str, str], body: bytes) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("POST", "/api/v1/jobs", body=body, headers=headers)
    response = conn.getresponse()
    job = json.loads(response.read())
    conn.close()
    assert response.status == 202, job
    return str(job["id"])


class Load:
    """Threads that each hold one keep-alive connection and send one request after another."""

    def __init__(self, port: int, threads: int):
        self.port = port
        self.threads = threads

    def run(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None, seconds: float
    ) -> tuple[int, list[float], int]:
        """(requests completed, latencies in seconds, errors) over ``seconds``."""
        latencies: list[list[float]] = [[] for _ in range(self.threads)]
        errors = [0] * self.threads
        start = threading.Barrier(self.threads + 1)
        stop_at = [0.0]

        def worker(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            start.wait()
            mine = latencies[i]
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at[0]:
                    break
                try:
                    conn.request(method, path, body=body, headers=headers)
                    response = conn.getresponse()
                    response.read()
                    if response.status >= 400:
                        errors[i] += 1
                    if response.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                    continue
                mine.append(time.perf_counter() - t0)
            conn.close()

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(self.threads)]
        for t in pool:
            t.start()
        stop_at[0] = time.perf_counter() + seconds
        start.wait()
        for t in pool:
            t.join()
        flat = [x for per in latencies for x in per]
        return len(flat), flat, sum(errors)


@dataclass
class Tally:
    count: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CPU_GROUPS, 0.0))

    def add(
        self, count: int, seconds: float, latencies: list[float], errors: int, cpu: dict[str, float]
    ) -> None:
        self.count += count
        self.seconds += seconds
        self.latencies += latencies
        self.errors += errors
        for group, spent in cpu.items():
            self.cpu[group] += spent

    def cpu_ms(self, group: str) -> float:
        """CPU per request of a group of processes, in ms."""
        return 1000 * self.cpu[group] / self.count

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


TRIVIAL = "GET /api/v1/me (trivial, authenticated)"
HEALTHZ = "GET /healthz (unauthenticated)"
LONG_QUEUE = 1000


def bench_backend(
    name: str, database_url: str, broker_url: str, args: argparse.Namespace
) -> list[tuple[str, str, float, float, float, int, tuple[float, ...]]]:
    with tempfile.TemporaryDirectory(prefix="dq-bench-") as tmp:
        workdir = Path(tmp)
        with server(database_url, broker_url, workdir, args.workers) as port:
            token, owner = make_token(database_url)
            auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            body = json.dumps({"prompt": "a large red circle in the top left"}).encode()
            queued = submit(port, auth, body)
            (running,) = add_jobs(
                database_url,
                owner,
                1,
                status=JobStatus.RUNNING,
                progress_step=7,
                preview_key="previews/bench.png",
            )
            load = Load(port, args.threads)

            def measure(routes: dict[str, tuple[str, str, dict[str, str], bytes | None]]) -> dict:
                tallies = {label: Tally() for label in routes}
                for method, path, headers, payload in routes.values():
                    load.run(method, path, headers, payload, args.warmup)
                for _ in range(args.rounds):
                    for label, (method, path, headers, payload) in routes.items():
                        before = cpu_seconds()
                        count, latencies, errors = load.run(
                            method, path, headers, payload, args.seconds
                        )
                        after = cpu_seconds()
                        spent = {group: after[group] - before[group] for group in CPU_GROUPS}
                        tallies[label].add(count, args.seconds, latencies, errors, spent)
                        if method == "POST":
                            cancel_queued_except(database_url, [queued])
                return tallies

            tallies = measure(
                {
                    TRIVIAL: ("GET", "/api/v1/me", auth, None),
                    HEALTHZ: ("GET", "/healthz", {}, None),
                    "GET /api/v1/jobs/<id>: running": (
                        "GET",
                        f"/api/v1/jobs/{running}",
                        auth,
                        None,
                    ),
                    "GET /api/v1/jobs/<id>: queued first": (
                        "GET",
                        f"/api/v1/jobs/{queued}",
                        auth,
                        None,
                    ),
                    "POST /api/v1/jobs": ("POST", "/api/v1/jobs", auth, body),
                }
            )
            # A long queue: every poll of a queued job counts the jobs ahead of it.
            add_jobs(database_url, "token:0", LONG_QUEUE)
            last = submit(port, auth, body)
            long_queue = measure(
                {
                    TRIVIAL: ("GET", "/api/v1/me", auth, None),
                    f"GET /api/v1/jobs/<id>: queued behind {LONG_QUEUE:,}": (
                        "GET",
                        f"/api/v1/jobs/{last}",
                        auth,
                        None,
                    ),
                }
            )
    rows = []
    for group in (tallies, long_queue):
        trivial = group[TRIVIAL].rate
        for label, t in group.items():
            if group is long_queue and label == TRIVIAL:
                label = f"{TRIVIAL}, same phase"
            cpu = tuple(t.cpu_ms(g) for g in CPU_GROUPS)
            rows.append(
                (name, label, t.rate, p99(t.latencies) * 1000, t.rate / trivial, t.errors, cpu)
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short rounds, SQLite only.")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn processes.")
    parser.add_argument("--threads", type=int, default=8, help="Client threads.")
    # Many short interleaved rounds: the load of a shared machine changes by the second.
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.5, help="Per route and round.")
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.warmup = 2, 0.5, 0.3

    with tempfile.TemporaryDirectory(prefix="dq-bench-broker-") as broker_dir:
        use_redis = redis_answers(REDIS_URL)
        broker = REDIS_URL if use_redis else f"sqla+sqlite:///{broker_dir}/broker.sqlite3"
        rows = []
        with tempfile.TemporaryDirectory(prefix="dq-bench-db-") as db_dir:
            rows += bench_backend("SQLite", f"sqlite:///{db_dir}/dq.sqlite3", broker, args)
        if not args.quick:
            with postgres_schema() as pg_url:
                if pg_url is not None:
                    rows += bench_backend("PostgreSQL", pg_url, broker, args)
        if use_redis:
            redis_answers(REDIS_URL)  # flushes what the submissions queued

    print(f"CPU: {cpu_name()}; Python {platform.python_version()}")
    print(
        f"Server: dq web (gunicorn, {args.workers} processes, gthread); client: {args.threads} "
        f"keep-alive threads in one process on the same machine; {args.rounds} interleaved "
        f"rounds of {args.seconds:g} s per route; broker: {'Redis' if use_redis else 'SQLite'}."
    )
    print(
        "Polled: a running job (progress and a signed preview URL), the first queued job, and "
        f"a job queued behind {LONG_QUEUE:,} others (measured last, with its own trivial-route "
        "figure). Jobs the submit phase queues are canceled after it, so every round polls the "
        "same queue.\n"
    )
    print("| database | route | requests/s | p99 ms | vs trivial | errors |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, rate, p99_ms, ratio, errors, _ in rows:
        print(f"| {name} | {label} | {rate:,.0f} | {p99_ms:.1f} | {ratio:.0%} | {errors} |")
    print(
        "\nCPU per request (ms, user + system from /proc, summed over the same rounds): the "
        "server's processes, PostgreSQL's (a backend that ended in a round is missing), the "
        "client's threads. SQLite runs inside the web processes.\n"
    )
    print("| database | route | web | PostgreSQL | client | all |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, *_, cpu in rows:
        web, pg, client = cpu
        pg_text = f"{pg:.3f}" if name == "PostgreSQL" else "—"
        print(
            f"| {name} | {label} | {web:.3f} | {pg_text} | {client:.3f} | {web + pg + client:.3f} |"
        )
    print(
        "\nTarget: polling reaches >= 50% of the trivial authenticated route's requests/s "
        "(a poll costs at most 2x)."
    )
    for name, label, _, _, ratio, _, _ in rows:
        if label.startswith("GET /api/v1/jobs"):
            verdict = "met" if ratio >= 0.5 else "NOT met"
            print(f"  {name}, {label.split(': ', 1)[1]}: {ratio:.0%}, {verdict}")


if __name__ == "__main__":
    main()
