"""Failure as it happens in long-running production, caused from outside against real
``dq worker``, ``dq reaper`` and ``dq web`` processes on PostgreSQL, Redis and S3: a job past its
time limit, a worker hung where no Python check runs, a worker frozen past its lease that wakes
up (SIGSTOP/SIGCONT), a warm shutdown (SIGTERM) mid-job, out of memory and a lost progress write
inside a batch. Each test submits and polls through the REST API, as a client would.

Faults that cannot be caused from outside (a GPU out of memory, a hung kernel) are injected into
the worker process with ``DQ_TEST_FAULTS`` (``worker/faults.py``).
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.db import JobStatus, Role
from core.db.session import session_scope
from core.services.tokens import create_token
from tests.e2e.test_embedded import free_port
from tests.e2e.test_production import call
from tests.worker.conftest import Stack, open_stack, view_of_shared_stack
from worker.watchdog import EXIT_HUNG


@dataclass
class Api:
    base: str
    token: str

    def call(self, path: str, method: str = "GET", body: Any = None) -> Any:
        return call(self.base + path, self.token, method, body)

    def submit(self, **body: Any) -> uuid.UUID:
        body.setdefault("prompt", "a small red circle in the center")
        return uuid.UUID(self.call("/api/v1/jobs", "POST", body)["id"])

    def job(self, job_id: uuid.UUID) -> Any:
        return self.call(f"/api/v1/jobs/{job_id}")

    def wait(self, stack: Stack, job_id: uuid.UUID, timeout: float = 120) -> Any:
        ended = ("succeeded", "failed", "canceled")
        stack.wait_until(lambda: self.job(job_id)["status"] in ended, timeout, "the job to end")
        return self.job(job_id)


@pytest.fixture(scope="module")
def shared_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One production stack for the module: services, schema, bucket and tiny model once;
    each test gets a view of it with processes of its own, and an empty stack after it."""
    with open_stack(request, tmp_path_factory.mktemp("chaos"), "production") as shared:
        yield shared


@pytest.fixture(scope="module")
def shared_api(shared_stack: Stack) -> Api:
    """``dq web`` once for the module, and a token for its client."""
    base = shared_stack.start_web(free_port(), workers=1)
    with session_scope(shared_stack.engine) as s:
        _, token = create_token(s, Role.USER, "chaos")
    return Api(base, token)


@pytest.fixture
def stack(shared_stack: Stack, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with view_of_shared_stack(shared_stack, tmp_path, request.node.nodeid) as view:
        yield view


@pytest.fixture
def api(shared_api: Api, stack: Stack) -> Api:
    return shared_api


class Poller:
    """Polls a job's progress through the API from a thread, as a client's page does."""

    def __init__(self, api: Api, job_id: uuid.UUID):
        self.api, self.job_id = api, job_id
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.api.job(self.job_id)
            except OSError:
                continue
            self.seen.append(job["progress"]["step"])
            if job["status"] in ("succeeded", "failed", "canceled"):
                return
            time.sleep(0.02)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def drops(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b in zip(self.seen, self.seen[1:], strict=False) if b < a]


def test_a_job_past_its_time_limit_fails_naming_it_and_the_worker_serves_the_next(
    stack: Stack, api: Api
) -> None:
    worker = stack.start_worker(extra_env={"DQ_JOB_TIME_LIMIT_SECONDS": "3"})
    started = time.monotonic()
    slow = api.submit(steps=1000, sampler="ddpm", num_images=8, seed=1)
    job = api.wait(stack, slow, timeout=60)
    assert job["status"] == "failed"
    assert job["error"] == "ran past the 3 s time limit"
    assert time.monotonic() - started < 60  # not the whole job: it would take minutes
    nxt = api.wait(stack, api.submit(steps=4, seed=2))
    assert nxt["status"] == "succeeded", nxt["error"]
    assert worker.poll() is None  # the same process served it


def test_a_worker_hung_where_no_check_runs_exits_and_its_job_fails_naming_the_limit(
    stack: Stack, api: Api
) -> None:
    hung = stack.start_worker(
        extra_env={
            "DQ_JOB_TIME_LIMIT_SECONDS": "5",
            "DQ_WORKER_HANG_GRACE_SECONDS": "2",
            # At the first step, before any check: blocks every signal and sleeps for good.
            "DQ_TEST_FAULTS": "hang_at_step=1",
        }
    )
    job_id = api.submit(steps=50, seed=3)
    job = api.wait(stack, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"] == "ran past the 5 s time limit"
    # Its supervisor starts a fresh worker, which serves the next job. It starts while the
    # hung one is on its way out; the next job is sent only once that one is gone.
    fresh = stack.start_worker(wait=False)
    stack.wait_until(lambda: hung.poll() is not None, 30, "the hung worker to exit")
    assert hung.returncode == EXIT_HUNG  # the watchdog ended the stuck process
    assert "is still running" in stack.log_text(hung)
    stack.wait_for_log(fresh, "ready.", timeout=90)
    nxt = api.wait(stack, api.submit(steps=4, seed=4))
    assert nxt["status"] == "succeeded", nxt["error"]


def test_a_worker_frozen_past_its_lease_loses_the_job_and_writes_nothing_after_waking(
    stack: Stack, api: Api
) -> None:
    # Frozen inside a transaction, it would hold row locks until PostgreSQL ends its session
    # (twice the statement timeout); keep that short here.
    reaper = stack.start_reaper(wait=False)  # it starts while the worker does
    # Each step takes 30 ms more, as on a slower GPU: the second attempt must still be running
    # when the first worker wakes, however fast this CPU runs 200 steps (1.4 s on AMX).
    slow = {"DQ_MAX_BATCH_SIZE": "1", "DQ_TEST_FAULTS": "step_seconds=0.03"}
    first = stack.start_worker(extra_env={**slow, "DQ_DB_STATEMENT_TIMEOUT_SECONDS": "2"})
    job_id = api.submit(steps=200, sampler="ddpm", num_images=3, seed=5)
    with Poller(api, job_id) as poller:
        stack.wait_until(lambda: api.job(job_id)["progress"]["step"] > 20, 60, "progress")
        stack.kill_group(first, signal.SIGSTOP)  # a VM freeze, a GC pause
        # The lease (2 s) runs out; the reaper re-queues; a second worker claims it. It starts
        # while the lease runs out: it can take the job only once the reaper has re-queued it.
        # The row is queued only until that worker claims it, too briefly to poll for.
        second = stack.start_worker(extra_env=slow, wait=False)
        stack.wait_for_log(reaper, f"re-queued jobs {job_id}", timeout=30)
        stack.wait_for_log(second, "ready.", timeout=90)
        stack.wait_until(lambda: stack.job(job_id).attempts == 2, 30, "the second claim")
        stack.wait_until(lambda: api.job(job_id)["progress"]["step"] > 5, 60, "progress again")
        stack.kill_group(first, signal.SIGCONT)  # it wakes and goes on as if nothing happened
        stack.wait_for_log(first, f"lost job {job_id}", timeout=30)
        job = api.wait(stack, job_id, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    # One clean restart: progress fell once, at the re-queue, and never went back after.
    assert len(poller.drops()) == 1, poller.seen
    assert poller.drops()[0][1] == 0
    row = stack.job(job_id)
    assert row.attempts == 2 and row.worker_host is not None
    assert [im.storage_key for im in row.images] == [f"images/{job_id}/2/{i}.png" for i in range(3)]
    for im in row.images:  # rows and bytes both come from the second worker
        assert hashlib.sha256(stack.storage.get(im.storage_key)).hexdigest() == im.sha256
    assert f"images/{job_id}/1/" not in " ".join(stack.storage.list(f"images/{job_id}/"))
    assert "running 1 job(s), 3 image(s)" in stack.log_text(second)
    assert first.poll() is None  # the woken worker goes on serving


def test_out_of_memory_in_a_batch_of_four_fails_only_the_job_too_big_alone(
    stack: Stack, api: Api
) -> None:
    small = [api.submit(steps=6, seed=10 + i) for i in range(3)]
    big = api.submit(steps=6, seed=20, num_images=3)
    worker = stack.start_worker(extra_env={"DQ_TEST_FAULTS": "oom_over_rows=2"})
    for job_id in small:
        job = api.wait(stack, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert stack.job(job_id).attempts == 1
    job = api.wait(stack, big)
    assert job["status"] == "failed"
    assert job["error"] == (
        "the GPU ran out of memory for this job; try fewer images or a smaller size"
    )
    log = stack.log_text(worker)
    assert "running 4 job(s), 6 image(s)" in log and "out of memory with 4 job(s)" in log


def test_failed_progress_writes_cost_the_batch_nothing(stack: Stack, api: Api) -> None:
    jobs = [api.submit(steps=150, sampler="ddim", seed=30 + i) for i in range(4)]
    worker = stack.start_worker(extra_env={"DQ_TEST_FAULTS": "progress_write_fails=3"})
    for job_id in jobs:
        job = api.wait(stack, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert stack.job(job_id).attempts == 1  # no attempt burned, nothing re-queued
    log = stack.log_text(worker)
    assert log.count("progress write failed") == 3
    assert "running 4 job(s), 4 image(s)" in log


def test_sigterm_mid_job_finishes_it_once(stack: Stack, api: Api) -> None:
    stack.start_reaper(wait=False)  # it starts while the worker does
    worker = stack.start_worker()
    job_id = api.submit(steps=150, sampler="ddpm", num_images=2, seed=40)
    stack.wait_until(lambda: api.job(job_id)["progress"]["step"] > 10, 60, "progress")
    worker.send_signal(signal.SIGTERM)  # warm shutdown: Celery lets the task finish
    assert worker.wait(timeout=120) == 0
    stack.start_worker()  # a message handed back must find the job done, not run it again
    job = api.wait(stack, job_id)
    assert job["status"] == "succeeded", job["error"]
    row = stack.job(job_id)
    assert row.attempts == 1 and len(row.images) == 2
    assert sorted(stack.storage.list(f"images/{job_id}/")) == [
        f"images/{job_id}/1/{i}.png" for i in range(2)
    ]


def test_a_trainer_frozen_past_its_lease_registers_nothing_after_waking(stack: Stack) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from core.db import ModelVersion, TrainingMetric
    from core.diffusion.checkpoint import load_checkpoint
    from tests.worker.test_worker_training import submit_run, wait_run

    first = stack.start_worker(queues="train", extra_env={"DQ_DB_STATEMENT_TIMEOUT_SECONDS": "2"})
    # Frozen past step 40 of 120, it wakes while the second worker trains the rest.
    run_id = submit_run(stack, "autoencoder", {"steps": 120, "checkpoint_every": 20})
    reaper = stack.start_reaper(wait=False)  # after the submit: its relay would publish it first
    stack.wait_until(lambda: stack.run(run_id).step >= 40, 120, "two checkpoints")
    stack.kill_group(first, signal.SIGSTOP)
    # It starts while the lease runs out: it can take the run only once it is re-queued. The
    # row is queued only until that worker claims it, too briefly to poll for.
    second = stack.start_worker(queues="train", wait=False)
    stack.wait_for_log(reaper, f"re-queued training_runs {run_id}", timeout=30)
    stack.wait_for_log(second, "ready.", timeout=90)
    stack.wait_until(lambda: stack.run(run_id).attempts == 2, 30, "the second claim")
    stack.wait_for_log(second, "resumes from step", timeout=60)
    stack.kill_group(first, signal.SIGCONT)
    stack.wait_for_log(first, f"lost training run {run_id}", timeout=60)
    run = wait_run(stack, run_id, timeout=300)
    assert run.status is JobStatus.SUCCEEDED, run.error
    assert run.attempts == 2 and run.step == 120
    with Session(stack.engine) as s:
        versions = s.scalars(select(ModelVersion)).all()
        steps = list(
            s.scalars(
                select(TrainingMetric.step)
                .where(TrainingMetric.run_id == run_id, TrainingMetric.name == "loss")
                .order_by(TrainingMetric.step)
            )
        )
    ours = [v for v in versions if v.name.endswith(run_id.hex[:8])]
    assert len(ours) == 1 and ours[0].id == run.model_version_id  # one version registered
    assert ours[0].checkpoint_key.endswith("/2")
    assert steps == sorted(set(steps)) and steps[-1] == 120  # no step recorded twice
    # The checkpoint the run points at is whole and is the second worker's.
    assert all(key.startswith(f"runs/{run_id}/2/") for key in run.checkpoint_keys)
    got = stack.tmp / "check"
    for key in run.checkpoint_keys:
        rel = key.split("/", 3)[3]
        (got / rel).parent.mkdir(parents=True, exist_ok=True)
        (got / rel).write_bytes(stack.storage.get(key))
    _, meta = load_checkpoint(got / "train_state")
    assert meta["step"] == 120
    for f in ("model.json", "model.safetensors"):
        (got / "version" / f).parent.mkdir(parents=True, exist_ok=True)
        (got / "version" / f).write_bytes(stack.storage.get(f"{ours[0].checkpoint_key}/{f}"))
    load_checkpoint(got / "version")


def test_a_job_past_its_time_limit_fails_under_the_prefork_pool_too(stack: Stack, api: Api) -> None:
    n = len(stack.procs)
    proc = stack._spawn(
        ["worker", "--queues", "generate", "--concurrency", "2", "--name", f"p{n}@%h"],
        "prefork",
        # The slow job below takes about 6 s on a fast 2-core machine; the limit is well under.
        {"DQ_JOB_TIME_LIMIT_SECONDS": "3"},
    )
    stack.wait_for_log(proc, "ready.", timeout=90)
    slow = api.submit(steps=1000, sampler="ddpm", num_images=8, seed=50)
    job = api.wait(stack, slow, timeout=90)
    assert (job["status"], job["error"]) == ("failed", "ran past the 3 s time limit")
    nxt = api.wait(stack, api.submit(steps=4, seed=51))
    assert nxt["status"] == "succeeded", nxt["error"]


def test_the_liveness_file_goes_stale_when_the_worker_freezes(stack: Stack) -> None:
    import subprocess
    import sys

    alive = stack.tmp / "run" / "worker.alive"
    worker = stack.start_worker(extra_env={"DQ_WORKER_LIVENESS_FILE": str(alive)})

    def probe() -> int:
        return subprocess.run(
            [sys.executable, "-m", "core.cli", "worker-alive", str(alive), "--max-age", "3"],
            env={**stack.env, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=60,
        ).returncode

    stack.wait_until(lambda: probe() == 0, 30, "a fresh liveness file")
    stack.kill_group(worker, signal.SIGSTOP)
    try:
        stack.wait_until(lambda: probe() == 1, 30, "the probe to fail")
    finally:
        stack.kill_group(worker, signal.SIGCONT)
    stack.wait_until(lambda: probe() == 0, 30, "the file to be fresh again")
