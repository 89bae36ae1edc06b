"""Generation jobs as the web app and the tests see them: submit, look up, list, cancel.

``submit_job`` is the one way a job comes into being: it validates the request against the
settings' limits and the serving model, fills in the model's defaults and a random seed, applies
the caller's idempotency key, and adds the row. The caller commits, then publishes the task
message (:func:`core.queue.dispatch.publish_job`); a job whose message never left is published later
by the relay, because a queued job with ``published_at IS NULL`` *is* the outbox entry.

No torch, no Flask, no Celery here.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import counts
from core.db.models import Job, JobStatus, utcnow
from core.db.transitions import transition_job
from core.queue.fairness import queue_positions
from core.runtime.settings import Settings
from core.services.model_versions import ModelPick, ModelRequestError, ServingModel, resolve_model
from core.services.uploads import EditInputs, EditRequestError, resolve_edits, store_edits
from core.storage import Storage

# The samplers of core.diffusion.samplers.SAMPLERS (a test keeps the two in step).
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-3m")
MAX_SEED = 2**63 - 1
# The largest seed a request may name: a job's seeds (seed, seed + 1, …) then stay within MAX_SEED
# whatever its number of images, so the rule is one range that the API document can state.
MAX_REQUEST_SEED = 2**62
MAX_GUIDANCE = 30.0


class JobRequestError(ValueError):
    """A request that cannot become a job; ``field`` names the offending parameter."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class IdempotencyConflict(ValueError):
    """The idempotency key was used before with a different request."""


class JobNotFound(LookupError):
    pass


class TooManyActiveJobs(ValueError):
    """The caller already has DQ_MAX_ACTIVE_JOBS_PER_OWNER jobs queued or running."""

    def __init__(self, cap: int):
        super().__init__(
            f"you already have {cap} jobs queued or running, the most one caller may have "
            "(DQ_MAX_ACTIVE_JOBS_PER_OWNER); wait for some to finish"
        )
        self.cap = cap


class QueueFull(ValueError):
    """The whole queue holds DQ_MAX_QUEUED_JOBS jobs."""

    def __init__(self, cap: int):
        super().__init__(
            f"the queue is full ({cap} jobs waiting, DQ_MAX_QUEUED_JOBS); try again shortly"
        )
        self.cap = cap


def check_caps(session: Session, owner: str, settings: Settings, count: int = 1) -> None:
    """Refuse ``count`` new jobs (a batch's, all or none) past the per-caller or the
    whole-queue cap. Two requests racing at the cap may both pass: the caps bound abuse, they
    are not exact quotas."""
    # Counted by ix_jobs_owner_status_created_at, and no further than the cap.
    mine = (
        select(Job.id)
        .where(Job.owner == owner, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .limit(settings.max_active_jobs_per_owner + 1)
        .subquery()
    )
    active = session.scalar(select(func.count()).select_from(mine))
    if (active or 0) + count > settings.max_active_jobs_per_owner:
        raise TooManyActiveJobs(settings.max_active_jobs_per_owner)
    # The status counts the triggers keep (core.db.counts): a few rows, not the queue.
    queued = counts.read(session, "job")[JobStatus.QUEUED.value]
    if queued + count > settings.max_queued_jobs:
        raise QueueFull(settings.max_queued_jobs)


@dataclass(frozen=True)
class JobRequest:
    """What a caller asks for; None means "the serving model's default" (random for the seed)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    seed: int | None = None
    num_images: int = 1
    size: int | None = None
    guidance_interval: list[float] | None = None
    # Image editing (core.services.uploads): an upload id or a data: URL each, and the strength.
    init_image: str | None = None
    mask: str | None = None
    strength: float | None = None
    # A model version's name, "default" (the active one, or its canary) or "shipped"; None:
    # default (core.services.model_versions.resolve_model).
    model: str | None = None

    def fingerprint(self) -> str:
        """SHA-256 of the request as given, to recognise a replay under one idempotency key."""
        given = asdict(self)
        for later in ("guidance_interval", "init_image", "mask", "strength", "model"):
            if given[later] is None:
                del given[later]  # as requests were hashed before these existed
        return hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest()


def _int(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobRequestError(field, "must be an integer")
    if not lo <= value <= hi:
        raise JobRequestError(field, f"must be from {lo} to {hi}")
    return value


def _guidance_interval(value: object, model: ServingModel) -> list[float]:
    """Two noise levels t/(T−1) in [0, 1], either order, between which guidance applies; None:
    the serving model's default."""
    if value is None:
        return list(model.guidance_interval)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise JobRequestError("guidance_interval", "must be two numbers from 0 to 1")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise JobRequestError("guidance_interval", "must be two numbers from 0 to 1")
        out.append(float(v))
    return sorted(out)


def size_bounds(model: ServingModel) -> tuple[int, int]:
    """(smallest, largest) image side the model serves; every size is a multiple of the first."""
    m = model.size_multiple
    return m, max(2 * model.image_size // m * m, m)


def validate_request(request: JobRequest, settings: Settings, model: ServingModel) -> JobRequest:
    """The request with every default filled in; JobRequestError names the first bad field."""
    for field in ("prompt", "negative_prompt"):
        text = getattr(request, field)
        if not isinstance(text, str):
            raise JobRequestError(field, "must be a string")
        if len(text) > settings.max_prompt_chars:
            raise JobRequestError(
                field, f"is {len(text)} characters; the limit is {settings.max_prompt_chars}"
            )
        if "\x00" in text:
            raise JobRequestError(field, "must not contain NUL characters")
    if not request.prompt.strip():
        raise JobRequestError("prompt", "must not be empty")
    steps = _int(
        model.steps if request.steps is None else request.steps, "steps", 1, settings.max_steps
    )
    guidance = model.guidance if request.guidance is None else request.guidance
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise JobRequestError("guidance", "must be a number")
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise JobRequestError("guidance", f"must be from 0 to {MAX_GUIDANCE:g}")
    sampler = model.sampler if request.sampler is None else request.sampler
    if sampler not in SAMPLER_NAMES:
        raise JobRequestError("sampler", f"must be one of {', '.join(SAMPLER_NAMES)}")
    seed = secrets.randbelow(MAX_REQUEST_SEED + 1) if request.seed is None else request.seed
    num_images = _int(request.num_images, "num_images", 1, settings.max_images_per_job)
    # The seeds of a job are seed, seed+1, …; with seed <= MAX_REQUEST_SEED all stay in range.
    _int(seed, "seed", 0, MAX_REQUEST_SEED)
    size = model.image_size if request.size is None else request.size
    m, biggest = size_bounds(model)
    _int(size, "size", m, biggest)
    if size % m:
        raise JobRequestError("size", f"must be a multiple of {m}")
    interval = _guidance_interval(request.guidance_interval, model)
    return JobRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=steps,
        guidance=float(guidance),
        sampler=sampler,
        seed=seed,
        num_images=num_images,
        size=size,
        guidance_interval=interval,
        init_image=request.init_image,
        mask=request.mask,
        strength=request.strength,
        model=request.model,
    )


def pick_model(session: Session, request: JobRequest, pick_key: uuid.UUID) -> ModelPick:
    """The model ``request`` names (JobRequestError naming ``model`` when none serves)."""
    try:
        return resolve_model(session, request.model, pick_key)
    except ModelRequestError as e:
        raise JobRequestError("model", str(e)) from None


def resolve_edit_inputs(
    session: Session, request: JobRequest, owner: str, settings: Settings
) -> EditInputs | None:
    """The request's init image, mask and strength checked (JobRequestError names the field);
    None for text-to-image. Writes nothing."""
    try:
        return resolve_edits(
            session, owner, request.init_image, request.mask, request.strength, settings
        )
    except EditRequestError as e:
        raise JobRequestError(e.field, e.message) from None


@dataclass(frozen=True)
class WebhookTarget:
    """Where a job's webhooks go and which events (None: all); checked by the caller
    (``core.services.webhooks``) before it reaches :func:`submit_job`."""

    url: str
    events: tuple[str, ...] | None = None


def submit_job(
    session: Session,
    request: JobRequest,
    owner: str,
    settings: Settings,
    idempotency_key: str | None = None,
    *,
    webhook: WebhookTarget | None = None,
    batch_id: uuid.UUID | None = None,
    storage: Storage | None = None,
    edits: EditInputs | None = None,
    model: ModelPick | None = None,
) -> tuple[Job, bool]:
    """Add a queued job for ``request``; returns (job, created).

    With an idempotency key already used by this owner, the same request returns the existing
    job (created=False) and a different one raises :class:`IdempotencyConflict`. ``webhook``
    and ``batch_id`` are stored with the job (database triggers turn its status changes into
    webhook deliveries). An edit's inline images are stored in ``storage`` once every check has
    passed; ``edits``, when the caller resolved them already (a batch shares one set), and
    ``model`` likewise (a batch runs on one version). The canary's share is drawn from the job's
    id, so a job's pick is fixed once it has one.
    """
    fingerprint = request.fingerprint()
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise JobRequestError("Idempotency-Key", "must be 1 to 255 characters")
        existing = session.scalar(
            select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.request_hash != fingerprint:
                raise IdempotencyConflict(
                    "this Idempotency-Key was already used with a different request"
                )
            return existing, False
    job_id = uuid.uuid4()
    pick = model if model is not None else pick_model(session, request, job_id)
    full = validate_request(request, settings, pick.model)
    resolved = edits is None
    if edits is None:
        edits = resolve_edit_inputs(session, full, owner, settings)
    check_caps(session, owner, settings)
    assert full.steps is not None and full.seed is not None and full.size is not None
    if edits is not None and resolved:  # else the caller stored them (a batch shares one set)
        store_edits(session, storage, edits)
    job = Job(
        id=job_id,
        status=JobStatus.QUEUED,
        prompt=full.prompt,
        negative_prompt=full.negative_prompt,
        steps=full.steps,
        guidance=full.guidance,
        sampler=full.sampler,
        seed=full.seed,
        width=full.size,
        height=full.size,
        num_images=full.num_images,
        model_version_id=pick.model.version_id,
        model_pick=pick.how,
        progress_total=full.steps,
        owner=owner,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        created_at=utcnow(),
        webhook_url=webhook.url if webhook else None,
        webhook_events=list(webhook.events) if webhook and webhook.events is not None else None,
        batch_id=batch_id,
        guidance_interval=full.guidance_interval,
        init_upload_id=edits.init.id if edits else None,
        mask_upload_id=edits.mask.id if edits and edits.mask else None,
        strength=edits.strength if edits else None,
    )
    if idempotency_key is None:
        session.add(job)
        session.flush()
        return job, True
    try:
        # A savepoint: when a concurrent request with the same key wins the insert, only this
        # insert rolls back, and the winner's job is answered as a replay.
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        winner = session.scalar(
            select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
        )
        if winner is None:
            raise
        if winner.request_hash != fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request"
            ) from None
        return winner, False
    return job, True


def get_job(session: Session, job_id: uuid.UUID | str, owner: str | None) -> Job:
    """The job, if ``owner`` may see it (None: an admin, who sees every job)."""
    try:
        key = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        raise JobNotFound(f"no job {job_id}") from None
    job = session.get(Job, key)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFound(f"no job {job_id}")
    return job


def list_jobs(
    session: Session,
    owner: str | None,
    status: JobStatus | None = None,
    limit: int = 20,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """A page of jobs, newest first, and the total count under the same filter."""
    where: list[Any] = []
    if owner is not None:
        where.append(Job.owner == owner)
    if status is not None:
        where.append(Job.status == status)
    if owner is None:  # an admin's view of everyone's: the status counts, not the table
        by_status = counts.read(session, "job")
        total = by_status[status.value] if status is not None else sum(by_status.values())
    else:
        total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = session.scalars(
        select(Job)
        .where(*where)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total


def queue_position(session: Session, job: Job) -> int | None:
    """How many queued jobs will run before this one under fair share (``core.queue.fairness``), or
    None once it is no longer queued.

    It is the jobs ahead in the fair order as the queue stands now, counted up to
    ``POSITION_EXACT_UP_TO`` and estimated beyond (``core.queue.fairness.places``). It is
    approximate even when counted: a claim fills its batch with compatible jobs from further
    down the order, which may pass incompatible ones ahead of them (or take this job early,
    alongside the head).
    """
    if job.status is not JobStatus.QUEUED:
        return None
    place = queue_positions(session, [job.id]).get(job.id)
    return place.ahead if place is not None else 0


def cancel_job(session: Session, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop (the worker honours it between
    denoising steps). A finished job is left as it is."""
    if transition_job(
        session, job.id, JobStatus.CANCELED, expected=JobStatus.QUEUED, finished_at=utcnow()
    ):
        session.refresh(job)
        return job
    if (
        job.status is JobStatus.RUNNING
        or session.scalar(select(Job.status).where(Job.id == job.id)) is JobStatus.RUNNING
    ):
        job.cancel_requested = True
        session.flush()
    session.refresh(job)
    return job


def seeds_of(job: Job) -> list[int]:
    return [job.seed + i for i in range(job.num_images)]


def image_key(job_id: uuid.UUID, attempt: int, index: int) -> str:
    """Where image ``index`` of a job's attempt lives. Each claim writes under its own attempt,
    so a worker that lost the job while stalled can never replace the holder's objects; the
    committing transaction points the image rows at the winner's keys."""
    return f"images/{job_id}/{attempt}/{index}.png"


def preview_key(job_id: uuid.UUID, attempt: int) -> str:
    return f"previews/{job_id}/{attempt}.png"
