"""Running generation jobs: claim, batch across compatible jobs, denoise, store, record.

A task message names one job. The worker claims it with the conditional UPDATE of
``core.db.transitions``; a message for a job that is no longer queued (another worker holds it,
it finished, it was canceled, or this is a duplicate) does nothing. Having claimed one job, the
worker also claims queued jobs that can share its batch: same model version, sampler, steps and
size, up to DQ_MAX_BATCH_SIZE images. Their own messages, when they arrive, find them taken.

Each image is bit-identical to what it would be alone: every image has its own seed and noise
generator, and the model is batch-invariant (tests/core/test_pipeline.py). Each job keeps its
own progress, cancel, result and failure.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db.models import Image, Job, JobStatus, utcnow
from core.db.session import session_scope
from core.db.transitions import transition_job
from core.dispatch import publish_job
from core.jobs import image_key, preview_key
from core.storage import StorageError
from worker.context import WorkerContext
from worker.models import ModelUnavailable

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.25  # progress writes and cancel checks: at most four a second
PREVIEW_EVERY_S = 1.0
PREVIEW_SIZE = 128  # previews larger than this are shrunk; the page scales them up
TRANSIENT = (StorageError, SQLAlchemyError, ConnectionError, TimeoutError)


@dataclass
class BatchJob:
    """What the worker needs of one claimed job, detached from the session."""

    id: uuid.UUID
    prompt: str
    negative_prompt: str
    guidance: float
    seeds: list[int]
    attempts: int
    rows: list[int] = field(default_factory=list)  # this job's rows in the batch

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass
class Batch:
    jobs: list[BatchJob]
    model_version_id: uuid.UUID | None
    sampler: str
    steps: int
    size: int

    @property
    def ids(self) -> list[uuid.UUID]:
        return [j.id for j in self.jobs]


def _claim_values(ctx: WorkerContext) -> dict[str, Any]:
    return dict(
        worker_host=ctx.host,
        started_at=utcnow(),
        attempts=Job.attempts + 1,
        lease_expires_at=ctx.heartbeat.lease_expiry(),
        progress_step=0,
        preview_key=None,
        error=None,
    )


def claim_batch(ctx: WorkerContext, job_id: uuid.UUID) -> Batch | None:
    """Claim ``job_id`` and compatible queued jobs; None when ``job_id`` is not ours to run."""
    with session_scope(ctx.engine) as s:
        if not transition_job(
            s, job_id, JobStatus.RUNNING, expected=JobStatus.QUEUED, **_claim_values(ctx)
        ):
            return None
        first = s.get(Job, job_id)
        assert first is not None
        budget = ctx.settings.max_batch_size - first.num_images
        claimed = [first]
        if budget > 0:
            candidates = s.execute(
                select(Job.id, Job.num_images)
                .where(
                    Job.status == JobStatus.QUEUED,
                    Job.model_version_id.is_not_distinct_from(first.model_version_id),
                    Job.sampler == first.sampler,
                    Job.steps == first.steps,
                    Job.width == first.width,
                    Job.height == first.height,
                    Job.num_images <= budget,
                )
                .order_by(Job.created_at)
                .limit(4 * ctx.settings.max_batch_size)
            ).all()
            for cid, n in candidates:
                if n > budget:
                    continue
                if transition_job(
                    s, cid, JobStatus.RUNNING, expected=JobStatus.QUEUED, **_claim_values(ctx)
                ):
                    job = s.get(Job, cid)
                    assert job is not None
                    claimed.append(job)
                    budget -= n
                if budget == 0:
                    break
        batch = Batch(
            jobs=[
                BatchJob(
                    id=j.id,
                    prompt=j.prompt,
                    negative_prompt=j.negative_prompt,
                    guidance=j.guidance,
                    seeds=[j.seed + i for i in range(j.num_images)],
                    attempts=j.attempts,
                )
                for j in claimed
            ],
            model_version_id=first.model_version_id,
            sampler=first.sampler,
            steps=first.steps,
            size=first.width,
        )
    row = 0
    for j in batch.jobs:
        j.rows = list(range(row, row + j.num_images))
        row += j.num_images
    return batch


# --- outcomes --------------------------------------------------------------------------------


def fail_jobs(ctx: WorkerContext, job_ids: list[uuid.UUID], message: str) -> None:
    with session_scope(ctx.engine) as s:
        for job_id in job_ids:
            transition_job(
                s,
                job_id,
                JobStatus.FAILED,
                expected=JobStatus.RUNNING,
                error=message,
                finished_at=utcnow(),
                lease_expires_at=None,
            )


def retry_or_fail(ctx: WorkerContext, jobs: list[BatchJob], error: Exception) -> None:
    """A transient failure: back to the queue with backoff, or failed after the last attempt."""
    requeued: list[tuple[uuid.UUID, int]] = []
    with session_scope(ctx.engine) as s:
        for job in jobs:
            if job.attempts >= ctx.settings.job_max_attempts:
                transition_job(
                    s,
                    job.id,
                    JobStatus.FAILED,
                    expected=JobStatus.RUNNING,
                    finished_at=utcnow(),
                    lease_expires_at=None,
                    error=f"failed after {job.attempts} attempts: {error}",
                )
            elif transition_job(
                s,
                job.id,
                JobStatus.QUEUED,
                expected=JobStatus.RUNNING,
                worker_host=None,
                lease_expires_at=None,
                published_at=None,
                progress_step=0,
            ):
                requeued.append((job.id, job.attempts))
    for job_id, attempts in requeued:
        try:
            publish_job(ctx.engine, ctx.publisher, job_id, countdown=min(2.0**attempts, 60.0))
        except Exception:  # the relay publishes it once the broker is back
            log.warning("could not re-publish job %s; the relay will", job_id, exc_info=True)


class _NoLongerRunning(Exception):
    pass


def encode_png(image: PILImage.Image, prompt: str, seed: int) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def store_results(ctx: WorkerContext, job: BatchJob, images: list[PILImage.Image]) -> None:
    """Write the PNGs under deterministic keys (a retry overwrites), then the image rows and the
    job's success in one transaction."""
    rows = []
    for index, (img, seed) in enumerate(zip(images, job.seeds, strict=True)):
        data = encode_png(img, job.prompt, seed)
        key = image_key(job.id, index)
        ctx.storage.put(key, data, "image/png")
        rows.append(
            Image(
                job_id=job.id,
                index=index,
                storage_key=key,
                width=img.width,
                height=img.height,
                seed=seed,
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
            )
        )
    try:
        with session_scope(ctx.engine) as s:
            s.execute(delete(Image).where(Image.job_id == job.id))
            s.add_all(rows)
            s.flush()
            if not transition_job(
                s,
                job.id,
                JobStatus.SUCCEEDED,
                expected=JobStatus.RUNNING,
                finished_at=utcnow(),
                lease_expires_at=None,
                progress_step=Job.progress_total,
            ):
                raise _NoLongerRunning
    except _NoLongerRunning:  # canceled or reaped meanwhile: the transaction rolled back
        log.info("job %s was no longer running at the end; its result is dropped", job.id)


# --- the batch ---------------------------------------------------------------------------------


class BatchWatcher:
    """Progress, previews and cancel requests of a running batch, throttled.

    Previews use the model's cheap latent-to-RGB map (``LatentDiffusion.fast_preview``), not the
    decoder, so a batch of 16 spends milliseconds on them rather than a tenth of a second.
    """

    def __init__(self, ctx: WorkerContext, batch: Batch, preview: Callable[[Any], list[Any]]):
        self.ctx = ctx
        self.batch = batch
        self.live = {j.id: j for j in batch.jobs}
        self.preview = preview
        self._last_progress = 0.0
        self._last_preview = time.monotonic()  # the first preview after a second of work

    def on_step(self, step: int, total: int, x0: torch.Tensor) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S or step == total:
            self._last_progress = now
            # One short transaction a tick: write progress, read cancel requests.
            with session_scope(self.ctx.engine) as s:
                s.execute(
                    update(Job)
                    .where(Job.id.in_(list(self.live)), Job.status == JobStatus.RUNNING)
                    .values(progress_step=step, progress_total=total)
                    .execution_options(synchronize_session=False)
                )
                self._apply_cancels(s)
        if now - self._last_preview >= PREVIEW_EVERY_S and step < total and self.live:
            self._last_preview = now
            try:
                self._write_previews(x0)
            except Exception:  # a preview is a nicety; never fail a job over one
                log.warning("preview failed", exc_info=True)

    def _write_previews(self, x0: torch.Tensor) -> None:
        jobs = list(self.live.values())
        first_rows = [j.rows[0] for j in jobs]
        images = self.preview(x0[first_rows])
        keys = {}
        for job, img in zip(jobs, images, strict=True):
            if img.width > PREVIEW_SIZE:
                img = img.resize((PREVIEW_SIZE, PREVIEW_SIZE))
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1)  # fast; a preview lives seconds
            key = preview_key(job.id)
            self.ctx.storage.put(key, buf.getvalue(), "image/png")
            keys[job.id] = key
        with session_scope(self.ctx.engine) as s:
            for job_id, key in keys.items():
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                    .values(preview_key=key)
                    .execution_options(synchronize_session=False)
                )

    def _apply_cancels(self, s: Session) -> None:
        rows = s.execute(
            select(Job.id, Job.status, Job.cancel_requested).where(Job.id.in_(list(self.live)))
        ).all()
        for job_id, status, cancel in rows:
            if status is not JobStatus.RUNNING:
                self.live.pop(job_id, None)  # canceled or reaped elsewhere
            elif cancel and transition_job(
                s,
                job_id,
                JobStatus.CANCELED,
                expected=JobStatus.RUNNING,
                finished_at=utcnow(),
                lease_expires_at=None,
            ):
                log.info("job %s canceled", job_id)
                self.live.pop(job_id, None)

    def poll_cancels(self) -> None:
        if self.live:
            with session_scope(self.ctx.engine) as s:
                self._apply_cancels(s)

    def should_stop(self) -> bool:
        """Polled between steps; the cancel requests were read by the last progress tick."""
        return not self.live


def run_batch(ctx: WorkerContext, batch: Batch) -> None:
    import torch

    from core.diffusion.samplers import SamplingCanceled

    try:
        model = ctx.models.get(batch.model_version_id)
    except ModelUnavailable as e:
        fail_jobs(ctx, batch.ids, str(e))
        return
    except TRANSIENT as e:
        retry_or_fail(ctx, batch.jobs, e)
        return

    prompts, negatives, guidance, seeds = [], [], [], []
    for job in batch.jobs:
        prompts += [job.prompt] * job.num_images
        negatives += [job.negative_prompt] * job.num_images
        guidance += [job.guidance] * job.num_images
        seeds += job.seeds
    watcher = BatchWatcher(ctx, batch, model.fast_preview)
    log.info(
        "running %d job(s), %d image(s): %s × %d steps",
        len(batch.jobs),
        len(prompts),
        batch.sampler,
        batch.steps,
    )
    t0 = time.perf_counter()
    try:
        images = model.generate(
            prompts,
            negatives,
            steps=batch.steps,
            guidance=guidance,
            sampler=batch.sampler,
            seeds=seeds,
            size=batch.size,
            on_step=watcher.on_step,
            should_stop=watcher.should_stop,
        )
    except SamplingCanceled:
        return  # every job of the batch was canceled
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        fail_jobs(
            ctx,
            list(watcher.live),
            "the GPU ran out of memory for this batch; try fewer images or a smaller size",
        )
        return
    except TRANSIENT as e:
        retry_or_fail(ctx, list(watcher.live.values()), e)
        return
    except ValueError as e:  # the model refused the parameters (e.g. a size it cannot make)
        fail_jobs(ctx, list(watcher.live), f"the model refused this job: {e}")
        return

    t1 = time.perf_counter()
    watcher.poll_cancels()  # a cancel during the last step still wins
    for job in list(watcher.live.values()):
        try:
            store_results(ctx, job, [images[r] for r in job.rows])
        except TRANSIENT as e:
            log.warning("storing job %s failed: %s", job.id, e)
            retry_or_fail(ctx, [job], e)
    log.info(
        "batch done: denoising and decoding %.2f s, storing %.2f s",
        t1 - t0,
        time.perf_counter() - t1,
    )


def run_generation(ctx: WorkerContext, job_id: uuid.UUID) -> bool:
    """The body of the ``dq.generate`` task. Returns False when the message had nothing to do."""
    batch = claim_batch(ctx, job_id)
    if batch is None:
        log.info("job %s is not queued; message acknowledged without work", job_id)
        return False
    ctx.heartbeat.hold(Job, *batch.ids)
    try:
        run_batch(ctx, batch)
    except Exception as e:
        log.exception("batch of job %s failed", job_id)
        fail_jobs(ctx, batch.ids, f"internal error in the worker: {type(e).__name__}: {e}")
    finally:
        ctx.heartbeat.release(*batch.ids)
    return True
