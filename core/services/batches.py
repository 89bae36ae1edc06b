"""Batch submissions: several jobs from one request, a list of prompts or a prompt matrix.

A matrix is a template with ``{name}`` placeholders and a list of values per name; its prompts
are the cartesian product, the placeholders taken in the order they first appear in the
template and the last one varying fastest (as nested loops read left to right):
``"a {color} {shape}"`` with ``{"color": ["red", "green"], "shape": ["circle", "square"]}``
gives "a red circle", "a red square", "a green circle", "a green square". A placeholder is
``{`` + a name of letters, digits and ``_`` (not starting with a digit) + ``}``; every other
brace is text, and the prompt stays free text for the model. A name that the template uses
more than once takes the same value everywhere; values named in the matrix but not used by the
template take no part (see :func:`expand_matrix` for why).

Seeds: item ``i`` (in the order above) gets ``(base + i * num_images) mod (MAX_REQUEST_SEED +
1)``, so its images' seeds ``seed .. seed + num_images - 1`` never overlap another item's, and
every item seed is one a single job may take. The base is random when none is given.

All or nothing: every item is validated, and the caps checked for the whole batch, before a row
is added; the caller commits once (then publishes the jobs, :mod:`web.submission`).

Webhooks: the batch's URL gets one ``completed`` delivery once every job has ended, written by
:func:`finish_batches` (the reaper's pass) in the transaction that marks the batch finished.
Each job also sends its own events to that URL only when the request names them in
``webhook_events_filter`` (Replicate's per-prediction filter); without one, a batch sends just
its ``completed``.

No torch, no Flask, no Celery here.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import Batch, Image, Job, JobStatus, WebhookDelivery, utcnow
from core.runtime.settings import Settings
from core.services.jobs import (
    MAX_REQUEST_SEED,
    IdempotencyConflict,
    JobRequest,
    JobRequestError,
    TooManyActiveJobs,
    WebhookTarget,
    cancel_job,
    check_caps,
    pick_model,
    resolve_edit_inputs,
    submit_job,
    validate_request,
)
from core.services.uploads import store_edits
from core.storage import Storage

PLACEHOLDER_NAME = "[A-Za-z_][A-Za-z0-9_]*"
PLACEHOLDER = re.compile(rf"\{{({PLACEHOLDER_NAME})\}}")
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
# The job events a batch's jobs may send on their own (the batch's own event is "completed").
JOB_WEBHOOK_EVENTS = ("start", "completed", "failed", "canceled")
# Item seeds wrap around here: every one is a seed a single job may ask for.
SEED_MODULUS = MAX_REQUEST_SEED + 1


class BatchNotFound(LookupError):
    pass


class BatchOverActiveCap(TooManyActiveJobs):
    """The batch's jobs would take the caller past DQ_MAX_ACTIVE_JOBS_PER_OWNER (answered like
    TooManyActiveJobs, with a sentence that counts the batch)."""

    def __init__(self, cap: int, count: int):
        ValueError.__init__(
            self,
            f"this batch's {count} jobs would take you past {cap} jobs queued or running, the "
            "most one caller may have (DQ_MAX_ACTIVE_JOBS_PER_OWNER); wait for some to finish "
            "or send a smaller batch",
        )
        self.cap = cap


@dataclass(frozen=True)
class PromptMatrix:
    template: str
    values: Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class SharedSettings:
    """What every job of a batch shares; None: the serving model's default."""

    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    num_images: int = 1
    size: int | None = None
    # Image editing, the same for every job (core.services.uploads): one set of uploads.
    init_image: str | None = None
    mask: str | None = None
    strength: float | None = None
    # One model for every job (a batch never mixes versions); None: default.
    model: str | None = None


def cap_error(field: str, count: int, cap: int, what: str = "makes {} jobs") -> JobRequestError:
    return JobRequestError(
        field,
        f"{what.format(count)}; the most one batch may make is {cap} jobs (DQ_MAX_BATCH_ITEMS)",
    )


def placeholders(template: str) -> list[str]:
    """The template's placeholder names, each once, in the order they first appear."""
    return list(dict.fromkeys(PLACEHOLDER.findall(template)))


def expand_matrix(matrix: PromptMatrix, cap: int, max_chars: int) -> list[str]:
    """The matrix's prompts in the documented order; JobRequestError naming the field when a
    placeholder has no values, a list is empty or longer than ``cap``, the template or a value
    is longer than ``max_chars``, or the product is over ``cap``.

    Values under names the template does not use take no part: the API document can say which
    fields a matrix has but not that its names must match the template's, and a misspelt name
    on either side already leaves a placeholder without values, which is refused.
    """
    if len(matrix.template) > max_chars:
        raise JobRequestError(
            "matrix.template", f"is {len(matrix.template)} characters; the limit is {max_chars}"
        )
    names = placeholders(matrix.template)
    for name in names:
        if name not in matrix.values:
            raise JobRequestError(
                "matrix.values", f"has no values for the placeholder {{{name}}} of the template"
            )
    for name, options in matrix.values.items():
        field = f"matrix.values.{name}"
        if not options:
            raise JobRequestError(field, "must list at least one value")
        if len(options) > cap:
            raise cap_error(field, len(options), cap, "lists {} values")
        for value in options:
            if len(value) > max_chars:
                raise JobRequestError(
                    field, f"has a value of {len(value)} characters; the limit is {max_chars}"
                )
    count = 1
    for name in names:
        count *= len(matrix.values[name])
    if count > cap:
        raise cap_error("matrix", count, cap)
    prompts = []
    for combination in itertools.product(*(matrix.values[name] for name in names)):
        prompts.append(fill(matrix.template, dict(zip(names, combination, strict=True))))
    return prompts


def fill(template: str, chosen: Mapping[str, str]) -> str:
    # A function as the replacement, so a value's backslashes and braces stay text.
    return PLACEHOLDER.sub(lambda m: chosen[m.group(1)], template)


def item_seed(base: int, index: int, num_images: int) -> int:
    """The seed of item ``index``: its images take seed .. seed + num_images - 1, disjoint from
    every other item's (for fewer than SEED_MODULUS images in all)."""
    return (base + index * num_images) % SEED_MODULUS


def item_index(base: int, seed: int, num_images: int) -> int:
    """The inverse of :func:`item_seed`: where a job stands in its batch."""
    return (seed - base) % SEED_MODULUS // num_images


def _request_record(
    prompts: Sequence[str] | None,
    matrix: PromptMatrix | None,
    shared: SharedSettings,
    seed: int | None,
    webhook: WebhookTarget | None,
    per_job_events: Sequence[str] | None,
) -> dict[str, Any]:
    """The request as given (to answer it back, and to recognise an idempotent replay)."""
    record: dict[str, Any] = {}
    if prompts is not None:
        record["prompts"] = list(prompts)
    if matrix is not None:
        record["matrix"] = {
            "template": matrix.template,
            "values": {name: list(options) for name, options in matrix.values.items()},
        }
    record.update(asdict(shared))
    if record["model"] is None:
        del record["model"]  # as batches were recorded before a request could name its model
    for name in ("init_image", "mask"):
        value = record[name]
        if isinstance(value, str) and value.startswith("data:"):
            # An inline image is kept as an upload; the record keeps its digest, not its bytes.
            record[name] = f"data:sha256,{hashlib.sha256(value.encode()).hexdigest()}"
    record["seed"] = seed
    record["webhook"] = webhook.url if webhook else None
    record["webhook_events_filter"] = list(per_job_events) if per_job_events is not None else None
    return record


def _same_request(batch: Batch, record: dict[str, Any]) -> bool:
    stored = {k: v for k, v in (batch.request or {}).items() if k != "base_seed"}
    return stored == record


def _find_by_key(session: Session, owner: str, key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.owner == owner, Batch.idempotency_key == key))


def _replay(batch: Batch, record: dict[str, Any]) -> Batch:
    if not _same_request(batch, record):
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request")
    return batch


def submit_batch(
    session: Session,
    owner: str,
    settings: Settings,
    *,
    prompts: Sequence[str] | None = None,
    matrix: PromptMatrix | None = None,
    shared: SharedSettings = SharedSettings(),
    seed: int | None = None,
    webhook: WebhookTarget | None = None,
    idempotency_key: str | None = None,
    storage: Storage | None = None,
) -> tuple[Batch, list[Job], bool]:
    """Add a batch and its queued jobs; returns (batch, jobs in item order, created).

    Exactly one of ``prompts`` and ``matrix``. ``webhook.events`` is the per-job filter (None:
    the jobs send nothing; the batch sends its ``completed`` either way). With an idempotency
    key this owner used before, the same request returns that batch (created=False) and another
    raises IdempotencyConflict. JobRequestError, TooManyActiveJobs and QueueFull leave nothing
    added; the caller rolls back.
    """
    if (prompts is None) == (matrix is None):
        raise JobRequestError("prompts", "give either prompts or matrix, not both or neither")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise JobRequestError("seed", "must be an integer")
    if seed is not None and not 0 <= seed <= MAX_REQUEST_SEED:
        raise JobRequestError("seed", f"must be from 0 to {MAX_REQUEST_SEED}")
    per_job_events = webhook.events if webhook else None
    record = _request_record(prompts, matrix, shared, seed, webhook, per_job_events)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise JobRequestError("Idempotency-Key", "must be 1 to 255 characters")
        existing = _find_by_key(session, owner, idempotency_key)
        if existing is not None:
            return _replay(existing, record), batch_jobs(session, existing), False

    cap = settings.max_batch_items
    if prompts is not None:
        if not prompts:
            raise JobRequestError("prompts", "must list at least one prompt")
        if len(prompts) > cap:
            raise cap_error("prompts", len(prompts), cap, "lists {} prompts")
        texts, fields = list(prompts), [f"prompts.{i}" for i in range(len(prompts))]
    else:
        assert matrix is not None
        texts = expand_matrix(matrix, cap, settings.max_prompt_chars)
        fields = ["matrix.template"] * len(texts)

    base = secrets.randbelow(SEED_MODULUS) if seed is None else seed
    num_images = shared.num_images
    batch_id = uuid.uuid4()
    # One pick for the whole batch (the canary's share drawn from the batch's id): its jobs
    # never mix versions.
    pick = pick_model(session, JobRequest(prompt="", model=shared.model), batch_id)
    requests = []
    for i, (text, field) in enumerate(zip(texts, fields, strict=True)):
        request = JobRequest(
            prompt=text,
            negative_prompt=shared.negative_prompt,
            steps=shared.steps,
            guidance=shared.guidance,
            sampler=shared.sampler,
            seed=item_seed(base, i, num_images) if isinstance(num_images, int) else base,
            num_images=num_images,
            size=shared.size,
            init_image=shared.init_image,
            mask=shared.mask,
            strength=shared.strength,
            model=shared.model,
        )
        try:
            validate_request(request, settings, pick.model)
        except JobRequestError as e:
            if e.field != "prompt":
                raise  # a shared setting: the same for every item
            where = "" if field.startswith("prompts.") else f" (the prompt {text[:60]!r})"
            raise JobRequestError(field, f"{e.message}{where}") from None
        requests.append(request)
    edits = resolve_edit_inputs(session, requests[0], owner, settings)
    try:
        check_caps(session, owner, settings, count=len(requests))
    except TooManyActiveJobs as e:
        raise BatchOverActiveCap(e.cap, len(requests)) from None

    batch = Batch(
        id=batch_id,
        owner=owner,
        created_at=utcnow(),
        request={**record, "base_seed": base},
        size=len(requests),
        webhook_url=webhook.url if webhook else None,
        webhook_events=list(per_job_events) if per_job_events is not None else None,
        idempotency_key=idempotency_key,
    )
    if idempotency_key is None:
        session.add(batch)
        session.flush()
    else:
        try:
            # As in submit_job: of two requests racing with one key, the loser answers a replay.
            with session.begin_nested():
                session.add(batch)
        except IntegrityError:
            winner = _find_by_key(session, owner, idempotency_key)
            if winner is None:
                raise
            return _replay(winner, record), batch_jobs(session, winner), False
    job_webhook = (
        WebhookTarget(webhook.url, tuple(per_job_events)) if webhook and per_job_events else None
    )
    if edits is not None:
        store_edits(session, storage, edits)
    jobs = [
        submit_job(
            session,
            request,
            owner,
            settings,
            webhook=job_webhook,
            batch_id=batch.id,
            edits=edits,
            model=pick,
        )[0]
        for request in requests
    ]
    return batch, jobs, True


def batch_jobs(session: Session, batch: Batch) -> list[Job]:
    """The batch's jobs in item order (jobs pruned by retention are gone)."""
    jobs = list(session.scalars(select(Job).where(Job.batch_id == batch.id)))
    base = int((batch.request or {}).get("base_seed", 0))
    return sorted(jobs, key=lambda job: item_index(base, job.seed, max(job.num_images, 1)))


def get_batch(session: Session, batch_id: uuid.UUID | str, owner: str | None) -> Batch:
    """The batch, if ``owner`` may see it (None: an admin, who sees every batch)."""
    try:
        key = batch_id if isinstance(batch_id, uuid.UUID) else uuid.UUID(str(batch_id))
    except ValueError:
        raise BatchNotFound(f"no batch {batch_id}") from None
    batch = session.get(Batch, key)
    if batch is None or (owner is not None and batch.owner != owner):
        raise BatchNotFound(f"no batch {batch_id}")
    return batch


def list_batches(
    session: Session, owner: str | None, limit: int = 20, offset: int = 0
) -> tuple[list[Batch], int]:
    """A page of batches, newest first, and how many there are in all."""
    where = [] if owner is None else [Batch.owner == owner]
    total = session.scalar(select(func.count()).select_from(Batch).where(*where)) or 0
    rows = session.scalars(
        select(Batch)
        .where(*where)
        .order_by(Batch.created_at.desc(), Batch.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total


def status_counts(
    session: Session, batch_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, int]]:
    """Per batch, how many of its jobs are in each status (every status, zeros included): one
    aggregate query for any number of batches."""
    counts = {batch_id: {s.value: 0 for s in JobStatus} for batch_id in batch_ids}
    if not batch_ids:
        return counts
    rows = session.execute(
        select(Job.batch_id, Job.status, func.count())
        .where(Job.batch_id.in_(list(batch_ids)))
        .group_by(Job.batch_id, Job.status)
    )
    for batch_id, status, n in rows:
        assert batch_id is not None
        counts[batch_id][JobStatus(status).value] = int(n)
    return counts


def batch_images(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Image]]:
    """The images of these jobs, by job, in order: one query."""
    found: dict[uuid.UUID, list[Image]] = {}
    if job_ids:
        rows = session.scalars(
            select(Image).where(Image.job_id.in_(list(job_ids))).order_by(Image.job_id, Image.index)
        )
        for image in rows:
            found.setdefault(image.job_id, []).append(image)
    return found


def cancel_batch(session: Session, batch: Batch, owner: str | None) -> list[Job]:
    """Cancel every job of the batch still queued (at once) or running (asked to stop between
    steps), through :func:`core.services.jobs.cancel_job`. Ended jobs stay as they are."""
    if owner is not None and batch.owner != owner:
        raise BatchNotFound(f"no batch {batch.id}")
    jobs = batch_jobs(session, batch)
    for job in jobs:
        if job.status in ACTIVE:
            cancel_job(session, job)
    return jobs


def finish_batches(session: Session) -> list[uuid.UUID]:
    """Mark finished every batch none of whose jobs is queued or running, and add its
    ``completed`` webhook delivery (message id ``msg_<batch hex>_completed``) in the same
    transaction. Ended jobs never start again, so a batch seen ended stays ended; the
    conditional UPDATE lets only one of several reapers finish a batch, and the unique message
    id makes the delivery at most one. Returns the ids of the batches it finished."""
    active = exists().where(Job.batch_id == Batch.id, Job.status.in_(ACTIVE))
    finished = session.execute(
        update(Batch)
        .where(Batch.finished_at.is_(None), ~active)
        .values(finished_at=utcnow())
        .returning(Batch.id, Batch.owner, Batch.webhook_url)
        .execution_options(synchronize_session=False)
    ).all()
    deliveries = [
        {
            "message_id": f"msg_{batch_id.hex}_completed",
            "owner": owner,
            "batch_id": batch_id,
            "job_id": None,
            "event": "completed",
            "url": url,
            "state": "pending",
            "attempts": 0,
            "next_attempt_at": utcnow(),
            "created_at": utcnow(),
        }
        for batch_id, owner, url in finished
        if url
    ]
    if deliveries:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(
            insert(WebhookDelivery)
            .values(deliveries)
            .on_conflict_do_nothing(index_elements=["message_id"])
        )
    return [batch_id for batch_id, _owner, _url in finished]
