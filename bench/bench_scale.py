"""Scale benchmark: what each request costs with 1,000 queued jobs and with a million.

    .venv/bin/python bench/bench_scale.py                  # 1k … 1M queued (SQLite to 100k)
    .venv/bin/python bench/bench_scale.py --quick          # 1k and 10k queued, both backends
    .venv/bin/python bench/bench_scale.py --old 2450723    # and the code before the stored order
    .venv/bin/python bench/bench_scale.py --load           # 32 REST clients, dq web and a worker
    .venv/bin/python bench/bench_scale.py --load --quick   # 4 clients

Depth mode. At each depth N, a throwaway database (a PostgreSQL schema, a SQLite file) is
migrated by the measured code's own ``core.db.migrate.upgrade``, and N queued jobs of 500 owners
are inserted by one SQL statement (``generate_series``; a recursive CTE on SQLite), not through
the API. Job n belongs to owner n mod 500 and is created n ms after the first; where the schema
has ``jobs.fair_key``, the same INSERT gives it start tag n div 500 (its owner's turn), so each
owner's tags are contiguous, the fair order is the age order, and ``fair_owners`` is filled to
match. Status counts are folded and the tables ANALYZEd. Owner 0 is the benchmark's user token.
Then, each the median of 15 (after 2 warm-ups):

- claim (ours): ``core.queue.fairness.next_in_line(session, 16)``, run by the measured code in a
  process of its own, and beside it the claim of a plain FIFO queue, ``SELECT id … ORDER BY
  created_at LIMIT 16 FOR UPDATE SKIP LOCKED`` (PostgreSQL only), each in a transaction that is
  rolled back;
- over HTTP, against the measured code's ``dq web`` (gunicorn, 1 process, as a new operator runs
  it), on one keep-alive connection, in interleaved rounds: polling the token's last queued job
  (deep in the queue) and its first (the head of the queue), GET /api/v1/me (the trivial
  authenticated route of bench_web.py) and GET /healthz, submitting a job, listing the token's
  jobs (?limit=20, right after the submit, which renews the web process's view of the
  queue, so the list pays for reading it and the polls find it fresh), and /metrics (with
  DQ_METRICS_TOKEN). The web's caps and rate limits are raised so that nothing is refused.

The figure that matters is each operation's growth from the smallest depth to the largest
(target: flat). ``--old REF`` checks REF out in a git worktree under /tmp and measures its code
beside ours in the same run (a schema without ``fair_key`` is filled without it). ``--code-root
PATH`` measures another checkout instead of this one: for a "before" row without git, e.g.
``git worktree add --detach /tmp/before 2450723`` and ``--code-root /tmp/before``.

Load mode (``--load``). ``dq web`` (2 gunicorn processes) and one ``dq worker`` with the shipped
default model, on PostgreSQL and Redis (SQLite when it is the only backend asked for); 32 REST
clients (threads, one token each) each submit 3 ten-step jobs and poll each every 0.2 s until it
has ended. It prints the time from the first submission to the last job's end, the polls' p50
and p99, and the errors. ``--old``/``--code-root`` apply here too.

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, inspect, text

from core.runtime.machine import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_web import free_port, postgres_schema, redis_answers

REPO = Path(__file__).resolve().parents[1]
SCALE_REDIS_URL = os.environ.get("DQ_BENCH_SCALE_REDIS_URL", "redis://127.0.0.1:6379/12")
LOAD_REDIS_URL = os.environ.get("DQ_BENCH_LOAD_REDIS_URL", "redis://127.0.0.1:6379/11")
OWNERS = 500
CLAIM_LIMIT = 16
WARMUP = 2
ENDED = ("succeeded", "failed", "canceled")
PROMPT = "a large red circle in the top left"

# Run by the measured code's interpreter (cwd outside the tree, PYTHONPATH = its root): migrate
# the database and make user tokens; prints where `core` came from, and the tokens.
SETUP = """
import json, sys
import core
from core.db import dispose_engines, get_engine, session_scope
from core.db.migrate import upgrade
from core.services.tokens import create_token

url, count = sys.argv[1], int(sys.argv[2])
upgrade(url)
made = []
with session_scope(get_engine(url=url)) as session:
    for i in range(count):
        row, plaintext = create_token(session, "user", f"bench {i}")
        session.flush()
        made.append([plaintext, f"token:{row.id}"])
dispose_engines()
print(json.dumps({"core": core.__file__, "tokens": made}))
"""

# The claim query of the measured code, and the FIFO reference, in interleaved rounds; each in
# its own transaction, rolled back, timed from after the transaction's first statement.
CLAIM = """
import json, statistics, sys, time
from sqlalchemy import text
from sqlalchemy.orm import Session
from core.db import make_engine
from core.queue.fairness import next_in_line

url, rounds, warmup, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
engine = make_engine(url, statement_timeout=0)
fifo = text("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at "
            f"LIMIT {limit} FOR UPDATE SKIP LOCKED")
claims = {"ours": lambda s: next_in_line(s, limit)}
if engine.dialect.name == "postgresql":
    claims["reference"] = lambda s: s.execute(fifo).all()
times = {name: [] for name in claims}
for r in range(warmup + rounds):
    for name, claim in claims.items():
        with Session(engine) as session:
            session.execute(text("SELECT 1"))
            start = time.perf_counter()
            rows = claim(session)
            elapsed = time.perf_counter() - start
            session.rollback()
        assert len(rows) == limit, (name, len(rows))
        if r >= warmup:
            times[name].append(elapsed * 1000)
engine.dispose()
print(json.dumps({name: statistics.median(t) for name, t in times.items()}))
"""


# --- the code measured -------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """A source tree whose `core` and `web` are measured, run by this interpreter."""

    label: str
    root: Path

    def env(self, **dq: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
        return {**env, **dq, "PYTHONPATH": str(self.root)}

    def python(self, source: str, *args: str) -> str:
        """Run ``source`` with this tree's packages first on the path; its last line of output."""
        with tempfile.TemporaryDirectory(prefix="dq-bench-cwd-") as cwd:
            done = subprocess.run(
                [sys.executable, "-c", source, *args],
                cwd=cwd,
                env=self.env(),
                capture_output=True,
                text=True,
            )
        if done.returncode != 0:
            raise RuntimeError(f"{self.label}: {done.stderr[-3000:]}")
        return done.stdout.strip().splitlines()[-1]

    def setup(self, url: str, tokens: int) -> list[tuple[str, str]]:
        """Migrate the database at ``url`` and make ``tokens`` user tokens (plaintext, owner)."""
        out = json.loads(self.python(SETUP, url, str(tokens)))
        if not Path(out["core"]).resolve().is_relative_to(self.root.resolve()):
            raise RuntimeError(f"{self.label}: imported core from {out['core']}, not {self.root}")
        return [(plaintext, owner) for plaintext, owner in out["tokens"]]

    def claim_ms(self, url: str, rounds: int) -> dict[str, float]:
        return json.loads(self.python(CLAIM, url, str(rounds), str(WARMUP), str(CLAIM_LIMIT)))


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached git worktree of ``ref`` under /tmp, removed afterwards."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    path = Path(tempfile.mkdtemp(prefix=f"dq-bench-{sha}-"))
    git = ["git", "-C", str(REPO), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(path), sha], check=True)
    try:
        yield path
    finally:
        removed = subprocess.run([*git, "remove", "--force", str(path)], capture_output=True)
        if removed.returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run([*git, "prune"], capture_output=True)


# --- databases ---------------------------------------------------------------------------------


@contextmanager
def database(backend: str) -> Iterator[str]:
    """A throwaway database: a fresh PostgreSQL schema, or a SQLite file."""
    if backend == "postgresql":
        with postgres_schema() as url:
            if url is None:
                raise SystemExit("PostgreSQL does not answer (DQ_BENCH_POSTGRES_URL)")
            yield url
    else:
        with tempfile.TemporaryDirectory(prefix="dq-bench-db-") as tmp:
            yield f"sqlite:///{tmp}/dq.sqlite3"


def fill(url: str, depth: int, me: str) -> None:
    """``depth`` queued jobs of :data:`OWNERS` owners (owner 0 is ``me``) in one INSERT, keyed
    in their owners' turns when the schema has fair keys; then counts folded, VACUUM and ANALYZE."""
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    keyed = "fair_key" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    first = datetime.now(UTC) - timedelta(milliseconds=depth, minutes=1)
    columns = (
        "id, status, prompt, negative_prompt, steps, guidance, sampler, seed, width, height, "
        "num_images, progress_step, progress_total, attempts, cancel_requested, owner, created_at"
    )
    values = (
        "'queued', 'a red circle', '', 20, 4.0, 'dpmpp-2m', n, 64, 64, 1, 0, 20, 0, false, "
        "CASE WHEN n % :owners = 0 THEN :me ELSE 'session:bench-' || (n % :owners) END"
    )
    if engine.dialect.name == "postgresql":
        prefix, source = "", "generate_series(0, :depth - 1) AS s(n)"
        new_id = "gen_random_uuid()"
        created = "CAST(:first AS timestamptz) + n * interval '1 millisecond'"
        start: object = first
    else:
        prefix = (
            "WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n < :depth - 1) "
        )
        source = "s"
        new_id = "lower(hex(randomblob(16)))"  # Uuid on SQLite: 32 hex digits
        created = (
            "strftime('%Y-%m-%d %H:%M:%S', :first + n / 1000, 'unixepoch') "
            "|| printf('.%06d', n % 1000 * 1000)"
        )
        start = int(first.timestamp())
    values += f", {created}"
    if keyed:
        columns += ", fair_key"
        values += ", n / :owners"
    insert = f"{prefix}INSERT INTO jobs ({columns}) SELECT {new_id}, {values} FROM {source}"
    params = {"depth": depth, "owners": OWNERS, "me": me, "first": start}
    with engine.begin() as conn:
        conn.execute(text(insert), params)
        if keyed:
            conn.execute(
                text(
                    "INSERT INTO fair_owners (owner, last_start, next_start, weight) "
                    "SELECT owner, max(fair_key), max(fair_key) + 1, 1.0 FROM jobs "
                    "WHERE status = 'queued' GROUP BY owner"
                )
            )
        if "status_count_deltas" in tables:  # as the reaper folds them (core.db.counts.fold)
            conn.execute(
                text(
                    "INSERT INTO status_counts (kind, status, count) "
                    "SELECT kind, status, sum(delta) FROM status_count_deltas WHERE true "
                    "GROUP BY kind, status ON CONFLICT (kind, status) "
                    "DO UPDATE SET count = status_counts.count + excluded.count"
                )
            )
            conn.execute(text("DELETE FROM status_count_deltas"))
    # VACUUM as well on PostgreSQL: the one INSERT left as many delta rows as jobs, deleted by
    # the fold above, and until autovacuum's next round (within a minute) every read of the
    # status counts scans their dead space. A real inflow of a million jobs takes longer than
    # that, with autovacuum at work meanwhile; the figures are for that steady state.
    vacuum = "VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(vacuum))
    engine.dispose()


def first_and_last(url: str, owner: str) -> tuple[str, str]:
    """The owner's first and last queued job: the head of the queue and deep in it."""
    engine = create_engine(url)
    with engine.connect() as conn:
        ids = [
            conn.execute(
                text(
                    "SELECT id FROM jobs WHERE owner = :owner AND status = 'queued' "
                    f"ORDER BY created_at {order} LIMIT 1"
                ),
                {"owner": owner},
            ).scalar_one()
            for order in ("ASC", "DESC")
        ]
    engine.dispose()
    head, deep = (str(uuid.UUID(str(i))) for i in ids)
    return head, deep


def server_version(url: str) -> str:
    engine = create_engine(url)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            version = "PostgreSQL " + str(conn.execute(text("SHOW server_version")).scalar())
        else:
            version = f"SQLite {sqlite3.sqlite_version}"
    engine.dispose()
    return version


# --- processes ---------------------------------------------------------------------------------


def wait_until_up(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"dq web exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("dq web did not answer within 120 s")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM to the process group it leads, then SIGKILL after ``grace`` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def web(code: Code, env: dict[str, str], workdir: Path, workers: int) -> Iterator[int]:
    """The measured code's `dq web` on a free loopback port; yields the port once it answers."""
    port = free_port()
    log = workdir / f"web-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "web", "--port", str(port), "--workers", str(workers)],
        cwd=workdir,
        env=code.env(**env),
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    try:
        wait_until_up(port, process, log)
        yield port
    finally:
        stop(process)


@contextmanager
def worker(code: Code, env: dict[str, str], workdir: Path) -> Iterator[None]:
    """The measured code's `dq worker` on the generate queue, once it says it is ready."""
    log = workdir / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "worker", "--queues", "generate"],
        cwd=workdir,
        env=code.env(**env),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while "ready." not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dq worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        stop(process, grace=60)


def service_env(database_url: str, broker_url: str, workdir: Path) -> dict[str, str]:
    return {
        "DQ_DATABASE_URL": database_url,
        "DQ_BROKER_URL": broker_url,
        "DQ_STORAGE_URL": f"file://{workdir / 'objects'}",
        "DQ_MODEL_CACHE_DIR": str(workdir / "models"),
        "DQ_SECRET_KEY": secrets.token_hex(32),
    }


class Client:
    """One keep-alive HTTP connection; reconnects after an error or a Connection: close."""

    def __init__(self, port: int, timeout: float = 600):
        self.port, self.timeout = port, timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, bytes, float]:
        """(status, body, seconds); status 0 when the request failed."""
        start = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
            if response.getheader("Connection", "").lower() == "close":
                self.reconnect()
            return response.status, data, time.perf_counter() - start
        except (OSError, http.client.HTTPException):
            self.reconnect()
            return 0, b"", time.perf_counter() - start

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def close(self) -> None:
        self.conn.close()


# --- depth mode --------------------------------------------------------------------------------

COLUMNS = (
    "claim (ours)",
    "claim (SKIP LOCKED)",
    "poll",
    "poll (head)",
    "trivial, authenticated",
    "trivial route",
    "submit",
    "list",
    "/metrics",
)


@dataclass
class Depth:
    backend: str
    code: str
    depth: int
    ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)
    position: object = None  # what polling the deep job says of its place


def measure_depth(code: Code, backend: str, depth: int, broker: str, rounds: int) -> Depth:
    with database(backend) as url, tempfile.TemporaryDirectory(prefix="dq-bench-") as tmp:
        workdir = Path(tmp)
        ((token, owner),) = code.setup(url, 1)
        began = time.perf_counter()
        fill(url, depth, owner)
        print(
            f"  {backend}, {code.label}: {depth:,} queued jobs filled in "
            f"{time.perf_counter() - began:.1f} s",
            file=sys.stderr,
        )
        head, deep = first_and_last(url, owner)
        claims = code.claim_ms(url, rounds)
        ms = {"claim (ours)": claims["ours"]}
        if "reference" in claims:
            ms["claim (SKIP LOCKED)"] = claims["reference"]
        metrics_token = secrets.token_hex(16)
        env = service_env(url, broker, workdir) | {
            # Measure the routes, not the limiter's or the caps' refusals.
            "DQ_RATE_LIMIT": "100000000/minute",
            "DQ_GLOBAL_RATE_LIMIT": "100000000/minute",
            "DQ_MAX_ACTIVE_JOBS_PER_OWNER": "100000000",
            "DQ_MAX_QUEUED_JOBS": "100000000",
            "DQ_METRICS_TOKEN": metrics_token,
        }
        auth = {"Authorization": f"Bearer {token}"}
        # In this order: the submit renews the web process's view of the queue (its own write),
        # so the list after it pays for reading the view again and the polls find it fresh, as
        # most polls do (docs/QUEUE.md).
        routes: dict[str, tuple[str, str, dict[str, str], bytes | None, int]] = {
            "submit": (
                "POST",
                "/api/v1/jobs",
                {**auth, "Content-Type": "application/json"},
                json.dumps({"prompt": PROMPT}).encode(),
                202,
            ),
            "list": ("GET", "/api/v1/jobs?limit=20", auth, None, 200),
            "poll": ("GET", f"/api/v1/jobs/{deep}", auth, None, 200),
            "poll (head)": ("GET", f"/api/v1/jobs/{head}", auth, None, 200),
            "trivial, authenticated": ("GET", "/api/v1/me", auth, None, 200),
            "trivial route": ("GET", "/healthz", {}, None, 200),
            "/metrics": (
                "GET",
                "/metrics",
                {"Authorization": f"Bearer {metrics_token}"},
                None,
                200,
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in routes}
        errors = dict.fromkeys(routes, 0)
        position = None
        with web(code, env, workdir, workers=1) as port:
            client = Client(port)
            for r in range(WARMUP + rounds):
                for name, (method, path, headers, body, expected) in routes.items():
                    status, data, seconds = client.call(method, path, headers, body)
                    if status != expected:
                        errors[name] += 1
                        if errors[name] == 1:
                            print(f"  {name}: {status} {data[:300]!r}", file=sys.stderr)
                    if r >= WARMUP:
                        times[name].append(seconds * 1000)
                    if name == "poll" and status == 200:
                        position = json.loads(data).get("queue_position")
            client.close()
        ms |= {name: statistics.median(t) for name, t in times.items()}
        return Depth(backend, code.label, depth, ms, errors, position)


def print_depths(results: list[Depth]) -> None:
    print(
        "| backend | code | queued jobs | " + " | ".join(COLUMNS[:6]) + " | poll/trivial | ", end=""
    )
    print(" | ".join(COLUMNS[6:]) + " |")
    print("|---|---|---:|" + "---:|" * (len(COLUMNS) + 1))
    for d in results:
        cells = [f"{d.ms[c]:.2f}" if c in d.ms else "—" for c in COLUMNS]
        # Against the trivial authenticated route where the code has one (GET /api/v1/me).
        trivial = (
            d.ms.get("trivial, authenticated")
            if not d.errors.get("trivial, authenticated")
            else None
        )
        ratio = f"{d.ms['poll'] / (trivial or d.ms['trivial route']):.1f}×"
        print(
            f"| {d.backend} | {d.code} | {d.depth:,} | "
            + " | ".join(cells[:6])
            + f" | {ratio} | "
            + " | ".join(cells[6:])
            + " |"
        )
    print()
    groups: dict[tuple[str, str], list[Depth]] = {}
    for d in results:
        groups.setdefault((d.backend, d.code), []).append(d)
    for (backend, code), ds in groups.items():
        small, large = min(ds, key=lambda d: d.depth), max(ds, key=lambda d: d.depth)
        if small is large:
            continue
        growth = ", ".join(
            f"{c} ×{large.ms[c] / small.ms[c]:.1f}" for c in COLUMNS if c in small.ms
        )
        print(f"Growth, {backend}, {code}, {small.depth:,} → {large.depth:,} queued: {growth}")
    for d in results:
        failed = {name: n for name, n in d.errors.items() if n}
        if failed:
            print(f"Errors, {d.backend}, {d.code}, {d.depth:,} queued: {failed}")
    print(
        "Deep job's reported queue position: "
        + "; ".join(f"{d.backend}, {d.code}, {d.depth:,}: {d.position}" for d in results)
    )


def depth_mode(codes: list[Code], args: argparse.Namespace) -> None:
    use_redis = redis_answers(SCALE_REDIS_URL)
    results: list[Depth] = []
    versions = []
    with tempfile.TemporaryDirectory(prefix="dq-bench-broker-") as broker_dir:
        broker = SCALE_REDIS_URL if use_redis else f"sqla+sqlite:///{broker_dir}/broker.sqlite3"
        for backend in args.backends:
            with database(backend) as url:
                versions.append(server_version(url))
            for depth in args.depths:
                if backend == "sqlite" and depth > args.sqlite_max:
                    continue
                for code in codes:
                    print(f"{backend}, {code.label}, {depth:,} queued …", file=sys.stderr)
                    results.append(measure_depth(code, backend, depth, broker, args.rounds))
        if use_redis:
            redis_answers(SCALE_REDIS_URL)  # flushes what the submissions queued

    print(f"CPU: {cpu_name()}; Python {platform.python_version()}; {', '.join(versions)}")
    print(
        f"Median of {args.rounds} (after {WARMUP} warm-ups), ms. Queued jobs of {OWNERS} owners "
        f"inserted by SQL; claims of {CLAIM_LIMIT} in a rolled-back transaction; HTTP against "
        "dq web (gunicorn, 1 process) on one keep-alive connection, the routes in interleaved "
        f"rounds; broker: {'Redis' if use_redis else 'SQLite'}. poll: the token's last queued "
        "job; poll (head): its first, the head of the queue; trivial, authenticated: GET "
        "/api/v1/me; trivial route: GET /healthz; list: GET /api/v1/jobs?limit=20 (the token's "
        "own jobs), right after the submit (which renews the process's view of the queue).\n"
    )
    print_depths(results)


# --- load mode ---------------------------------------------------------------------------------


@dataclass
class Load:
    code: str
    clients: int
    jobs: int
    seconds: float
    polls: list[float]
    errors: int


def load_run(code: Code, backend: str, args: argparse.Namespace) -> Load:
    redis_answers(LOAD_REDIS_URL)
    with database(backend) as url, tempfile.TemporaryDirectory(prefix="dq-bench-") as tmp:
        workdir = Path(tmp)
        tokens = code.setup(url, args.clients)
        env = service_env(url, LOAD_REDIS_URL, workdir)
        if args.precision:  # code from before issue 28 ignores it and runs fp32
            env["DQ_PRECISION"] = args.precision
        with web(code, env, workdir, workers=2) as port, worker(code, env, workdir):
            body = json.dumps({"prompt": PROMPT, "steps": args.steps}).encode()

            def headers(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

            # Warm-up: the worker loads the model on its first job.
            warm = Client(port)
            status, data, _ = warm.call("POST", "/api/v1/jobs", headers(tokens[0][0]), body)
            if status != 202:
                raise RuntimeError(f"warm-up submit: {status} {data[:300]!r}")
            path = f"/api/v1/jobs/{json.loads(data)['id']}"
            deadline = time.monotonic() + 900
            while (
                json.loads(warm.call("GET", path, headers(tokens[0][0]))[1])["status"] not in ENDED
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the warm-up job did not end in 15 minutes")
                time.sleep(0.5)
            warm.close()

            polls: list[list[float]] = [[] for _ in tokens]
            errors = [0] * len(tokens)
            finished = [0.0] * len(tokens)
            barrier = threading.Barrier(len(tokens) + 1)

            def client(i: int) -> None:
                c = Client(port, timeout=60)
                auth = headers(tokens[i][0])
                barrier.wait()
                pending = []
                for _ in range(args.jobs_per_client):
                    status, data, _ = c.call("POST", "/api/v1/jobs", auth, body)
                    if status == 202:
                        pending.append(f"/api/v1/jobs/{json.loads(data)['id']}")
                    else:
                        errors[i] += 1
                give_up = time.monotonic() + args.load_timeout
                while pending and time.monotonic() < give_up:
                    for path in list(pending):
                        status, data, seconds = c.call("GET", path, auth)
                        polls[i].append(seconds * 1000)
                        if status != 200:
                            errors[i] += 1
                            continue
                        job_status = json.loads(data)["status"]
                        if job_status in ENDED:
                            pending.remove(path)
                            errors[i] += job_status != "succeeded"
                    time.sleep(args.poll_every)
                errors[i] += len(pending)  # not ended in time
                finished[i] = time.perf_counter()
                c.close()

            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(tokens))]
            for t in threads:
                t.start()
            barrier.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
    flat = [x for per in polls for x in per]
    return Load(
        code.label,
        len(tokens),
        len(tokens) * args.jobs_per_client,
        max(finished) - start,
        flat,
        sum(errors),
    )


def load_mode(codes: list[Code], args: argparse.Namespace) -> None:
    if not redis_answers(LOAD_REDIS_URL):
        raise SystemExit(f"Redis does not answer at {LOAD_REDIS_URL}")
    backend = "postgresql" if "postgresql" in args.backends else "sqlite"
    with database(backend) as url:
        version = server_version(url)
    results = []
    for code in codes:
        print(f"load, {code.label}, {args.clients} clients …", file=sys.stderr)
        results.append(load_run(code, backend, args))
    redis_answers(LOAD_REDIS_URL)

    print(f"CPU: {cpu_name()}; Python {platform.python_version()}; {version}; Redis broker")
    print(
        f"{args.clients} REST clients (threads, a token each) each submit "
        f"{args.jobs_per_client} {args.steps}-step jobs at once and poll each every "
        f"{args.poll_every:g} s until it ends; dq web (gunicorn, 2 processes) and one dq worker "
        "(shipped default model, after a warm-up job) on this machine. The worker's "
        f"precision: {args.precision or 'its default (auto)'}; code from before issue 28 "
        "always runs fp32.\n"
    )
    print(
        "| code | clients | jobs | time to finish, s | jobs/s | polls | poll p50 ms | poll p99 ms "
        "| errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        p99 = statistics.quantiles(r.polls, n=100)[98] if len(r.polls) >= 100 else max(r.polls)
        print(
            f"| {r.code} | {r.clients} | {r.jobs} | {r.seconds:.1f} | {r.jobs / r.seconds:.2f} | "
            f"{len(r.polls):,} | {statistics.median(r.polls):.1f} | {p99:.1f} | {r.errors} |"
        )


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k queued; 4 load clients.")
    parser.add_argument("--depths", help="Comma-separated (default 1000,10000,100000,1000000).")
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--sqlite-max", type=int, default=100_000, help="Deepest SQLite queue.")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--old", metavar="REF", help="Also measure REF's code (a git worktree).")
    parser.add_argument("--code-root", type=Path, help="Measure this checkout instead of ours.")
    parser.add_argument("--load", action="store_true", help="The load run instead of the depths.")
    parser.add_argument("--clients", type=int, help="Load clients (default 32; --quick 4).")
    parser.add_argument("--jobs-per-client", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--poll-every", type=float, default=0.2)
    parser.add_argument("--load-timeout", type=float, default=1800)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="DQ_PRECISION for the load run's worker (default: the worker's own, auto).",
    )
    args = parser.parse_args()
    default_depths = "1000,10000" if args.quick else "1000,10000,100000,1000000"
    args.depths = [int(d) for d in (args.depths or default_depths).split(",")]
    args.backends = [b.strip() for b in args.backends.split(",")]
    if unknown := set(args.backends) - {"postgresql", "sqlite"}:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    args.clients = args.clients or (4 if args.quick else 32)

    with ExitStack() as stack:
        if args.code_root:
            codes = [Code(f"code at {args.code_root}", args.code_root.resolve())]
        else:
            codes = [Code("ours", REPO)]
        if args.old:
            codes.append(Code(f"before ({args.old})", stack.enter_context(worktree(args.old))))
        if args.load:
            load_mode(codes, args)
        else:
            depth_mode(codes, args)


if __name__ == "__main__":
    main()
