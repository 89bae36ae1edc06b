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
from core.runtime.settings import Settings
from core.services.jobs import JobRequest, submit_job
from core.storage import LocalStorage, StorageError
from tests.conftest import tmp_env
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
        {
            "DQ_MODEL_CACHE_DIR": str(tmp_path / "models"),
            "DQ_DEVICE": "cpu",
            "DQ_PRECISION": "fp32",
            **tmp_env(tmp_path),
        },
        storage_url=f"file://{tmp_path / 'objects'}",
        **settings,
    )
    storage = FlakyStorage(tmp_path / "objects", failures)
    register_tiny_model(engine, storage)
    return build_context(s, Recorder(), engine=engine, storage=storage)


def submit(ctx: WorkerContext, **kw: Any) -> uuid.UUID:
    with session_scope(ctx.engine) as s:
        job, _ = submit_job(s, JobRequest(prompt="a red circle", steps=3, **kw), "token:1",
                            ctx.settings, storage=ctx.storage)  # fmt: skip
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
    assert got.error == "the GPU ran out of memory for this job; try fewer images or a smaller size"
    assert got.attempts == 1  # not retried: the same job would run out again


def inject(monkeypatch: pytest.MonkeyPatch, faults_spec: str) -> None:
    from worker import faults

    monkeypatch.setenv(faults.ENV, faults_spec)
    faults._faults.cache_clear()
    faults._counts.clear()
    monkeypatch.setattr(faults, "_counts", {})


def test_out_of_memory_splits_the_batch_so_only_a_job_too_big_alone_fails(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, "oom_over_rows=2")
    ctx = context(engine, tmp_path)
    small = [submit(ctx, seed=i) for i in range(3)]  # one image each
    big = submit(ctx, num_images=3, seed=9)  # never fits
    assert run_generation(ctx, small[0])  # claims all four as one batch of 6 rows
    outcomes = {j: job(engine, j) for j in [*small, big]}
    for j in small:
        assert outcomes[j].status is JobStatus.SUCCEEDED, outcomes[j].error
        assert outcomes[j].attempts == 1 and len(outcomes[j].images) == 1
    assert outcomes[big].status is JobStatus.FAILED
    assert outcomes[big].error is not None and "ran out of memory" in outcomes[big].error


def test_a_job_whose_input_breaks_the_model_fails_alone(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, "poison=zebra")
    ctx = context(engine, tmp_path)
    with session_scope(ctx.engine) as s:
        jobs = [
            submit_job(s, JobRequest(prompt=p, steps=3), "token:1", ctx.settings)[0].id
            for p in ("a red circle", "a zebra circle", "a blue square", "a green circle")
        ]
    run_generation(ctx, jobs[0])
    got = [job(engine, j) for j in jobs]
    assert [g.status for g in got] == [
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.SUCCEEDED,
        JobStatus.SUCCEEDED,
    ]
    assert got[1].error is not None and "cannot take 'zebra'" in got[1].error


def test_a_failed_progress_write_costs_nothing(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.generation as generation

    inject(monkeypatch, "progress_write_fails=2")
    monkeypatch.setattr(generation, "PROGRESS_EVERY_S", 0.0)  # a write every step
    ctx = context(engine, tmp_path)
    jobs = [submit(ctx, seed=i) for i in range(4)]
    run_generation(ctx, jobs[0])
    for j in jobs:
        got = job(engine, j)
        assert (got.status, got.attempts, got.progress_step) == (JobStatus.SUCCEEDED, 1, 3)


def test_a_job_lost_while_the_worker_stalled_gets_nothing_written(
    engine: Engine, tmp_path: Path
) -> None:
    """The worker claimed the job, stalled; the reaper re-queued it and another claim took it.
    The stalled worker then finishes: it writes no row and no object under the holder's keys."""
    from core.db.transitions import requeue

    ctx = context(engine, tmp_path)
    job_id = submit(ctx, seed=4)
    batch = generation_claim(ctx, job_id)
    with session_scope(engine) as s:  # the reaper, then a second worker's claim
        assert requeue(s, batch.jobs[0].lease)
    other = generation_claim(ctx, job_id)
    assert other.jobs[0].attempts == 2
    from worker.generation import run_batch

    run_batch(ctx, batch)  # the stalled worker wakes and runs its (lost) batch
    got = job(engine, job_id)
    assert (got.status, got.images, got.progress_step) == (JobStatus.RUNNING, [], 0)
    assert list(ctx.storage.list(f"images/{job_id}/")) == []
    run_batch(ctx, other)  # the holder finishes
    got = job(engine, job_id)
    assert got.status is JobStatus.SUCCEEDED
    assert [im.storage_key for im in got.images] == [f"images/{job_id}/2/0.png"]


def generation_claim(ctx: WorkerContext, job_id: uuid.UUID) -> Any:
    from worker.generation import claim_batch

    batch = claim_batch(ctx, job_id)
    assert batch is not None
    return batch


def test_a_job_lost_when_the_broker_restarted_empty_is_republished_and_runs(
    production_stack: Stack,
) -> None:
    from datetime import timedelta

    import redis

    from core.queue.dispatch import REPUBLISH_WHEN_QUEUE_EMPTY
    from tests.worker.conftest import REDIS_TEST_URL

    stack = production_stack
    job_id = stack.submit(steps=3)
    assert redis.Redis.from_url(REDIS_TEST_URL).llen("generate") == 1
    redis.Redis.from_url(REDIS_TEST_URL).flushdb()  # Redis restarts and comes back empty
    with session_scope(stack.engine) as s:  # ... a while after the message went out
        sent = s.get(Job, job_id)
        assert sent is not None and sent.published_at is not None
        sent.published_at -= REPUBLISH_WHEN_QUEUE_EMPTY + timedelta(seconds=1)
    worker = stack.start_worker(wait=False)
    stack.start_reaper(wait=False)
    stack.wait_for_log(worker, "ready.", timeout=90)
    got = stack.wait_status(job_id, JobStatus.SUCCEEDED, timeout=60)
    assert got.attempts == 1


def test_previews_are_deleted_once_the_job_has_ended(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.generation as generation

    monkeypatch.setattr(generation, "PREVIEW_EVERY_S", 0.0)  # a preview every step
    ctx = context(engine, tmp_path)
    written: list[str] = []
    put = ctx.storage.put

    def recording_put(key: str, data: bytes, content_type: str = "") -> None:
        written.append(key)
        put(key, data, content_type)

    monkeypatch.setattr(ctx.storage, "put", recording_put)
    job_id = submit(ctx)
    assert run_generation(ctx, job_id)
    got = job(engine, job_id)
    assert got.status is JobStatus.SUCCEEDED and got.preview_key is None
    assert f"previews/{job_id}/1.png" in written  # there was one while it ran
    assert list(ctx.storage.list(f"previews/{job_id}")) == []
    assert list(ctx.storage.list(f"images/{job_id}/")) == [f"images/{job_id}/1/0.png"]


def test_a_jobs_guidance_interval_reaches_the_model_and_its_images(
    engine: Engine, tmp_path: Path
) -> None:
    """A job guided only in [0.2, 0.6] makes exactly the image the pipeline makes with that
    interval, which differs from the image guided at every step."""
    import numpy as np

    from tests.conftest import make_tiny_pipeline

    ctx = context(engine, tmp_path)
    job_id = submit(ctx, guidance=4.0, seed=5, guidance_interval=[0.6, 0.2])
    assert run_generation(ctx, job_id)
    done = job(engine, job_id)
    assert done.status is JobStatus.SUCCEEDED and done.guidance_interval == [0.2, 0.6]
    import io

    from PIL import Image as PILImage

    got = np.asarray(PILImage.open(io.BytesIO(ctx.storage.get(done.images[0].storage_key))))
    pipeline = make_tiny_pipeline()
    kw = {"steps": 3, "guidance": 4.0, "seeds": [5], "sampler": done.sampler}
    interval = pipeline.generate(["a red circle"], guidance_interval=(0.2, 0.6), **kw)[0]
    every = pipeline.generate(["a red circle"], **kw)[0]
    assert np.array_equal(got, np.asarray(interval))
    assert not np.array_equal(np.asarray(interval), np.asarray(every))


def _png_data_url(pixels: Any) -> str:
    import base64
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_edit_jobs_batch_with_text_to_image_and_keep_the_unmasked_pixels(
    engine: Engine, tmp_path: Path
) -> None:
    """An inpainting job, an image-to-image job at another strength and a text-to-image job run
    as one batch; the inpainted image keeps every pixel outside its mask, and each image is the
    one its seed gives alone (core.diffusion.editing)."""
    import io

    import numpy as np
    from PIL import Image as PILImage

    from core.diffusion.pipeline import LatentDiffusion

    ctx = context(engine, tmp_path)
    rng = np.random.default_rng(0)
    init = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    init[8:24, 8:24] = (200, 0, 0)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    inpaint = submit(ctx, seed=1, init_image=_png_data_url(init), mask=_png_data_url(mask))
    edit = submit(ctx, seed=2, init_image=_png_data_url(init), strength=0.5)
    plain = submit(ctx, seed=3)
    assert run_generation(ctx, inpaint)  # claims all three as one batch
    done = {j: job(engine, j) for j in (inpaint, edit, plain)}
    assert all(d.status is JobStatus.SUCCEEDED for d in done.values()), [
        d.error for d in done.values()
    ]
    # All three succeeded in the one run_generation call: one claim, one batch.

    def pixels(j: uuid.UUID) -> Any:
        data = ctx.storage.get(done[j].images[0].storage_key)
        return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))

    assert np.array_equal(pixels(inpaint)[:, 16:], init[:, 16:])
    model = ctx.models.get(done[edit].model_version_id)
    assert isinstance(model, LatentDiffusion)
    (alone,) = model.generate(
        ["a red circle"], steps=3, seeds=[2], size=32, guidance=done[edit].guidance,
        sampler=done[edit].sampler, init_images=[PILImage.fromarray(init)], strength=0.5,
    )  # fmt: skip
    assert np.array_equal(pixels(edit), np.asarray(alone))
