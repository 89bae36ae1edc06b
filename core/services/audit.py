"""The audit trail: one row per admin action (who, what, to which thing, when).

Callers record inside the transaction of the action itself, so an action and its audit row
commit together or not at all. Actions: ``sign_in``, ``sign_out``, ``model.activate`` (its
detail says whether it was forced past the eval gate, with the figures), ``model.import``,
``model.retire``, ``model.canary``, ``run.create``, ``run.cancel``, ``token.create``,
``token.revoke``, ``token.weight``, ``prune``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import AuditEvent

# Where session.info keeps the request behind a unit of work (see bind_origin).
_ORIGIN_KEY = "dq_audit_origin"

ACTIONS = (
    "sign_in",
    "sign_out",
    "model.activate",
    "model.import",
    "model.retire",
    "model.canary",
    "run.create",
    "run.cancel",
    "token.create",
    "token.revoke",
    "token.weight",
    "prune",
)


def bind_origin(session: Session, *, request_id: str | None, client: str | None) -> None:
    """Name the request that ``session``'s work is done for. :func:`record` fills in its
    request id and client address from here when its caller passes none, so core functions
    that record on a caller's behalf (``submit_training_run``, ``revoke_token``) need not
    know about requests."""
    session.info[_ORIGIN_KEY] = (request_id, client)


def record(
    session: Session,
    actor: str,
    action: str,
    target: str = "",
    *,
    detail: dict[str, Any] | None = None,
    request_id: str | None = None,
    client: str | None = None,
) -> AuditEvent:
    """Add an audit row to ``session`` (committed with the caller's transaction)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    origin_request_id, origin_client = session.info.get(_ORIGIN_KEY, (None, None))
    request_id = request_id or origin_request_id
    client = client or origin_client
    event = AuditEvent(
        actor=actor[:80],
        action=action,
        target=target[:200],
        detail=detail or {},
        request_id=request_id,
        client=client[:64] if client else None,
    )
    session.add(event)
    return event


def recent(
    session: Session,
    *,
    limit: int = 50,
    before_id: int | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
) -> list[AuditEvent]:
    """Newest first; ``before_id`` pages back (the id of the last row of the previous page)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    return list(session.scalars(query))
