"""Webhooks: a token's signing secret and its rotation, each job's delivery log and replay,
failing endpoints for admins (routes on the api and admin_api blueprints)."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from apiflask import Schema
from apiflask.fields import UUID, DateTime, Float, Integer, List, Nested, String
from apiflask.validators import Range
from marshmallow import RAISE

from core.db.models import WebhookAttempt, WebhookDelivery, utcnow
from core.db.session import session_scope
from core.queue.dispatch import publish_delivery
from core.services.webhooks import (
    ROTATION_OVERLAP,
    DeliveryNotFound,
    attempts_of,
    deliveries_of_job,
    failing_endpoints,
    get_or_create_secret,
    owner_token_id,
    replay,
    rotate_secret,
)
from web.admin_api import ADMIN_ERRORS, admin_api
from web.api import COMMON_ERRORS, _job, api, json_response
from web.auth import bearer_caller
from web.db import end_reads, get_session
from web.problems import Problem
from web.resources import iso
from web.services import services

log = logging.getLogger(__name__)

# --- schemas ----------------------------------------------------------------------------------


class WebhookSecretOut(Schema):
    key = String(
        required=True,
        metadata={
            "description": "The whsec_ key that signs this token's webhooks (Standard Webhooks).",
            "example": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        },
    )
    previous_key_valid_until = DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "During a rotation: until when the previous key also signs."},
    )


class WebhookAttemptOut(Schema):
    attempt = Integer(required=True)
    at = DateTime(required=True)
    status_code = Integer(
        required=True, allow_none=True, metadata={"description": "null: no answer."}
    )
    latency_ms = Float(required=True, allow_none=True)
    error = String(required=True, allow_none=True)


class WebhookDeliveryOut(Schema):
    id = Integer(required=True)
    message_id = String(
        required=True, metadata={"description": "The webhook-id header, the same on every try."}
    )
    event = String(required=True)
    url = String(required=True)
    state = String(required=True, metadata={"enum": ["pending", "delivered", "failed", "disabled"]})
    attempts = Integer(required=True)
    next_attempt_at = DateTime(
        required=True, allow_none=True, metadata={"description": "While pending: the next try."}
    )
    created_at = DateTime(required=True)
    delivered_at = DateTime(required=True, allow_none=True)
    last_status_code = Integer(required=True, allow_none=True)
    last_error = String(required=True, allow_none=True)
    tries = List(Nested(WebhookAttemptOut), required=True, metadata={"description": "Every try."})


class WebhookDeliveriesOut(Schema):
    job_id = UUID(required=True)
    deliveries = List(Nested(WebhookDeliveryOut), required=True)


class FailingQuery(Schema):
    hours = Integer(
        load_default=24,
        validate=Range(min=1, max=24 * 30, error="must be from {min} to {max}"),
        metadata={"description": "How far back to look."},
    )


class FailingEndpointOut(Schema):
    owner = String(required=True)
    url = String(required=True)
    failing_deliveries = Integer(required=True)
    given_up = Integer(required=True)
    retrying = Integer(required=True)
    last_event_at = DateTime(required=True, allow_none=True)
    disabled_at = DateTime(
        required=True, allow_none=True, metadata={"description": "When it answered 410 Gone."}
    )


class FailingEndpointsOut(Schema):
    endpoints = List(Nested(FailingEndpointOut), required=True)


# --- resources --------------------------------------------------------------------------------


def secret_resource(row: Any) -> dict[str, Any]:
    now = utcnow()
    until = row.previous_until if row.previous_key and row.previous_until else None
    return {
        "key": row.key,
        "previous_key_valid_until": iso(until) if until and until > now else None,
    }


def attempt_resource(a: WebhookAttempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "at": iso(a.at),
        "status_code": a.status_code,
        "latency_ms": a.latency_ms,
        "error": a.error,
    }


def delivery_resource(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    return {
        "id": d.id,
        "message_id": d.message_id,
        "event": d.event,
        "url": d.url,
        "state": d.state,
        "attempts": d.attempts,
        "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None,
        "created_at": iso(d.created_at),
        "delivered_at": iso(d.delivered_at),
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "tries": [attempt_resource(a) for a in attempts],
    }


def _token_id() -> int:
    token_id = owner_token_id(bearer_caller().owner)
    if token_id is None:  # bearer callers are tokens; kept as a guard
        raise Problem(403, "Webhook keys belong to API tokens.")
    return token_id


# --- routes -----------------------------------------------------------------------------------


@api.get("/webhooks/secret")
@api.output(WebhookSecretOut)
@api.doc(
    tags=["Webhooks"],
    summary="Get the webhook signing key",
    description="The key that signs this token's webhooks, made on the first call. Verify "
    "deliveries with any Standard Webhooks library, e.g. Python's standardwebhooks: "
    "Webhook(key).verify(body, headers).",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def get_webhook_secret_view() -> Any:
    with session_scope(services().engine) as session:  # it may write: not the read session
        row = get_or_create_secret(session, _token_id())
        body = secret_resource(row)
    return json_response(body)


@api.post("/webhooks/secret/rotate")
@api.output(WebhookSecretOut)
@api.doc(
    tags=["Webhooks"],
    summary="Rotate the webhook signing key",
    description="A new key signs from now on. The previous key also signs, in the same "
    "webhook-signature header, for 24 hours (or until the next rotation), so receivers can "
    "switch without missing a delivery.",
    security="BearerAuth",
    responses=COMMON_ERRORS,
)
def rotate_webhook_secret_view() -> Any:
    session = get_session()
    row = rotate_secret(session, _token_id(), ROTATION_OVERLAP)
    body = secret_resource(row)
    session.commit()
    return json_response(body)


def _deliveries_body(session: Any, job_id: uuid.UUID) -> dict[str, Any]:
    rows = deliveries_of_job(session, job_id)
    log_of = attempts_of(session, [d.id for d in rows])
    return {
        "job_id": str(job_id),
        "deliveries": [delivery_resource(d, log_of[d.id]) for d in rows],
    }


@api.post("/jobs/<uuid:job_id>/webhooks/<big_id:delivery_id>/replay")
@api.output(
    WebhookDeliveriesOut,
    status_code=202,
    description="The job's deliveries, the replayed one due now.",
)
@api.doc(
    tags=["Webhooks"],
    summary="Send a webhook delivery again",
    description="The same message again (the same webhook-id and body, a fresh timestamp and "
    "signature), as one more try, now, whatever its state. A delivery disabled by a 410 "
    "re-enables its URL for your token. Within the retry window a failed try is retried as "
    "usual; past it, the delivery fails again after one try.",
    security="BearerAuth",
    responses={**COMMON_ERRORS, 404: "There is no such job or delivery, or it is not yours."},
)
def replay_webhook_view(job_id: uuid.UUID, delivery_id: int) -> Any:
    session = get_session()
    _job(job_id)
    try:
        replay(session, job_id, delivery_id)
    except DeliveryNotFound:
        raise Problem(404, f"Job {job_id} has no webhook delivery {delivery_id}.") from None
    session.commit()
    svc = services()
    try:
        publish_delivery(svc.engine, svc.publisher, delivery_id)
    except Exception as e:  # the broker: the relay sends it once it is back
        log.warning("webhook delivery %d is due but not yet published: %s", delivery_id, e)
    body = _deliveries_body(session, job_id)
    return json_response(body, 202)


@api.get("/jobs/<uuid:job_id>/webhooks")
@api.output(WebhookDeliveriesOut)
@api.doc(
    tags=["Webhooks"],
    summary="A job's webhook deliveries",
    description="Each event sent to the job's webhook: its state, every try (status code, "
    "latency, error) and, while it is retried, when the next try is due.",
    security="BearerAuth",
    responses={**COMMON_ERRORS, 404: "There is no such job, or it is not yours."},
)
def job_webhooks_view(job_id: uuid.UUID) -> Any:
    session = get_session()
    try:
        _job(job_id)
        body = _deliveries_body(session, job_id)
    finally:
        end_reads(session)
    return json_response(body)


@admin_api.get("/webhooks/failing")
@admin_api.input(FailingQuery, location="query", arg_name="query", unknown=RAISE)
@admin_api.output(FailingEndpointsOut)
@admin_api.doc(
    tags=["Webhooks"],
    summary="Failing webhook endpoints",
    description="Each owner's URLs whose deliveries failed in the last hours: still retrying, "
    "given up, or disabled by a 410; and every disabled URL.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def failing_webhooks_view(query: dict[str, Any]) -> Any:
    session = get_session()
    try:
        rows = failing_endpoints(session, utcnow() - timedelta(hours=query["hours"]))
    finally:
        end_reads(session)
    endpoints = [
        {**r, "last_event_at": iso(r["last_event_at"]), "disabled_at": iso(r["disabled_at"])}
        for r in rows
    ]
    return json_response({"endpoints": endpoints})
