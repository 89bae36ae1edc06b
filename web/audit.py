"""The audit trail as the web app writes and shows it.

Views that act for an admin take their database session from :func:`audited_session`, which
names the request (its X-Request-ID and client address) on the session, so that every audit
row written in that unit of work, by the view or by core on its behalf, carries them. Reading
the trail: ``GET /api/v1/admin/audit`` (web.admin_api) and the page ``/admin/audit``
(web.admin), with the schemas below.
"""

from __future__ import annotations

from typing import Any

from apiflask import Schema
from apiflask.fields import DateTime, Dict, Integer, List, Nested, String
from apiflask.validators import Length, OneOf, Range
from flask import request
from sqlalchemy.orm import Session

from core.db.models import ApiToken, AuditEvent
from core.services.audit import ACTIONS, bind_origin
from web.db import get_session
from web.resources import iso
from web.schemas import JsonText
from web.security import request_id

MAX_PAGE = 200
DEFAULT_PAGE = 50


def audited_session() -> Session:
    """The request's database session, with the request named for the audit rows it gets."""
    session = get_session()
    bind_origin(session, request_id=request_id(), client=request.remote_addr)
    return session


def event_resource(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": iso(event.at),
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "detail": event.detail or {},
        "request_id": event.request_id,
        "client": event.client,
    }


def next_cursor(events: list[AuditEvent], limit: int) -> int | None:
    """The ``before`` of the next (older) page; None when this page is the last."""
    return events[-1].id if len(events) == limit else None


# --- schemas of GET /api/v1/admin/audit -----------------------------------------------------


class AuditQuery(Schema):
    limit = Integer(
        load_default=DEFAULT_PAGE,
        validate=Range(1, MAX_PAGE, error="must be from {min} to {max}"),
        metadata={"description": f"Events per page, at most {MAX_PAGE}."},
    )
    before = Integer(
        validate=Range(1, 2**63 - 1, error="must be a positive event id"),
        metadata={"description": "Only events older than this id: the previous page's next."},
    )
    action = String(validate=OneOf(ACTIONS, error="must be one of {choices}"))
    actor = JsonText(
        validate=Length(1, 80, error="must be 1 to 80 characters"),
        metadata={
            "description": 'Who acted: "token:<id>", or "cli" for the dq command.',
            "pattern": r"^[^\x00]*$",  # as JsonText checks: no NUL
        },
    )


class AuditEventOut(Schema):
    id = Integer(required=True)
    at = DateTime(required=True, metadata={"description": "When, in UTC."})
    actor = String(required=True, metadata={"description": 'e.g. "token:3" or "cli".'})
    action = String(required=True, metadata={"description": f"One of {', '.join(ACTIONS)}."})
    target = String(required=True, metadata={"description": 'e.g. "run:<uuid>", "token:7".'})
    detail = Dict(required=True)
    request_id = String(
        required=True, allow_none=True, metadata={"description": "The X-Request-ID it came in."}
    )
    client = String(
        required=True, allow_none=True, metadata={"description": "The client's address."}
    )


class AuditPage(Schema):
    events = List(Nested(AuditEventOut), required=True)
    limit = Integer(required=True)
    next_before = Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Pass as `before` for the next, older page; null at the end."},
    )


# --- schemas of POST /api/v1/admin/tokens/{token_id}/revoke ---------------------------------


class TokenOut(Schema):
    id = Integer(required=True)
    role = String(required=True, validate=OneOf(["user", "admin"]))
    label = String(required=True)
    created_at = DateTime(required=True)
    revoked_at = DateTime(required=True, allow_none=True)


def token_resource(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "role": token.role.value,
        "label": token.label,
        "created_at": iso(token.created_at),
        "revoked_at": iso(token.revoked_at),
    }
