"""Admin REST API: start, watch and cancel training runs; choose the model that serves; revoke
tokens and set their fair-share weights; read the audit trail. Every action is recorded in the
audit trail (core.services.audit) in the transaction that does it.

Needs an admin token. A user token gets 403 before its request body is even read, so nothing
is ever written on its behalf.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from apiflask import APIBlueprint, Schema
from apiflask.fields import Boolean, Float
from apiflask.validators import Length, Range
from flask import url_for
from marshmallow import RAISE
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import JobStatus
from core.services.audit import recent, record
from core.services.model_rollout import (
    GateBounds,
    activate_checked,
    end_canary,
    set_canary,
)
from core.services.model_versions import (
    ModelStateError,
    deactivate_all,
    find_version,
    retire_version,
)
from core.services.tokens import MAX_WEIGHT, MIN_WEIGHT, TokenNotFound, revoke_token, set_weight
from core.services.training_runs import (
    RunFinished,
    RunNotFound,
    TrainingRequestError,
    cancel_run,
    get_run,
    list_runs,
    metric_series,
)
from core.storage import StorageError
from web.api import (
    BODY_ERRORS,
    COMMON_ERRORS,
    json_response,
    models_listing,
    refuse_non_json_body,
)
from web.audit import (
    AuditPage,
    AuditQuery,
    TokenOut,
    audited_session,
    event_resource,
    next_cursor,
    token_resource,
)
from web.auth import bearer_caller, require_admin
from web.db import end_reads, get_session
from web.problems import Problem, invalid
from web.resources import run_resource, samples_key
from web.schemas import (
    MAX_MODEL_NAME,
    JsonInteger,
    JsonNumber,
    JsonText,
    LocationHeader,
    ModelsOut,
    PageQuery,
    RunPage,
    TrainingRunIn,
    TrainingRunOut,
)
from web.services import services
from web.submission import start_training_run

admin_api = APIBlueprint("admin_api", __name__, url_prefix="/api/v1/admin", tag="Admin")

ADMIN_ERRORS = {**COMMON_ERRORS, 403: "The token is not an admin token."}


@admin_api.before_request
def authenticate_admin() -> None:
    require_admin(bearer_caller())
    refuse_non_json_body()


def _run(run_id: uuid.UUID) -> Any:
    try:
        return get_run(get_session(), run_id)
    except RunNotFound as e:
        raise Problem(404, str(e)) from None


def _run_detail(run: Any) -> dict[str, Any]:
    storage = services().storage
    try:
        key = samples_key(run.id)
        samples_url = storage.url(key) if storage.exists(key) else None
    except StorageError:  # the store is down: show the run without its samples
        samples_url = None
    return run_resource(
        run, metrics=metric_series(get_session(), run.id), samples_url=samples_url, detail=True
    )


@admin_api.post("/training-runs")
@admin_api.input(TrainingRunIn, location="json", arg_name="body")
@admin_api.output(TrainingRunOut, status_code=202, headers=LocationHeader, description="Queued.")
@admin_api.doc(
    summary="Start a training run",
    description="Queues a run of the autoencoder or the denoiser on the shapes dataset, an "
    "s3:// prefix or a folder under DQ_DATA_ROOT, with hyperparameter overrides; a denoiser run "
    "with base_version fine-tunes that version (or default). Every finished denoiser run ends "
    "with a quick eval, stored on its version.",
    security="BearerAuth",
    responses={
        **ADMIN_ERRORS,
        **BODY_ERRORS,
        404: "autoencoder_version_id names no model version.",
        409: "autoencoder_version_id names a denoiser version, not an autoencoder.",
        429: "Too many submissions; see Retry-After.",
    },
)
def submit_run_view(body: dict[str, Any]) -> Any:
    session = audited_session()  # core records run.create, by created_by
    try:
        run = start_training_run(
            session,
            kind=body["kind"],
            dataset=body["dataset"],
            config=body.get("config"),
            created_by=bearer_caller().owner,
            autoencoder_version_id=body.get("autoencoder_version_id"),
            activate=body["activate"],
            base_version=body.get("base_version"),
            freeze_text_encoder=body["freeze_text_encoder"],
        )
    except TrainingRequestError as e:
        if e.status != 422:
            raise Problem(e.status, str(e)) from None
        raise invalid(e.field, e.message) from None
    location = url_for("admin_api.get_run_view", run_id=run.id)
    return json_response(_run_detail(run), 202, {"Location": location})


@admin_api.get("/training-runs")
@admin_api.input(PageQuery, location="query", arg_name="query", unknown=RAISE)
@admin_api.output(RunPage)
@admin_api.doc(
    summary="List training runs",
    description="Newest first, optionally by status.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def list_runs_view(query: dict[str, Any]) -> Any:
    status = JobStatus(query["status"]) if query.get("status") else None
    runs, total = list_runs(get_session(), status, query["limit"], query["offset"])
    return json_response(
        {
            "runs": [run_resource(run) for run in runs],
            "total": total,
            "limit": query["limit"],
            "offset": query["offset"],
        }
    )


@admin_api.get("/training-runs/<uuid:run_id>")
@admin_api.output(TrainingRunOut)
@admin_api.doc(
    summary="Watch a training run",
    description="Status, step, every metric series (loss …) and the sample grid.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def get_run_view(run_id: uuid.UUID) -> Any:
    return json_response(_run_detail(_run(run_id)))


@admin_api.post("/training-runs/<uuid:run_id>/cancel")
@admin_api.output(TrainingRunOut)
@admin_api.doc(
    summary="Cancel a training run",
    description="A queued run is canceled at once; a running one stops at its next step.",
    security="BearerAuth",
    responses={**ADMIN_ERRORS, 409: "The run already succeeded or failed."},
)
def cancel_run_view(run_id: uuid.UUID) -> Any:
    session = audited_session()
    try:
        run = cancel_run(session, _run(run_id))
    except RunFinished as e:
        raise Problem(409, str(e)) from None
    record(
        session,
        bearer_caller().owner,
        "run.cancel",
        f"run:{run.id}",
        detail={"status": run.status.value, "cancel_requested": bool(run.cancel_requested)},
    )
    session.commit()
    return json_response(_run_detail(run))


class ActivateQuery(Schema):
    # A query string is text: force=true (or 1, yes); absent: false.
    force = Boolean(
        load_default=False,
        metadata={
            "description": "Activate even when its eval regresses against the active "
            "version's (the audit trail records that it was forced, with the figures)."
        },
    )


@contextmanager
def _model_change(session: Session, missing: str, conflict: str | None = None) -> Iterator[None]:
    """Commit what the block changed of the model versions, or write nothing and answer: 404
    (``missing``) for a version that is not there, 409 for one whose state refuses the change,
    and 409 (``conflict``) when another admin's change won the race for the same unique row."""
    try:
        yield
        session.commit()
    except LookupError:
        session.rollback()
        raise Problem(404, missing) from None
    except ModelStateError as e:
        session.rollback()
        raise Problem(409, f"{str(e)[0].upper()}{str(e)[1:]}.") from None
    except IntegrityError:
        session.rollback()
        if conflict is None:
            raise
        raise Problem(409, conflict) from None


@admin_api.post("/models/<uuid:version_id>/activate")
@admin_api.input(ActivateQuery, location="query", arg_name="query", unknown=RAISE)
@admin_api.output(ModelsOut)
@admin_api.doc(
    summary="Serve a model version",
    description="Makes the version the active one of its kind; new jobs that ask for default "
    "use it (workers load it on their next job). A denoiser passes the eval gate first: its "
    "eval's FID may be at most DQ_MODEL_GATE_MAX_FID_INCREASE above the active version's, "
    "its adherence at most DQ_MODEL_GATE_MAX_ADHERENCE_DROP points below, and it needs an "
    "eval when the active one has one; else 409 naming the figures, unless force=true. "
    "Activating the canary's version ends the canary.",
    security="BearerAuth",
    responses={
        **ADMIN_ERRORS,
        404: "There is no such version.",
        409: "Its eval regresses against the active version's (the problem names the figures), "
        "it is retired, or another admin activated a version at the same moment.",
    },
)
def activate_version_view(version_id: uuid.UUID, query: dict[str, Any]) -> Any:
    session = audited_session()
    force = query["force"]
    with _model_change(
        session,
        f"There is no model version {version_id}.",
        "Another version was activated at the same moment; retry.",
    ):
        version, result = activate_checked(
            session, version_id, GateBounds.of(services().settings), force=force
        )
        record(
            session,
            bearer_caller().owner,
            "model.activate",
            f"model:{version.id}",
            detail={
                "name": version.name,
                "kind": version.kind.value,
                "forced": force and not result.passed,
                "gate": result.as_dict(),
            },
        )
    return json_response(models_listing())


@admin_api.post("/models/<uuid:version_id>/retire")
@admin_api.output(ModelsOut)
@admin_api.doc(
    summary="Retire a model version",
    description="No new job may name it (422), and it can no longer be activated; jobs "
    "already queued on it still run, and its files stay. Retiring a retired version changes "
    "nothing.",
    security="BearerAuth",
    responses={
        **ADMIN_ERRORS,
        404: "There is no such version.",
        409: "It is the active version or the canary.",
    },
)
def retire_version_view(version_id: uuid.UUID) -> Any:
    session = audited_session()
    with _model_change(session, f"There is no model version {version_id}."):
        version = find_version(session, version_id)
        if retire_version(session, version):
            record(
                session,
                bearer_caller().owner,
                "model.retire",
                f"model:{version.id}",
                detail={"name": version.name},
            )
    return json_response(models_listing())


class CanaryIn(Schema):
    version = JsonText(
        required=True,
        validate=Length(min=1, max=MAX_MODEL_NAME, error="must be {min} to {max} characters"),
        metadata={
            "description": "The candidate: a denoiser version's name or id.",
            "example": "v3",
        },
    )
    percent = JsonInteger(
        required=True,
        validate=Range(min=0, max=100, error="must be from {min} to {max}"),
        metadata={
            "description": "Its share of the jobs that ask for default, 1-100; 0 ends the canary.",
            "example": 10,
        },
    )


def _canary_change(version: Any, percent: int) -> None:
    detail = {"percent": percent, "name": version.name if version is not None else None}
    target = f"model:{version.id}" if version is not None else "model:default"
    record(get_session(), bearer_caller().owner, "model.canary", target, detail=detail)


@admin_api.put("/models/default/canary")
@admin_api.input(CanaryIn, location="json", arg_name="body")
@admin_api.output(ModelsOut)
@admin_api.doc(
    summary="Start or change the canary",
    description="Sends percent of the jobs that ask for default to the candidate version, the "
    "rest to the active one. Each job's share is fixed by its id (a batch's by the batch's: "
    "a batch never mixes versions), and the job records that the canary picked it "
    "(params.model_pick). One canary at a time: this replaces any other. /metrics gives "
    "latency and failures per version. percent 0 ends it.",
    security="BearerAuth",
    responses={
        **ADMIN_ERRORS,
        **BODY_ERRORS,
        404: "There is no such version.",
        409: "The version is retired, active already, or not a denoiser.",
    },
)
def set_canary_view(body: dict[str, Any]) -> Any:
    session = audited_session()
    with _model_change(
        session,
        f"There is no model version {body['version']!r}.",
        "Another canary was set at the same moment; retry.",
    ):
        version = set_canary(session, body["version"], body["percent"])
        _canary_change(version, body["percent"])
    return json_response(models_listing())


@admin_api.delete("/models/default/canary")
@admin_api.output(ModelsOut)
@admin_api.doc(
    summary="End the canary",
    description="All default traffic goes back to the active version. Ending when there is no "
    "canary changes nothing.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def end_canary_view() -> Any:
    session = audited_session()
    was = end_canary(session)
    if was is not None:
        _canary_change(was, 0)
    session.commit()
    return json_response(models_listing())


@admin_api.post("/models/default/activate")
@admin_api.output(ModelsOut)
@admin_api.doc(
    summary="Serve the shipped default model",
    description="Deactivates every denoiser version, so new jobs use the default model again.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def activate_default_view() -> Any:
    session = audited_session()
    deactivate_all(session)
    record(session, bearer_caller().owner, "model.activate", "model:default")
    session.commit()
    return json_response(models_listing())


@admin_api.post("/tokens/<token_id:token_id>/revoke")
@admin_api.output(TokenOut)
@admin_api.doc(
    summary="Revoke a token",
    description="The token stops working for the API at once in this process, and within a "
    "few seconds in others; every browser signed in with it is signed out at once. Revoking a "
    "revoked token changes nothing. Token ids are those of `dq token list` and of the audit "
    'trail ("token:<id>").',
    security="BearerAuth",
    responses={
        **ADMIN_ERRORS,
        404: "There is no token with that id.",
        409: "That is the token of this request; revoke it with another one.",
    },
)
def revoke_token_view(token_id: int) -> Any:
    caller = bearer_caller()
    if caller.owner == f"token:{token_id}":
        raise Problem(
            409,
            "This is the token you are calling with; revoke it with another admin token or "
            "with `dq token revoke`.",
        )
    session = audited_session()
    try:
        token = revoke_token(session, token_id, actor=caller.owner)
    except TokenNotFound:
        raise Problem(404, f"There is no token {token_id}.") from None
    session.commit()
    services().token_cache.discard(token.token_hash)
    return json_response(token_resource(token))


class TokenWeightIn(Schema):
    weight = JsonNumber(
        required=True,
        validate=Range(min=MIN_WEIGHT, max=MAX_WEIGHT, error="must be from {min} to {max}"),
        metadata={
            "description": "Turns per round of the queue that this token's jobs get, against "
            "1 for every other owner (fair share between owners).",
            "example": 2,
        },
    )


class TokenWeightOut(TokenOut):
    weight = Float(required=True, metadata={"description": "Fair-share weight (default 1)."})


@admin_api.put("/tokens/<token_id:token_id>/weight")
@admin_api.input(TokenWeightIn, location="json", arg_name="body")
@admin_api.output(TokenWeightOut)
@admin_api.doc(
    summary="Set a token's fair-share weight",
    description="Waiting jobs run in weighted round-robin across owners: each round, a token "
    "of weight 2 gets two turns and one of weight 0.5 a turn every other round; owners "
    "without a weight (other tokens, browser sessions) get one. Takes effect at the next "
    "claim. Token ids are those of `dq token list`.",
    security="BearerAuth",
    responses={**ADMIN_ERRORS, **BODY_ERRORS, 404: "There is no token with that id."},
)
def token_weight_view(token_id: int, body: dict[str, Any]) -> Any:
    session = audited_session()
    try:
        token = set_weight(session, token_id, body["weight"], actor=bearer_caller().owner)
    except TokenNotFound:
        raise Problem(404, f"There is no token {token_id}.") from None
    session.commit()
    return json_response({**token_resource(token), "weight": token.weight})


@admin_api.get("/audit")
@admin_api.input(AuditQuery, location="query", arg_name="query", unknown=RAISE)
@admin_api.output(AuditPage)
@admin_api.doc(
    summary="Read the audit trail",
    description="Admin actions (sign-in and sign-out of browsers, model activation, training "
    "runs started and canceled, tokens created and revoked, prune), newest first. Page back "
    "with `before` set to the previous page's `next_before`; filter by `action` and `actor`.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def audit_view(query: dict[str, Any]) -> Any:
    session = get_session()
    events = recent(
        session,
        limit=query["limit"],
        before_id=query.get("before"),
        action=query.get("action"),
        actor=query.get("actor"),
    )
    body = {
        "events": [event_resource(e) for e in events],
        "limit": query["limit"],
        "next_before": next_cursor(events, query["limit"]),
    }
    end_reads(session)
    return json_response(body)
