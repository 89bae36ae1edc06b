"""The generation task body in-process, for failures that are awkward to cause in a subprocess:
transient storage errors, the last attempt, out-of-memory, a broker restarted empty."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus
from core.db.session import session_scope
from core.jobs import JobRequest, submit_job
from core.settings import Settings
from core.storage import LocalStorage, StorageError
from tests.worker.conftest import Stack, register_tiny_model
from worker.context import WorkerContext, build_context
from worker.generation import run_generation


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], float | None]] = []

    def publish(
        self, task: str, queue: str, kwargs: dict[str, Any], countdown: float | None = None
    ) -> None:
        self.sent.append((task, kwargs, countdown))

    def queue_depth(self, queue: str) -> int | None:
        return 0


class FlakyStorage(LocalStorage):
    """Fails the first ``failures`` writes of images, like an S3 outage."""

    def __init__(self, root: Path, failures: int):
        super().__init__(root, secret="s")
        self.failures = failures

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if key.startswith("images/") and self.failures > 0:
            self.failures -= 1
            raise StorageError("S3 request failed (503): injected")
        super().put(key, data, content_type)


def context(engine: Engine, tmp_path: Path, failures: int = 0, **settings: Any) -> WorkerContext:
    s = Settings.from_env(
        {"DQ_MODEL_CACHE_DIR": str(tmp_path / "models"), "DQ_DEVICE": "cpu"},
        storage_url=f"file://{tmp_path / 'objects'}",
        **settings,
    )
    storage = FlakyStorage(tmp_path / "objects", failures)
    register_tiny_model(engine, storage, tmp_path)
    return build_context(s, Recorder(), engine=engine, storage=storage)


def submit(ctx: WorkerContext, **kw: Any) -> uuid.UUID:
    with session_scope(ctx.engine) as s:
        job, _ = submit_job(s, JobRequest(prompt="a red circle", steps=3, **kw), "token:1",
                            ctx.settings)  # fmt: skip
        return job.id


def job(engine: Engine, job_id: uuid.UUID) -> Job:
    with Session(engine) as s:
        got = s.get(Job, job_id)
        assert got is not None
        _ = got.images
        return got


def test_a_transient_storage_error_requeues_with_backoff_then_succeeds(
    engine: Engine, tmp_path: Path
) -> None:
    ctx = context(engine, tmp_path, failures=1)
    job_id = submit(ctx)
    assert run_generation(ctx, job_id)
    first = job(engine, job_id)
    assert (first.status, first.attempts, first.worker_host) == (JobStatus.QUEUED, 1, None)
    assert ctx.publisher.sent == [("dq.generate", {"job_id": str(job_id)}, 2.0)]  # type: ignore[attr-defined]
    assert run_generation(ctx, job_id)  # the re-published message
    done = job(engine, job_id)
    assert (done.status, done.attempts, len(done.images)) == (JobStatus.SUCCEEDED, 2, 1)


def test_the_last_attempt_fails_the_job_with_the_reason(engine: Engine, tmp_path: Path) -> None:
    ctx = context(engine, tmp_path, failures=10, job_max_attempts=2)
    job_id = submit(ctx)
    run_generation(ctx, job_id)
    run_generation(ctx, job_id)
    got = job(engine, job_id)
    assert got.status is JobStatus.FAILED and got.attempts == 2
    assert got.error == "failed after 2 attempts: S3 request failed (503): injected"
    assert not run_generation(ctx, job_id)  # a late message finds nothing to do


def test_out_of_memory_is_reported_in_words(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from core.diffusion.pipeline import LatentDiffusion

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LatentDiffusion, "generate", oom)
    ctx = context(engine, tmp_path)
    job_id = submit(ctx, num_images=4)
    run_generation(ctx, job_id)
    got = job(engine, job_id)
    assert got.status is JobStatus.FAILED
    assert (
        got.error == "the GPU ran out of memory for this batch; try fewer images or a smaller size"
    )


def test_a_job_lost_when_the_broker_restarted_empty_is_republished_and_runs(
    production_stack: Stack,
) -> None:
    import redis

    from tests.worker.conftest import REDIS_TEST_URL

    stack = production_stack
    job_id = stack.submit(steps=3)
    assert redis.Redis.from_url(REDIS_TEST_URL).llen("generate") == 1
    redis.Redis.from_url(REDIS_TEST_URL).flushdb()  # Redis restarts and comes back empty
    stack.start_worker()
    stack.start_reaper()
    got = stack.wait_status(job_id, JobStatus.SUCCEEDED, timeout=60)
    assert got.attempts == 1
