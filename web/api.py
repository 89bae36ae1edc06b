"""REST API v1 for programs: submit jobs, poll them, list and cancel them, see the models.

Every endpoint needs ``Authorization: Bearer <token>``. A job is visible to the token that made
it and to admin tokens; anyone else gets 404, as for a job that does not exist.
"""

from __future__ import annotations

import uuid
from typing import Any

from apiflask import APIBlueprint
from flask import Response, jsonify, request, url_for
from marshmallow import RAISE
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from core.db.models import JobStatus, ModelKind
from core.services.images import BadImage
from core.services.jobs import (
    IdempotencyConflict,
    JobNotFound,
    JobRequest,
    JobRequestError,
    QueueFull,
    TooManyActiveJobs,
    cancel_job,
    get_job,
    list_jobs,
)
from core.services.model_versions import SHIPPED_MODEL_NAME, serving_model
from core.services.uploads import create_upload
from core.services.webhooks import validate_target
from web.auth import bearer_caller
from web.db import get_session, replica_connection_read, replica_read
from web.problems import Problem, cap_problem, invalid
from web.resources import (
    JobView,
    job_etag,
    job_resource,
    job_views,
    list_versions,
    load_job,
    model_version_resource,
    poll_after_seconds,
    servable_model_resource,
    serving_resource,
    upload_resource,
    with_estimates,
)
from web.schemas import (
    IdempotencyHeaders,
    JobIn,
    JobOut,
    JobPage,
    LocationHeader,
    MeOut,
    ModelsOut,
    PageQuery,
    PollHeaders,
    PollResponseHeaders,
    UploadIn,
    UploadOut,
)
from web.services import services
from web.submission import submit_and_publish

api = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="Jobs")

# Errors every authenticated endpoint can answer; apiflask documents each with the Problem schema.
COMMON_ERRORS = {
    401: "No token, or a token that is not valid or was revoked.",
    503: "The database is unavailable.",
}
BODY_ERRORS = {
    400: "The body is not valid JSON.",
    413: "The body is over the size limit.",
    415: "The body is not application/json.",
}


# Endpoints that read a JSON body; anything else sent to them is refused with 415.
JSON_BODY_ENDPOINTS = {"api.submit_job_view", "admin_api.submit_run_view"}


def refuse_non_json_body() -> None:
    if request.endpoint in JSON_BODY_ENDPOINTS and request.content_length and not request.is_json:
        raise Problem(415, "Send the body as JSON, with Content-Type: application/json.")


@api.before_request
def authenticate_caller() -> None:
    bearer_caller()
    refuse_non_json_body()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """The resource as it is. apiflask serialises nothing when a view returns a Response: the
    @output schemas document the answer, and the Schemathesis tests check the two agree."""
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _job(job_id: uuid.UUID) -> Any:
    try:
        return get_job(get_session(), job_id, bearer_caller().scope)
    except JobNotFound:
        raise Problem(404, f"There is no job {job_id}.") from None


def _job_json(session: Any, job: Any) -> dict[str, Any]:
    (view,) = job_views(session, [job.id])
    return job_resource(view, services().storage)


@api.post("/jobs")
@api.input(JobIn, location="json", arg_name="body")
@api.input(IdempotencyHeaders, location="headers", arg_name="headers")
@api.output(JobOut, status_code=202, headers=LocationHeader, description="Queued.")
@api.doc(
    summary="Submit a generation job",
    description="Queues a job and returns it at once; poll the Location. Parameters left out "
    "take the serving model's defaults and the seed is random; the job reports the values used. "
    "Returns 202 also when the broker is down: the job is committed and is sent to the workers "
    "once it is back.",
    security="BearerAuth",
    responses={
        **COMMON_ERRORS,
        **BODY_ERRORS,
        409: "The Idempotency-Key was used before with a different body.",
        429: "Too many submissions (see Retry-After), or too many of the caller's jobs queued "
        "or running (DQ_MAX_ACTIVE_JOBS_PER_OWNER).",
        503: "The queue is full (DQ_MAX_QUEUED_JOBS) or the database is down; see Retry-After.",
    },
)
def submit_job_view(body: dict[str, Any], headers: dict[str, Any]) -> Any:
    webhook_url = body.pop("webhook", None)
    webhook_events = body.pop("webhook_events_filter", None)
    try:
        webhook = (
            None
            if webhook_url is None
            else validate_target(webhook_url, webhook_events, services().settings)
        )
        job, view = submit_and_publish(
            get_session(),
            JobRequest(**body),
            bearer_caller().owner,
            idempotency_key=headers.get("idempotency_key"),
            webhook=webhook,
        )
    except JobRequestError as e:
        raise invalid(e.field, e.message) from None
    except IdempotencyConflict as e:
        raise Problem(409, f"{e}; use a new key for a new request.") from None
    except (TooManyActiveJobs, QueueFull) as e:
        raise cap_problem(e) from None
    location = url_for("api.get_job_view", job_id=job.id)
    return json_response(job_resource(view, services().storage), 202, {"Location": location})


@api.post("/uploads")
@api.input(UploadIn, location="files", arg_name="files")
@api.output(UploadOut, status_code=201, headers=LocationHeader, description="Stored.")
@api.doc(
    summary="Upload an image to edit",
    description="Stores an image (multipart/form-data, field `file`: PNG, JPEG or WebP, one "
    "frame, at most DQ_MAX_UPLOAD_BYTES and 4096 pixels a side) for you, re-encoded as a PNG "
    "without metadata, and returns its id: name it as `init_image` or `mask` of your jobs. It "
    "expires with the jobs' retention once no job names it.",
    security="BearerAuth",
    responses={
        **COMMON_ERRORS,
        413: "The body is over the size limit.",
        422: "Not an image, truncated, animated, too many pixels or bytes; names the field.",
    },
)
def create_upload_view(files: dict[str, Any]) -> Any:
    svc = services()
    session = get_session()
    data = files["file"].read(svc.settings.max_upload_bytes + 1)
    try:
        upload = create_upload(session, svc.storage, bearer_caller().owner, data, svc.settings)
        session.commit()
    except BadImage as e:
        session.rollback()
        raise invalid(e.field, str(e).removeprefix(f"{e.field} ")) from None
    except Exception:
        session.rollback()
        raise
    body = upload_resource(upload, svc.storage)
    return json_response(body, 201, {"Location": body["url"]})


@api.get("/jobs")
@api.input(PageQuery, location="query", arg_name="query", unknown=RAISE)
@api.output(JobPage)
@api.doc(
    summary="List jobs",
    description="Your jobs, newest first (an admin sees everyone's), optionally by status.",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def list_jobs_view(query: dict[str, Any]) -> Any:
    scope = bearer_caller().scope
    status = JobStatus(query["status"]) if query.get("status") else None

    def page(session: Session) -> dict[str, Any]:
        jobs, total = list_jobs(
            session, scope, status, limit=query["limit"], offset=query["offset"]
        )
        storage = services().storage
        return {
            "jobs": [
                job_resource(view, storage) for view in job_views(session, [job.id for job in jobs])
            ],
            "total": total,
            "limit": query["limit"],
            "offset": query["offset"],
        }

    return json_response(replica_read(page))


@api.get("/jobs/<uuid:job_id>")
@api.input(PollHeaders, location="headers", arg_name="headers")
@api.output(JobOut, headers=PollResponseHeaders)
@api.doc(
    summary="Poll a job",
    description="Its status, queue position, progress with a live preview, and its images. "
    "Send the ETag back in If-None-Match: while nothing a poll shows has changed the answer is "
    "304 with no body, and costs the server less. Retry-After says how many seconds to wait "
    "before the next poll (absent once the job has ended); the event stream "
    "(/jobs/{job_id}/events) pushes the same object instead.",
    security="BearerAuth",
    responses={**COMMON_ERRORS, 304: "Not modified since the ETag in If-None-Match."},
)
def get_job_view(job_id: uuid.UUID, headers: dict[str, Any]) -> Any:
    scope = bearer_caller().scope
    known = _etags(headers.get("if_none_match"))

    def poll(connection: Connection) -> tuple[JobView, str, bool]:
        view = load_job(connection, job_id, scope, estimates=False)
        etag = job_etag(connection, view)
        if etag in known:
            return view, etag, False
        (view,) = with_estimates(connection, [view])
        return view, etag, True

    # One row read on a bare autocommit connection: no Session to open and close for it.
    try:
        view, etag, changed = replica_connection_read(poll, JobNotFound)
    except JobNotFound:
        raise Problem(404, f"There is no job {job_id}.") from None
    if not changed:
        return Response(status=304, headers=_poll_headers(etag, view))
    body = job_resource(view, services().storage)
    return json_response(body, 200, _poll_headers(etag, view))


def _etags(if_none_match: str | None) -> set[str]:
    """The entity tags of an If-None-Match header (weak or strong alike, RFC 9110 13.1.2)."""
    if not if_none_match:
        return set()
    return {tag.strip().removeprefix("W/").strip('"') for tag in if_none_match.split(",")}


def _poll_headers(etag: str, view: Any) -> dict[str, str]:
    headers = {"ETag": f'"{etag}"', "Cache-Control": "private, no-cache"}
    after = poll_after_seconds(view)
    if after is not None:
        headers["Retry-After"] = str(after)
    return headers


@api.post("/jobs/<uuid:job_id>/cancel")
@api.output(JobOut)
@api.doc(
    summary="Cancel a job",
    description="A queued job is canceled at once; a running one stops at its next step "
    "(poll until its status is canceled). Canceling a canceled job changes nothing.",
    security="BearerAuth",
    responses={**COMMON_ERRORS, 409: "The job already succeeded or failed."},
)
def cancel_job_view(job_id: uuid.UUID) -> Any:
    session = get_session()
    job = _job(job_id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Problem(409, f"The job already {job.status.value}; there is nothing to cancel.")
    job = cancel_job(session, job)
    session.commit()
    return json_response(_job_json(session, job))


def models_listing() -> dict[str, Any]:
    """The serving default, the canary, every model a request may name and every version: two
    queries (the versions, the servable ones among them found in Python)."""
    session = get_session()
    versions = list_versions(session)
    servable = [v for v in versions if v.kind is ModelKind.DENOISER and v.retired_at is None]
    active = next((v for v in servable if v.is_active), None)
    canary = next((v for v in servable if v.canary_percent > 0), None)
    servable.sort(key=lambda v: not v.is_active)  # the active one first, then newest
    return {
        "serving": serving_resource(serving_model(session)),
        "default": active.name if active is not None else SHIPPED_MODEL_NAME,
        "canary": None
        if canary is None
        else {"version": canary.name, "id": str(canary.id), "percent": canary.canary_percent},
        "models": [
            *(servable_model_resource(v, active=v.is_active) for v in servable),
            servable_model_resource(None, active=active is None),
        ],
        "versions": [model_version_resource(v) for v in versions],
    }


@api.get("/me")
@api.output(MeOut)
@api.doc(
    summary="Who you are",
    description="The caller this token acts for (its owner string and role) and the limits "
    "that apply to its submissions. Reads nothing but the token: a cheap way to check one.",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def me_view() -> Any:
    caller = bearer_caller()
    settings = services().settings
    return json_response(
        {
            "owner": caller.owner,
            "role": "admin" if caller.is_admin else "user",
            "limits": {
                "max_steps": settings.max_steps,
                "max_images_per_job": settings.max_images_per_job,
                "max_prompt_chars": settings.max_prompt_chars,
                "max_active_jobs": settings.max_active_jobs_per_owner,
                "rate_limit": settings.rate_limit,
            },
        }
    )


@api.get("/models")
@api.output(ModelsOut)
@api.doc(
    summary="List models",
    description="What a job's model may name (models: every servable version and the shipped "
    "model, with their defaults, sizes and evals), what default runs on now and its canary, "
    "and every version of every kind with its metrics (retired ones too).",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def list_models_view() -> Any:
    return json_response(models_listing())
