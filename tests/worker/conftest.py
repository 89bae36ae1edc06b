"""A whole generation stack for worker tests: database, broker, object storage, a tiny model
registered as the active version, and real worker processes started with ``dq worker``.

Two topologies:
- ``embedded``: SQLite, kombu's SQLAlchemy transport on SQLite, a local directory;
- ``production``: the real PostgreSQL and Redis, and moto's S3 server over HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus, ModelKind, ModelVersion, TrainingRun, make_engine
from core.db.session import session_scope
from core.queue.dispatch import publish_job, publish_run
from core.runtime.settings import Settings
from core.services.jobs import JobRequest, submit_job
from core.storage import Storage, make_storage
from tests.conftest import make_tiny_pipeline
from tests.services import postgres_schema, require_redis

ROOT = Path(__file__).resolve().parents[2]
# A database of its own, so that a parallel run can pick another one.
REDIS_TEST_URL = os.environ.get("DQ_TEST_WORKER_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass
class Stack:
    name: str
    env: dict[str, str]
    settings: Settings
    engine: Engine
    storage: Storage
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)
    model_version_id: uuid.UUID | None = None
    _publisher: Any = None

    # --- processes ------------------------------------------------------------------------

    def _spawn(
        self, args: list[str], name: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        env = {**os.environ, **self.env, **(extra_env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", *args],
            cwd=self.tmp,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def start_worker(
        self, queues: str = "generate", extra_env: dict[str, str] | None = None, wait: bool = True
    ) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        proc = self._spawn(
            ["worker", "--queues", queues, "--name", f"w{n}-{uuid.uuid4().hex[:6]}@%h"],
            "worker",
            extra_env,
        )
        if wait:
            self.wait_for_log(proc, "ready.", timeout=90)
        return proc

    def start_workers(
        self, count: int, queues: str = "generate", extra_env: dict[str, str] | None = None
    ) -> list[subprocess.Popen[bytes]]:
        """``count`` workers started together, not one after another (each spends seconds
        importing torch); returns once every one is ready."""
        procs = [self.start_worker(queues, extra_env, wait=False) for _ in range(count)]
        for proc in procs:
            self.wait_for_log(proc, "ready.", timeout=90)
        return procs

    def start_web(self, port: int, workers: int = 2) -> str:
        """``dq web`` (gunicorn) on loopback; returns its base URL once /healthz answers."""
        import urllib.request

        proc = self._spawn(["web", "--port", str(port), "--workers", str(workers)], "web")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    return url
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log_text(proc)[-3000:]
                    raise AssertionError(f"web did not start:\n{log}") from None
                time.sleep(0.2)

    def start_reaper(self, interval: float = 0.3, wait: bool = True) -> subprocess.Popen[bytes]:
        proc = self._spawn(["reaper", "--interval", str(interval)], "reaper")
        if wait:
            self.wait_for_log(proc, "reaper started", timeout=60)
        return proc

    def log_text(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def wait_for_log(self, proc: subprocess.Popen[bytes], text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text(proc):
                return
            if proc.poll() is not None:
                raise AssertionError(
                    f"process exited {proc.returncode}:\n{self.log_text(proc)[-4000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in {timeout} s:\n{self.log_text(proc)[-4000:]}")

    def kill_group(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        """Signal the process group and return at once (SIGSTOP, SIGCONT)."""
        os.killpg(proc.pid, sig)

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        """SIGKILL every process group at once: a test's teardown needs no graceful drain (the
        tests that need a warm shutdown send SIGTERM themselves), and waiting for one cost
        two to three seconds a test. Killing the group also ends gunicorn's and Celery's
        children, and a frozen (SIGSTOPped) process."""
        running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in running:
            proc.wait(timeout=10)

    # --- jobs -----------------------------------------------------------------------------

    def publisher(self) -> Any:
        """One publisher per stack: each new one is a Celery app and a broker connection."""
        if self._publisher is None:
            from core.queue.broker import CeleryPublisher

            self._publisher = CeleryPublisher.from_settings(self.settings)
        return self._publisher

    def publish(self, model: type[Job] | type[TrainingRun], row_id: uuid.UUID) -> None:
        """Send a committed, queued job's or run's message, as the web app does right after the
        commit. A running reaper may have sent it between the commit and this call: then this
        sends nothing, and the row must show it published."""
        send, read = (publish_job, self.job) if model is Job else (publish_run, self.run)
        sent = send(self.engine, self.publisher(), row_id)
        assert sent or read(row_id).published_at is not None

    def submit(
        self, prompt: str = "a small red circle in the center", publish: bool = True, **kw: Any
    ) -> uuid.UUID:
        """Submit the way the web app does: submit_job, commit, publish_job."""
        with session_scope(self.engine) as s:
            job, _ = submit_job(s, JobRequest(prompt=prompt, **kw), "token:1", self.settings)
            job_id = job.id
        if publish:
            self.publish(Job, job_id)
        return job_id

    def job(self, job_id: uuid.UUID) -> Job:
        with Session(self.engine, expire_on_commit=False) as s:
            job = s.get(Job, job_id)
            assert job is not None
            _ = job.images  # load while the session is open
            return job

    def run(self, run_id: uuid.UUID) -> TrainingRun:
        with Session(self.engine) as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None
            return run

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs.values()
        )
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")

    def wait_status(self, job_id: uuid.UUID, *statuses: JobStatus, timeout: float = 90) -> Job:
        self.wait_until(lambda: self.job(job_id).status in statuses, timeout, f"job in {statuses}")
        return self.job(job_id)


@functools.cache
def tiny_model_files() -> dict[str, bytes]:
    """The tiny pipeline's model.json and model.safetensors, made once a session (every stack
    and every in-process context registers the same model)."""
    with tempfile.TemporaryDirectory() as d:
        make_tiny_pipeline().save(Path(d))
        return {f: (Path(d) / f).read_bytes() for f in ("model.json", "model.safetensors")}


def register_tiny_model(
    engine: Engine, storage: Storage, version_id: uuid.UUID | None = None, upload: bool = True
) -> uuid.UUID:
    """Upload a tiny randomly initialised pipeline and make it the active denoiser version
    (``upload=False``: its files are in storage already)."""
    import json

    files = tiny_model_files()
    if upload:
        for f, data in files.items():
            storage.put(f"models/tiny/{f}", data)
    version_id = version_id or uuid.uuid4()
    with session_scope(engine) as s:
        s.add(
            ModelVersion(
                id=version_id,
                name="tiny",
                kind=ModelKind.DENOISER,
                checkpoint_key="models/tiny",
                config=json.loads(files["model.json"]),
                is_active=True,
            )
        )
    return version_id


def _flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_TEST_URL).flushdb()


@pytest.fixture(params=["embedded", "production"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    yield from _stack_for_test(request, tmp_path, request.param)


@pytest.fixture
def production_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    yield from _stack_for_test(request, tmp_path, "production")


@pytest.fixture
def embedded_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    yield from _stack_for_test(request, tmp_path, "embedded")


def _stack_for_test(request: pytest.FixtureRequest, tmp: Path, topology: str) -> Iterator[Stack]:
    with open_stack(request, tmp, topology) as stack:
        yield stack
        record_outcomes(stack, request.node.nodeid)


@contextlib.contextmanager
def open_stack(request: pytest.FixtureRequest, tmp: Path, topology: str) -> Iterator[Stack]:
    """The services of ``topology``, the schema migrated and the tiny model registered; every
    process the stack started is stopped at the end."""
    env = {
        "PYTHONPATH": str(ROOT),
        "DQ_JOB_LEASE_SECONDS": "2",
        "DQ_MAX_STEPS": "1000",
        "DQ_MODEL_CACHE_DIR": str(tmp / "models"),
        "DQ_WORK_DIR": str(tmp / "work"),
        "DQ_DATA_ROOT": str(tmp / "datasets"),
        "DQ_SECRET_KEY": "9c1e5a7f3b2d8e4a6c0f1b9d7e3a5c2f",
        "DQ_DEVICE": "cpu",
        "DQ_TRAIN_EVAL_IMAGES": "8",  # the quick eval that ends a denoiser run, kept cheap
        # The tests compare stored images bit for bit with fp32 in-process generation.
        "DQ_PRECISION": "fp32",
        "OMP_NUM_THREADS": "1",
    }
    if topology == "embedded":
        env |= {
            "DQ_DATABASE_URL": f"sqlite:///{tmp / 'dq.sqlite3'}",
            "DQ_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.sqlite3'}",
            "DQ_STORAGE_URL": f"file://{tmp / 'objects'}",
        }
        with _started(topology, env, tmp) as stack:
            yield stack
        return
    require_redis(REDIS_TEST_URL)
    endpoint = request.getfixturevalue("moto_endpoint")
    import boto3

    bucket = f"dq-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    with postgres_schema() as url:
        env |= {
            "DQ_DATABASE_URL": url,
            "DQ_BROKER_URL": REDIS_TEST_URL,
            "DQ_STORAGE_URL": f"s3://{bucket}/dq",
            "DQ_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        _flush_redis()
        try:
            with _started(topology, env, tmp) as stack:
                yield stack
        finally:
            _flush_redis()


@contextlib.contextmanager
def _started(topology: str, env: dict[str, str], tmp: Path) -> Iterator[Stack]:
    settings = Settings.from_env(env)
    from core.db import migrate

    migrate.upgrade(settings.database_url)  # as `dq db upgrade` does in production
    engine = make_engine(settings.database_url)
    storage = make_storage(settings)
    stack = Stack(topology, env, settings, engine, storage, tmp)
    stack.model_version_id = register_tiny_model(engine, storage)
    try:
        yield stack
    finally:
        stack.stop_all()
        engine.dispose()


@contextlib.contextmanager
def view_of_shared_stack(shared: Stack, tmp: Path, test: str) -> Iterator[Stack]:
    """One test's view of a production stack that several tests share (its services, schema,
    bucket, tiny model and any process the sharing fixture started, such as ``dq web``): the
    test's own processes and logs under its own ``tmp``. At its end what the test's work came
    to is recorded, its processes are stopped, and the stack is emptied for the next test:
    every table but the tokens, the tiny model registered again, the Redis database flushed."""
    assert shared.name == "production"
    view = dataclasses.replace(shared, env=dict(shared.env), tmp=tmp, procs=[], logs={})
    try:
        yield view
        record_outcomes(view, test)
    finally:
        view.stop_all()
        _empty(shared)


def _empty(stack: Stack) -> None:
    from sqlalchemy import text

    from core.db import ApiToken, Base

    kept = ApiToken.__tablename__
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables if t.name != kept)
    with stack.engine.begin() as conn:
        # A lock still held by a killed worker's session is released within moments; never
        # wait for one for good.
        conn.execute(text("SET LOCAL lock_timeout = '30s'"))
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    assert stack.model_version_id is not None
    register_tiny_model(stack.engine, stack.storage, stack.model_version_id, upload=False)
    _flush_redis()


# --- what each test's jobs came to ----------------------------------------------------------

OUTCOMES = ROOT / "artifacts" / "chaos" / "outcomes.jsonl"


def record_outcomes(stack: Stack, test: str) -> None:
    """Append what the test's jobs and runs came to: submitted, succeeded, failed, canceled, and
    run twice (a job whose images two attempts both stored, a run that registered two versions),
    for the table at the end of the session."""
    import json

    from sqlalchemy import select

    with Session(stack.engine) as s:
        jobs = s.execute(select(Job.id, Job.status)).all()
        runs = s.execute(select(TrainingRun.id, TrainingRun.status)).all()
        names = list(s.scalars(select(ModelVersion.name)))
    twice = 0
    for job_id, _ in jobs:
        attempts = {key.split("/")[2] for key in stack.storage.list(f"images/{job_id}/")}
        twice += len(attempts) > 1
    for run_id, _ in runs:
        # A trainer that reached the end uploaded its model under its attempt's prefix.
        ours = [n for n in names if n.endswith(run_id.hex[:8])]
        finals = {
            key.split("/")[2]
            for name in ours
            for key in stack.storage.list(f"models/{name}/")
            if key.endswith("model.safetensors")
        }
        twice += len(ours) > 1 or len(finals) > 1
    rows = [*jobs, *runs]
    line = {
        "test": test,
        "topology": stack.name,
        "jobs": len(jobs),
        "runs": len(runs),
        **{
            status.value: sum(1 for _, st in rows if st is status)
            for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
        },
        "run_twice": twice,
    }
    OUTCOMES.parent.mkdir(parents=True, exist_ok=True)
    with OUTCOMES.open("a") as f:
        f.write(json.dumps(line) + "\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    OUTCOMES.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The failure scenarios as a table: what was submitted and what it came to."""
    import json

    if not OUTCOMES.is_file():
        return
    from core.runtime.machine import cpu_name

    lines = [json.loads(x) for x in OUTCOMES.read_text().splitlines() if x.strip()]
    chaos = [x for x in lines if "chaos" in x["test"] or "killed" in x["test"]]
    if not chaos:
        return
    tr = terminalreporter
    tr.section(f"failure scenarios (CPU: {cpu_name()})")
    tr.write_line("| scenario | topology | submitted | succeeded | failed | canceled | run twice |")
    tr.write_line("|---|---|---:|---:|---:|---:|---:|")
    for x in chaos:
        name = x["test"].split("::")[-1]
        submitted = f"{x['jobs']} jobs" + (f" + {x['runs']} runs" if x["runs"] else "")
        tr.write_line(
            f"| `{name}` | {x['topology']} | {submitted} | {x['succeeded']} | {x['failed']} "
            f"| {x['canceled']} | {x['run_twice']} |"
        )
