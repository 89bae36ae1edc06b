"""Batch submissions: POST/GET /api/v1/batches and cancel (routes on the api blueprint).

A batch is one request that makes many jobs: a list of prompts or a prompt matrix, with shared
settings and one base seed (the rules are in :mod:`core.services.batches`). The jobs are committed
together, then each one's task message is published as a single job's is
(:mod:`web.submission`). Batches are visible to the token that made them and to admin tokens;
anyone else gets 404.
"""

from __future__ import annotations

import uuid
from typing import Any

from apiflask import Schema
from apiflask.fields import UUID, DateTime, Dict, Integer, List, Nested, String
from apiflask.validators import OneOf, Range, Regexp
from flask import url_for
from marshmallow import RAISE, ValidationError, validates_schema
from sqlalchemy.orm import Session

from core.db.models import Batch, Job, JobStatus
from core.queue.dispatch import publish_job
from core.services.batches import (
    PLACEHOLDER_NAME,
    BatchNotFound,
    PromptMatrix,
    SharedSettings,
    batch_images,
    batch_jobs,
    cancel_batch,
    get_batch,
    list_batches,
    status_counts,
    submit_batch,
)
from core.services.jobs import (
    MAX_REQUEST_SEED,
    IdempotencyConflict,
    JobRequestError,
    QueueFull,
    TooManyActiveJobs,
    WebhookTarget,
)
from core.services.webhooks import EVENTS as WEBHOOK_EVENTS
from core.services.webhooks import validate_target
from core.storage import Storage
from web.api import BODY_ERRORS, COMMON_ERRORS, JSON_BODY_ENDPOINTS, api, json_response
from web.auth import bearer_caller
from web.db import end_reads, get_session, replica_read
from web.problems import Problem, cap_problem, invalid
from web.resources import iso
from web.schemas import (
    STATUSES,
    IdempotencyHeaders,
    ImageOut,
    JobIn,
    JsonInteger,
    JsonText,
    LocationHeader,
)
from web.services import services
from web.submission import _publish

# The body is JSON: anything else sent here is refused with 415, as on POST /jobs.
JSON_BODY_ENDPOINTS.add("api.submit_batch_view")

NOT_BLANK = Regexp(r"\s*\S", error="must not be empty")  # match() anchors at the start


# --- request and response bodies ------------------------------------------------------------


class PromptMatrixIn(Schema):
    template = JsonText(
        required=True,
        validate=NOT_BLANK,
        metadata={
            "description": "A prompt with {name} placeholders (a name is letters, digits and _, "
            "not starting with a digit; other braces are text). Every placeholder needs values; "
            "each prompt it makes must obey the prompt rules (length, not blank), else 422.",
            "example": "a {color} {shape}",
        },
    )
    values = Dict(
        keys=String(
            validate=Regexp(
                rf"{PLACEHOLDER_NAME}\Z",
                error="must be a placeholder name: letters, digits and _, not starting with a "
                "digit",
            )
        ),
        values=List(JsonText()),
        required=True,
        metadata={
            "description": "The values of each placeholder. The prompts are every combination, "
            "placeholders in the order they first appear in the template, the last varying "
            "fastest; names the template does not use take no part. The product of the lists' "
            "lengths is at most DQ_MAX_BATCH_ITEMS (more: 422 naming it).",
            "example": {"color": ["red", "green"], "shape": ["circle", "square", "triangle"]},
        },
    )


class BatchIn(JobIn):
    """The shared settings are a job's (JobIn without its prompt)."""

    class Meta:
        exclude = ("prompt",)

    prompts = List(
        JsonText(validate=NOT_BLANK),
        metadata={
            "description": "One job per prompt, in this order (give prompts or matrix). At most "
            "DQ_MAX_BATCH_ITEMS (more: 422 naming it).",
            "example": ["a red circle", "a blue square"],
        },
    )
    matrix = Nested(PromptMatrixIn, metadata={"description": "Give prompts or matrix."})
    seed = JsonInteger(
        allow_none=True,
        validate=Range(0, MAX_REQUEST_SEED, error="must be from {min} to {max}"),
        metadata={
            "description": "The base seed; random if null. Item i (in prompt order) gets "
            "(seed + i * num_images) mod (2**62 + 1), so no two of its images share a seed."
        },
    )
    webhook_events_filter = List(
        String(validate=OneOf(WEBHOOK_EVENTS, error="must be one of {choices}")),
        allow_none=True,
        metadata={
            "description": "Events of each job to send to the webhook too (null, absent or "
            "empty: none). The batch sends its own completed once every job has ended, "
            "whatever this says; ignored without a webhook.",
            "example": ["failed"],
        },
    )

    @validates_schema
    def one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("prompts" in data) == ("matrix" in data):
            raise ValidationError("give either prompts or matrix, not both", "prompts")


class BatchCounts(Schema):
    queued = Integer(required=True)
    running = Integer(required=True)
    succeeded = Integer(required=True)
    failed = Integer(required=True)
    canceled = Integer(required=True)


class BatchJobOut(Schema):
    id = UUID(required=True)
    status = String(required=True, validate=OneOf(STATUSES))
    prompt = String(required=True)
    seed = Integer(required=True)
    images = List(Nested(ImageOut), required=True, metadata={"description": "Once succeeded."})


class BatchOut(Schema):
    id = UUID(required=True)
    status = String(
        required=True,
        validate=OneOf(["active", "ended"]),
        metadata={"description": "ended once none of its jobs is queued or running."},
    )
    size = Integer(required=True, metadata={"description": "Jobs the batch made."})
    counts = Nested(BatchCounts, required=True, metadata={"description": "Jobs by status."})
    created_at = DateTime(required=True)
    finished_at = DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "When the batch was seen ended and its webhook was queued."},
    )
    params = Dict(required=True, metadata={"description": "The request as given."})
    base_seed = Integer(required=True, metadata={"description": "The base seed used."})
    webhook = String(required=True, allow_none=True)
    webhook_events_filter = List(String(), required=True, allow_none=True)
    jobs = List(
        Nested(BatchJobOut),
        metadata={"description": "In prompt order; on a single batch, not in listings."},
    )


class BatchPage(Schema):
    batches = List(Nested(BatchOut), required=True)
    total = Integer(required=True)
    limit = Integer(required=True)
    offset = Integer(required=True)


class BatchPageQuery(Schema):
    # Query strings are text: "20" is read as 20 here, unlike in a JSON body.
    limit = Integer(load_default=20, validate=Range(1, 100, error="must be from {min} to {max}"))
    offset = Integer(
        load_default=0, validate=Range(0, 1_000_000, error="must be from {min} to {max}")
    )


# --- the batch as the API shows it ----------------------------------------------------------


def batch_resource(
    batch: Batch,
    counts: dict[str, int],
    storage: Storage,
    jobs: list[Job] | None = None,
    images: dict[uuid.UUID, list[Any]] | None = None,
) -> dict[str, Any]:
    request = dict(batch.request or {})
    base_seed = request.pop("base_seed", 0)
    out: dict[str, Any] = {
        "id": str(batch.id),
        "status": "active" if counts["queued"] or counts["running"] else "ended",
        "size": batch.size,
        "counts": counts,
        "created_at": iso(batch.created_at),
        "finished_at": iso(batch.finished_at),
        "params": request,
        "base_seed": base_seed,
        "webhook": batch.webhook_url,
        "webhook_events_filter": batch.webhook_events,
    }
    if jobs is not None:
        images = images or {}
        out["jobs"] = [
            {
                "id": str(job.id),
                "status": job.status.value,
                "prompt": job.prompt,
                "seed": job.seed,
                "images": [
                    {
                        "url": storage.url(image.storage_key),
                        "width": image.width,
                        "height": image.height,
                        "seed": image.seed,
                    }
                    for image in images.get(job.id, [])
                ],
            }
            for job in jobs
        ]
    return out


def batch_detail(session: Session, batch: Batch) -> dict[str, Any]:
    """The batch with its jobs and, for those that succeeded, their images: three queries, and
    as many rows as the batch has jobs (at most DQ_MAX_BATCH_ITEMS when it was made)."""
    jobs = batch_jobs(session, batch)
    done = [job.id for job in jobs if job.status is JobStatus.SUCCEEDED]
    counts = {s.value: 0 for s in JobStatus}
    for job in jobs:
        counts[job.status.value] += 1
    return batch_resource(batch, counts, services().storage, jobs, batch_images(session, done))


def read_batch_detail(batch_id: uuid.UUID, scope: str | None) -> dict[str, Any]:
    """:func:`batch_detail` of the caller's batch, read from the replica when there is one (the
    primary when it lacks the batch); BatchNotFound when neither has it for this caller."""

    def read(session: Session) -> dict[str, Any]:
        try:
            return batch_detail(session, get_batch(session, batch_id, scope))
        finally:
            end_reads(session)

    return replica_read(read, BatchNotFound)


def publish_jobs(jobs: list[Job]) -> None:
    """Each committed job's task message, as :func:`web.submission.submit_and_publish` sends
    one; a job whose message fails to leave is sent by the relay."""
    svc = services()
    for job in jobs:
        _publish(
            f"job {job.id}",
            lambda job_id=job.id: publish_job(svc.engine, svc.publisher, job_id),
        )


def submit_batch_and_publish(
    session: Session,
    owner: str,
    *,
    prompts: list[str] | None = None,
    matrix: PromptMatrix | None = None,
    shared: SharedSettings,
    seed: int | None = None,
    webhook: WebhookTarget | None = None,
    idempotency_key: str | None = None,
) -> tuple[Batch, dict[str, Any]]:
    """``core.services.batches.submit_batch``, committed, then each job published. Returns the
    batch and the batch as the API shows it. Its errors propagate with nothing written."""
    try:
        batch, jobs, _created = submit_batch(
            session,
            owner,
            services().settings,
            prompts=prompts,
            matrix=matrix,
            shared=shared,
            seed=seed,
            webhook=webhook,
            idempotency_key=idempotency_key,
            storage=services().storage,
        )
        session.flush()
        detail = batch_detail(session, batch)
        session.commit()
    except Exception:
        session.rollback()
        raise
    # A replay publishes too, as for a job: publish_job sends only what is queued and unsent.
    publish_jobs(jobs)
    return batch, detail


# --- routes -----------------------------------------------------------------------------------


def _batch(batch_id: uuid.UUID) -> Batch:
    try:
        return get_batch(get_session(), batch_id, bearer_caller().scope)
    except BatchNotFound:
        raise Problem(404, f"There is no batch {batch_id}.") from None


@api.post("/batches")
@api.input(BatchIn, location="json", arg_name="body")
@api.input(IdempotencyHeaders, location="headers", arg_name="headers")
@api.output(BatchOut, status_code=202, headers=LocationHeader, description="Queued.")
@api.doc(
    summary="Submit a batch",
    description="Queues one job per prompt of a list, or per combination of a prompt matrix, "
    "with shared settings, all or none; returns the batch at once (poll the Location). Item i "
    "gets seed (base + i * num_images) mod (2**62 + 1). A webhook gets one completed event "
    "for the batch once every job has ended, and the events of each job that "
    "webhook_events_filter names.",
    security="BearerAuth",
    responses={
        **COMMON_ERRORS,
        **BODY_ERRORS,
        409: "The Idempotency-Key was used before with a different body.",
        422: "A field is not valid (the problem names it), or the batch would make more jobs "
        "than DQ_MAX_BATCH_ITEMS (the problem names the cap).",
        429: "Too many submissions (see Retry-After), or the batch would take the caller past "
        "DQ_MAX_ACTIVE_JOBS_PER_OWNER jobs queued or running.",
        503: "The batch would fill the queue past DQ_MAX_QUEUED_JOBS, or the database is "
        "down; see Retry-After.",
    },
)
def submit_batch_view(body: dict[str, Any], headers: dict[str, Any]) -> Any:
    settings = services().settings
    matrix = body.get("matrix")
    events = body.get("webhook_events_filter")
    try:
        webhook = None
        if body.get("webhook") is not None:
            target = validate_target(body["webhook"], events or None, settings)
            webhook = WebhookTarget(target.url, target.events if events else None)
        batch, detail = submit_batch_and_publish(
            get_session(),
            bearer_caller().owner,
            prompts=body.get("prompts"),
            matrix=None if matrix is None else PromptMatrix(matrix["template"], matrix["values"]),
            shared=SharedSettings(
                negative_prompt=body["negative_prompt"],
                steps=body.get("steps"),
                guidance=body.get("guidance"),
                sampler=body.get("sampler"),
                num_images=body["num_images"],
                size=body.get("size"),
                init_image=body.get("init_image"),
                mask=body.get("mask"),
                strength=body.get("strength"),
                model=body.get("model"),
            ),
            seed=body.get("seed"),
            webhook=webhook,
            idempotency_key=headers.get("idempotency_key"),
        )
    except JobRequestError as e:
        raise invalid(e.field, e.message) from None
    except IdempotencyConflict as e:
        raise Problem(409, f"{e}; use a new key for a new request.") from None
    except (TooManyActiveJobs, QueueFull) as e:
        raise cap_problem(e) from None
    location = url_for("api.get_batch_view", batch_id=batch.id)
    return json_response(detail, 202, {"Location": location})


@api.get("/batches")
@api.input(BatchPageQuery, location="query", arg_name="query", unknown=RAISE)
@api.output(BatchPage)
@api.doc(
    summary="List batches",
    description="Your batches, newest first (an admin sees everyone's), with their jobs "
    "counted by status.",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def list_batches_view(query: dict[str, Any]) -> Any:
    scope = bearer_caller().scope

    def page(session: Session) -> tuple[list[Batch], int, dict[uuid.UUID, dict[str, int]]]:
        try:
            batches, total = list_batches(
                session, scope, limit=query["limit"], offset=query["offset"]
            )
            return batches, total, status_counts(session, [batch.id for batch in batches])
        finally:
            end_reads(session)

    batches, total, counts = replica_read(page)
    storage = services().storage
    return json_response(
        {
            "batches": [batch_resource(b, counts[b.id], storage) for b in batches],
            "total": total,
            "limit": query["limit"],
            "offset": query["offset"],
        }
    )


@api.get("/batches/<uuid:batch_id>")
@api.output(BatchOut)
@api.doc(
    summary="Poll a batch",
    description="Its jobs counted by status, and each job in prompt order with its status and, "
    "once it succeeded, its images.",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def get_batch_view(batch_id: uuid.UUID) -> Any:
    try:
        return json_response(read_batch_detail(batch_id, bearer_caller().scope))
    except BatchNotFound:
        raise Problem(404, f"There is no batch {batch_id}.") from None


@api.post("/batches/<uuid:batch_id>/cancel")
@api.output(BatchOut)
@api.doc(
    summary="Cancel a batch",
    description="Its queued jobs are canceled at once and its running ones stop at their next "
    "step; jobs that already ended stay as they are. Canceling an ended batch changes nothing.",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def cancel_batch_view(batch_id: uuid.UUID) -> Any:
    session = get_session()
    batch = _batch(batch_id)
    cancel_batch(session, batch, bearer_caller().scope)
    detail = batch_detail(session, batch)
    session.commit()
    return json_response(detail)
