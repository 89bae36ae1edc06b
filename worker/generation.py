"""Running generation jobs: claim, batch across compatible jobs, denoise, store, record.

A task message is a work token: the worker claims the job at the head of the fair order
(``core.queue.fairness``: weighted round-robin across owners), not necessarily the message's own
job, with the conditional UPDATE of ``core.db.transitions``. It then claims queued jobs that can
share its batch, in the same order: same model version, sampler, steps and size, up to
DQ_MAX_BATCH_SIZE images. A message that finds no job queued (every job it could stand for went
in earlier batches, or this is a duplicate) does nothing.

Each image is bit-identical to what it would be alone: every image has its own seed and noise
generator, and the model is batch-invariant (tests/core/test_pipeline.py). Each job keeps its
own progress, cancel, result and failure:

- every write carries the job's fencing token (its claim's attempt number); a write that changes
  no row means this worker lost the job (it stalled past its lease and the job went to another
  worker): the job leaves the batch at once and nothing more is written for it, and its images go
  under attempt-scoped keys, so they can never replace the holder's;
- progress and preview writes are best effort: a failed one is logged and tried again at the
  next tick; once a job's end has committed, its previews are deleted (best effort too;
  ``dq prune`` removes any left);
- out of memory splits the batch in halves and runs them one after the other, down to one job;
  an error that a job's own input causes is found the same way, so only that job fails;
- past DQ_JOB_TIME_LIMIT_SECONDS the batch's jobs fail naming the limit (``worker.watchdog``).
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

from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db.models import Image, Job, JobStatus, ModelVersion
from core.db.session import read_only_engine, session_scope
from core.db.transitions import (
    Lease,
    LeaseLost,
    claim,
    db_now,
    finish,
    requeue,
    still_held,
    time_limit_error,
    update_held,
)
from core.queue import eta
from core.queue.dispatch import publish_job
from core.queue.fairness import AFFINITY_LOOKAHEAD, next_in_line
from core.queue.notify import notify
from core.services.jobs import image_key, preview_key
from core.services.model_versions import DEFAULT_MODEL_NAME
from core.services.uploads import upload_key
from core.storage import ObjectNotFound, StorageError
from worker import faults
from worker.context import WorkerContext
from worker.models import ModelUnavailable

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.25  # progress writes and cancel checks: at most four a second
PREVIEW_EVERY_S = 1.0
HEAD_CANDIDATES = 8  # jobs at the head of the fair order that a claim tries, in turn
PREVIEW_SIZE = 128  # previews larger than this are shrunk; the page scales them up
TRANSIENT = (StorageError, SQLAlchemyError, ConnectionError, TimeoutError)
OUT_OF_MEMORY = "the GPU ran out of memory for this job; try fewer images or a smaller size"


class TimeLimitExceeded(Exception):
    pass


@dataclass
class BatchJob:
    """What the worker needs of one claimed job, detached from the session."""

    lease: Lease
    prompt: str
    negative_prompt: str
    guidance: float
    seeds: list[int]
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # Image editing: the storage keys of its init image and mask, and its strength.
    init_key: str | None = None
    mask_key: str | None = None
    strength: float | None = None

    @property
    def id(self) -> uuid.UUID:
        return self.lease.id

    @property
    def attempts(self) -> int:
        return self.lease.token

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
    rows: dict[uuid.UUID, list[int]] = field(default_factory=dict)  # set per generate call
    # The batch's init images and masks by storage key, fetched once (fetch_inputs).
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> list[uuid.UUID]:
        return [j.id for j in self.jobs]


def _interval(stored: list[float] | None) -> tuple[float, float]:
    """A job's guidance interval; jobs from before the setting are guided at every step."""
    return (float(stored[0]), float(stored[1])) if stored else (0.0, 1.0)


def _claim(ctx: WorkerContext, s: Session, job_id: uuid.UUID) -> Lease | None:
    return claim(
        s,
        Job,
        job_id,
        host=ctx.host,
        lease_seconds=ctx.settings.job_lease_seconds,
        time_limit_seconds=ctx.settings.job_time_limit_seconds,
        started_at=db_now(),
        progress_step=0,
        preview_key=None,
    )


def claim_batch(ctx: WorkerContext, job_id: uuid.UUID) -> Batch | None:
    """Claim the batch that is fairest to run now; None when no job is queued.

    A message is a work token, not an order to run its own job: the worker claims the head of
    the fair order (``core.queue.fairness``: weighted round-robin across owners), then fills the
    batch with compatible jobs in the same order, up to DQ_MAX_BATCH_SIZE images. Every job has its
    own message and a claim takes at least one job, so there are never fewer messages than
    batches to run: every job runs, and the messages left over (for ``job_id`` when some batch
    already took it) find nothing queued and do nothing.

    When the head needs a model version this worker does not hold, model affinity
    (``core.queue.fairness.Affinity``) may take a job for one it holds from a little further
    down the order instead, or, when another live worker holds the head's version, a job for a
    version that no other worker holds; always within a bounded wait for the head.
    """
    warm = ctx.models.held()
    elsewhere: frozenset[uuid.UUID | None] = frozenset()  # held by other live workers
    with session_scope(ctx.engine) as s:
        first_lease, first = None, None
        # Another worker may claim the same head at the same moment (PostgreSQL); the loser
        # moves on to the next in line, and reads the order again when all of those are gone.
        for _ in range(3):
            heads = next_in_line(s, HEAD_CANDIDATES)
            if not heads:
                return None
            in_line = heads[0]
            if in_line.model_version_id not in warm and ctx.affinity.wait_seconds > 0:
                elsewhere = (
                    eta.models_held_elsewhere(s, ctx.host)
                    if ctx.settings.model_affinity_presence
                    else frozenset()
                )
                if warm or in_line.model_version_id in elsewhere:
                    lookahead = next_in_line(s, AFFINITY_LOOKAHEAD)
                    heads = ctx.affinity.order(lookahead, warm, elsewhere)
            for head in heads:
                first_lease = _claim(ctx, s, head.id)
                if first_lease is not None:
                    first = head
                    break
            if first is not None:
                break
        if first_lease is None or first is None:
            log.info("every job in line was claimed by other workers (message of job %s)", job_id)
            return None
        if first.id != in_line.id and first.model_version_id in warm:
            log.info(
                "model affinity: took job %s for model %s, which this worker holds, before %s",
                first.id,
                first.model_version_id or "default",
                in_line.id,
            )
        elif first.id != in_line.id and in_line.model_version_id in elsewhere:
            log.info(
                "model affinity: took job %s for model %s, which no other worker holds, "
                "before %s, whose model %s another worker holds",
                first.id,
                first.model_version_id or "default",
                in_line.id,
                in_line.model_version_id or "default",
            )
        budget = ctx.settings.max_batch_size - first.num_images
        claimed = [first_lease]
        if budget > 0:
            candidates = next_in_line(
                s, 4 * ctx.settings.max_batch_size, like=first, max_images=budget
            )
            for row in candidates:
                if row.num_images > budget:
                    continue
                lease = _claim(ctx, s, row.id)
                if lease is not None:
                    claimed.append(lease)
                    budget -= row.num_images
                if budget == 0:
                    break
        rows = s.scalars(select(Job).where(Job.id.in_([lease.id for lease in claimed])))
        by_id = {j.id: j for j in rows}
        return Batch(
            jobs=[
                BatchJob(
                    lease=lease,
                    prompt=j.prompt,
                    negative_prompt=j.negative_prompt,
                    guidance=j.guidance,
                    seeds=[j.seed + i for i in range(j.num_images)],
                    guidance_interval=_interval(j.guidance_interval),
                    init_key=None if j.init_upload_id is None else upload_key(j.init_upload_id),
                    mask_key=None if j.mask_upload_id is None else upload_key(j.mask_upload_id),
                    strength=j.strength,
                )
                for lease, j in ((lease, by_id[lease.id]) for lease in claimed)
            ],
            model_version_id=first.model_version_id,
            sampler=first.sampler,
            steps=first.steps,
            size=first.width,
        )


# --- outcomes --------------------------------------------------------------------------------


def fail_jobs(ctx: WorkerContext, jobs: list[BatchJob], message: str) -> None:
    with session_scope(ctx.engine) as s:
        for job in jobs:
            if not finish(s, job.lease, JobStatus.FAILED, error=message, preview_key=None):
                log.warning("lost job %s before it could be failed: %s", job.id, message)
    notify(ctx.settings, [job.id for job in jobs])  # live streams (SSE): look now


def retry_or_fail(ctx: WorkerContext, jobs: list[BatchJob], error: Exception) -> None:
    """A transient failure: back to the queue with backoff, or failed after the last attempt."""
    requeued: list[tuple[uuid.UUID, int]] = []
    with session_scope(ctx.engine) as s:
        for job in jobs:
            if job.attempts >= ctx.settings.job_max_attempts:
                finish(
                    s,
                    job.lease,
                    JobStatus.FAILED,
                    error=f"failed after {job.attempts} attempts: {error}",
                    preview_key=None,
                )
            elif requeue(s, job.lease):
                requeued.append((job.id, job.attempts))
    notify(ctx.settings, [job.id for job in jobs])
    for job_id, attempts in requeued:
        try:
            publish_job(ctx.engine, ctx.publisher, job_id, countdown=min(2.0**attempts, 60.0))
        except Exception:  # the relay publishes it once the broker is back
            log.warning("could not re-publish job %s; the relay will", job_id, exc_info=True)


def encode_png(image: PILImage.Image, prompt: str, seed: int, model: str) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    info.add_text("model", model)  # the version's name, as the job's params.model shows it
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


_MODEL_NAMES: dict[uuid.UUID, str] = {}  # a version's name never changes


def model_name(ctx: WorkerContext, version_id: uuid.UUID | None) -> str:
    """The name a job's PNGs carry: its version's, or "default" for the shipped model."""
    if version_id is None:
        return DEFAULT_MODEL_NAME
    if version_id not in _MODEL_NAMES:
        with session_scope(ctx.engine) as s:
            name = s.scalar(select(ModelVersion.name).where(ModelVersion.id == version_id))
        _MODEL_NAMES[version_id] = name or str(version_id)
    return _MODEL_NAMES[version_id]


def store_results(
    ctx: WorkerContext, job: BatchJob, images: list[PILImage.Image], steps: int, model: str
) -> None:
    """Write the PNGs under this attempt's keys, then the job's success and its image rows in one
    transaction fenced by the attempt. Raises :class:`LeaseLost` when the job is no longer ours:
    nothing is written to the database, and the objects under this attempt's keys point nowhere.
    """
    with session_scope(ctx.engine) as s:
        if not still_held(s, job.lease):  # don't even upload: the job went elsewhere
            raise LeaseLost(job.lease)
    rows = []
    for index, (img, seed) in enumerate(zip(images, job.seeds, strict=True)):
        data = encode_png(img, job.prompt, seed, model)
        key = image_key(job.id, job.attempts, index)
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
    with session_scope(ctx.engine) as s:
        # The fenced UPDATE first: it locks the job's row, so two writers cannot interleave.
        done = dict(progress_step=steps, progress_total=steps, preview_key=None)
        if not finish(s, job.lease, JobStatus.SUCCEEDED, **done):
            raise LeaseLost(job.lease)  # canceled or lost meanwhile: nothing is written
        s.execute(delete(Image).where(Image.job_id == job.id))
        s.add_all(rows)
    notify(ctx.settings, [job.id])


# --- the batch ---------------------------------------------------------------------------------


class BatchWatcher:
    """Progress, previews, cancel requests, lost leases and the time limit of a running batch.

    Every database write here is fenced by the job's attempt and best effort: a failed write is
    logged and tried again at the next tick, and never costs the batch. A job that was canceled,
    or that this worker lost, leaves ``live`` and is written no more.

    Previews use the model's cheap latent-to-RGB map (``LatentDiffusion.fast_preview``), not the
    decoder, so a batch of 16 spends milliseconds on them rather than a tenth of a second.
    """

    def __init__(self, ctx: WorkerContext, batch: Batch, preview: Callable[[Any], list[Any]]):
        self.ctx = ctx
        self.batch = batch
        self.live = {j.id: j for j in batch.jobs}
        self.active: set[uuid.UUID] = set(self.live)  # the jobs of the rows being denoised
        self.preview = preview
        self._last_progress = 0.0
        self._last_preview = time.monotonic()  # the first preview after a second of work

    def drop(self, job_id: uuid.UUID, why: str) -> None:
        job = self.live.pop(job_id, None)
        if job is not None and why == "lost":
            log.warning(
                "lost job %s (attempt %d): another claim holds it now, so this worker "
                "stops it and writes nothing more for it",
                job_id,
                job.attempts,
            )

    def running(self) -> list[BatchJob]:
        return [j for i, j in self.live.items() if i in self.active]

    def on_step(self, step: int, total: int, x0: torch.Tensor) -> None:
        faults.at_step(step)
        if self.ctx.watchdog.past_deadline():
            raise TimeLimitExceeded
        for job_id in self.ctx.heartbeat.lost():
            self.drop(job_id, "lost")
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S or step == total:
            self._last_progress = now
            try:
                if faults.countdown("progress_write_fails"):
                    raise SQLAlchemyError("injected: the progress write was lost")
                # One short transaction a tick: read cancel requests, write progress.
                with session_scope(self.ctx.engine) as s:
                    self._apply_cancels(s)
                    for job in self.running():
                        if not update_held(s, job.lease, progress_step=step, progress_total=total):
                            self.drop(job.id, "lost")
                notify(self.ctx.settings, self.batch.ids)
            except SQLAlchemyError as e:
                log.warning("progress write failed (%s); trying again at the next tick", e)
        if now - self._last_preview >= PREVIEW_EVERY_S and step < total and self.running():
            self._last_preview = now
            try:
                self._write_previews(x0)
            except Exception:  # a preview is a nicety; never fail a job over one
                log.warning("preview failed", exc_info=True)

    def _write_previews(self, x0: torch.Tensor) -> None:
        jobs = self.running()
        first_rows = [self.batch.rows[j.id][0] for j in jobs]
        images = self.preview(x0[first_rows])
        keys = {}
        for job, img in zip(jobs, images, strict=True):
            if img.width > PREVIEW_SIZE:
                img = img.resize((PREVIEW_SIZE, PREVIEW_SIZE))
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1)  # fast; a preview lives seconds
            key = preview_key(job.id, job.attempts)
            self.ctx.storage.put(key, buf.getvalue(), "image/png")
            keys[job.id] = key
        with session_scope(self.ctx.engine) as s:
            for job in jobs:
                if not update_held(s, job.lease, preview_key=keys[job.id]):
                    self.drop(job.id, "lost")
        notify(self.ctx.settings, list(keys))

    def _apply_cancels(self, s: Session) -> None:
        rows = s.execute(
            select(Job.id, Job.status, Job.attempts, Job.cancel_requested).where(
                Job.id.in_(list(self.live))
            )
        ).all()
        for job_id, status, attempts, cancel in rows:
            job = self.live[job_id]
            if status is not JobStatus.RUNNING or attempts != job.attempts:
                # Canceled while queued and re-claimed, failed by the reaper, or re-queued
                # after this worker stalled: not ours any more.
                self.drop(job_id, "lost" if attempts != job.attempts else "ended")
            elif cancel and finish(s, job.lease, JobStatus.CANCELED, preview_key=None):
                log.info("job %s canceled", job_id)
                self.drop(job_id, "canceled")

    def poll_cancels(self) -> None:
        if not self.live:
            return
        try:
            with session_scope(self.ctx.engine) as s:
                self._apply_cancels(s)
            notify(self.ctx.settings, self.batch.ids)
        except SQLAlchemyError as e:
            log.warning("cancel check failed (%s); storing the results anyway", e)

    def should_stop(self) -> bool:
        """Polled between steps; the cancel requests were read by the last progress tick."""
        return not self.running()


def _halves(jobs: list[BatchJob]) -> list[list[BatchJob]]:
    mid = len(jobs) // 2
    return [jobs[:mid], jobs[mid:]]


def fetch_inputs(ctx: WorkerContext, batch: Batch) -> list[BatchJob]:
    """Every init image and mask the batch names, read from storage once (jobs may share one);
    returns the jobs whose inputs are gone (deleted from storage behind the database's back)."""
    from PIL import Image as PILImage

    missing = []
    for job in batch.jobs:
        for key, mode in ((job.init_key, "RGB"), (job.mask_key, "L")):
            if key is None or key in batch.inputs:
                continue
            try:
                data = ctx.storage.get(key)
            except ObjectNotFound:
                missing.append(job)
                break
            with PILImage.open(io.BytesIO(data)) as image:
                batch.inputs[key] = image.convert(mode)
    return missing


def run_batch(ctx: WorkerContext, batch: Batch) -> None:
    """Denoise the batch and record each job's outcome. A part that runs out of memory, or that
    an error breaks, is split in halves that run one after the other, down to one job: only a
    job that fails alone is failed."""
    try:
        model = ctx.models.get(batch.model_version_id)
        name = model_name(ctx, batch.model_version_id)
    except ModelUnavailable as e:
        fail_jobs(ctx, batch.jobs, str(e))
        return
    except TRANSIENT as e:
        retry_or_fail(ctx, batch.jobs, e)
        return

    started = time.monotonic()
    try:
        missing = fetch_inputs(ctx, batch)
    except TRANSIENT as e:
        retry_or_fail(ctx, batch.jobs, e)
        return
    if missing:
        fail_jobs(ctx, missing, "its init image or mask is no longer in storage")
        batch.jobs = [j for j in batch.jobs if j not in missing]
        if not batch.jobs:
            return
    watcher = BatchWatcher(ctx, batch, model.fast_preview)
    parts = [list(batch.jobs)]
    while parts:
        part = [j for j in parts.pop(0) if j.id in watcher.live]
        if not part:
            continue
        try:
            images = _generate(ctx, model, batch, part, watcher)
        except TimeLimitExceeded:
            message = time_limit_error(ctx.settings.job_time_limit_seconds)
            log.warning("batch of %d job(s) %s", len(watcher.live), message)
            fail_jobs(ctx, list(watcher.live.values()), message)
            return
        except _SplitOrFail as e:
            if len(part) > 1:
                log.warning("%s with %d job(s); trying them in halves", e.what, len(part))
                parts = [*_halves(part), *parts]
            else:
                log.warning("job %s failed alone: %s", part[0].id, e.message)
                fail_jobs(ctx, part, e.message)
            continue
        except TRANSIENT as e:
            retry_or_fail(ctx, [j for j in part if j.id in watcher.live], e)
            continue
        if images is None:
            continue  # every job of this part was canceled or lost
        watcher.poll_cancels()  # a cancel during the last step still wins
        for job in part:
            if job.id not in watcher.live:
                continue
            try:
                store_results(ctx, job, [images[r] for r in batch.rows[job.id]], batch.steps, name)
            except LeaseLost:
                watcher.drop(job.id, "lost")
            except TRANSIENT as e:
                log.warning("storing job %s failed: %s", job.id, e)
                retry_or_fail(ctx, [job], e)
    record_throughput(ctx, batch, time.monotonic() - started)


_WARM: set[tuple[uuid.UUID | None, str, int, int]] = set()  # kinds of batch run in this process


def record_throughput(ctx: WorkerContext, batch: Batch, seconds: float) -> None:
    """A batch whose jobs all succeeded tells how fast its kind of batch runs (``core.queue.eta``).
    The first batch of a kind in a process is not counted: it pays one-off costs (kernels
    built for new shapes, caches warming) that are no guide to the next one. One short
    transaction, best effort: a failure is logged, never charged to a job."""
    images = sum(j.num_images for j in batch.jobs)
    kind = (batch.model_version_id, batch.sampler, batch.steps, images)
    if kind not in _WARM:
        _WARM.add(kind)
        return
    try:
        with session_scope(ctx.engine) as s:
            succeeded = s.scalar(
                select(func.count()).where(Job.id.in_(batch.ids), Job.status == JobStatus.SUCCEEDED)
            )
            if succeeded == len(batch.jobs):
                eta.record_throughput(
                    s,
                    model_version_id=batch.model_version_id,
                    sampler=batch.sampler,
                    steps=batch.steps,
                    batch_size=images,
                    seconds=seconds,
                )
    except Exception:
        log.warning("could not record the throughput of a batch", exc_info=True)


class _SplitOrFail(Exception):
    """Generation of a part failed in a way that splitting may cure."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what
        self.message = message


def _generate(
    ctx: WorkerContext, model: Any, batch: Batch, part: list[BatchJob], watcher: BatchWatcher
) -> list[PILImage.Image] | None:
    import torch

    from core.diffusion.samplers import SamplingCanceled

    prompts: list[str] = []
    negatives: list[str] = []
    guidance: list[float] = []
    intervals: list[tuple[float, float]] = []
    seeds: list[int] = []
    inits: list[Any] = []
    masks: list[Any] = []
    strengths: list[float | None] = []
    for job in part:
        inits += [batch.inputs[job.init_key] if job.init_key else None] * job.num_images
        masks += [batch.inputs[job.mask_key] if job.mask_key else None] * job.num_images
        strengths += [job.strength] * job.num_images
        batch.rows[job.id] = list(range(len(prompts), len(prompts) + job.num_images))
        prompts += [job.prompt] * job.num_images
        negatives += [job.negative_prompt] * job.num_images
        guidance += [job.guidance] * job.num_images
        intervals += [job.guidance_interval] * job.num_images
        seeds += job.seeds
    watcher.active = {j.id for j in part}
    log.info(
        "running %d job(s), %d image(s): %s × %d steps",
        len(part),
        len(prompts),
        batch.sampler,
        batch.steps,
    )
    t0 = time.perf_counter()
    try:
        faults.before_generate(prompts)
        images: list[PILImage.Image] = model.generate(
            prompts,
            negatives,
            steps=batch.steps,
            guidance=guidance,
            guidance_interval=intervals,
            sampler=batch.sampler,
            seeds=seeds,
            size=batch.size,
            on_step=watcher.on_step,
            should_stop=watcher.should_stop,
            **(
                {"init_images": inits, "masks": masks, "strength": strengths}
                if any(image is not None for image in inits)
                else {}
            ),
        )
    except SamplingCanceled:
        return None
    except torch.cuda.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise _SplitOrFail("out of memory", OUT_OF_MEMORY) from e
    except (TimeLimitExceeded, *TRANSIENT):
        raise
    except ValueError as e:  # the model refused the parameters (e.g. a size it cannot make)
        raise _SplitOrFail("the model refused a job", f"the model refused this job: {e}") from e
    except Exception as e:
        log.exception("generation failed")
        raise _SplitOrFail(
            "generation failed",
            f"generation failed for this job: {type(e).__name__}: {e}",
        ) from e
    log.info("part done: denoising and decoding %.2f s", time.perf_counter() - t0)
    return images


def run_generation(ctx: WorkerContext, job_id: uuid.UUID) -> bool:
    """The body of the ``dq.generate`` task. Returns False when the message had nothing to do."""
    batch = claim_batch(ctx, job_id)
    if batch is None:
        log.info("job %s is not queued; message acknowledged without work", job_id)
        return False
    notify(ctx.settings, batch.ids)  # the claim committed: the jobs are running
    leases = [j.lease for j in batch.jobs]
    ctx.heartbeat.hold(*leases)
    limit = ctx.settings.job_time_limit_seconds

    def on_hang() -> None:  # from the watchdog's thread, when this task is stuck for good
        fail_jobs(ctx, batch.jobs, time_limit_error(limit))

    ctx.watchdog.begin(f"the batch of job {job_id}", limit, on_hang)
    try:
        run_batch(ctx, batch)
    except Exception as e:
        log.exception("batch of job %s failed", job_id)
        fail_jobs(ctx, batch.jobs, f"internal error in the worker: {type(e).__name__}: {e}")
    finally:
        ctx.watchdog.end()
        ctx.heartbeat.release(*batch.ids)
        delete_previews(ctx, batch.ids)
    return True


def delete_previews(ctx: WorkerContext, job_ids: list[uuid.UUID]) -> None:
    """Delete the preview objects of those jobs that have ended (every attempt's), once their
    end has committed. The ending UPDATE cleared ``preview_key``, so nothing points at them.
    Best effort: a failure is logged, never charged to a job; ``dq prune`` removes what is left.
    """
    try:
        with Session(read_only_engine(ctx.engine)) as s:
            ended = s.execute(
                select(Job.id, Job.attempts).where(
                    Job.id.in_(job_ids),
                    Job.status.in_((JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)),
                )
            ).all()
        keys = [preview_key(job_id, n) for job_id, tries in ended for n in range(1, tries + 1)]
        if keys:
            ctx.storage.delete_many(keys)
    except Exception:
        log.warning("could not delete the previews of ended jobs %s", job_ids, exc_info=True)
