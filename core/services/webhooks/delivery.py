"""One try of one webhook delivery, its retries, and the delivery log users and admins read.

:func:`deliver` makes one try of one ``webhook_deliveries`` row:

- claim the try with a conditional UPDATE that raises ``attempts`` (the fencing token) and pushes
  ``next_attempt_at`` past the try's longest duration, so a duplicate task message finds the row
  not due and does nothing, and a worker that dies mid-try leaves a row that comes due again;
- build the body once (:mod:`.payload`; the first try stores it: every retry sends the same
  bytes, under the same ``webhook-id``), sign it per Standard Webhooks with the owner's key and,
  during a rotation, the previous key too (:mod:`.signing`);
- send it with :func:`send`: resolve the host and check every address (:mod:`.targets`), then
  connect to the address that was checked (no second lookup that DNS rebinding could answer
  differently), with SNI and certificate checks against the host name;
- only a 2xx counts; a redirect is not followed and counts as a failure; 410 Gone disables the
  URL for the owner; anything else is retried with exponential backoff and full jitter until
  DQ_WEBHOOK_RETRY_WINDOW has passed since the event.

Every try is logged as a ``webhook_attempts`` row; :func:`replay` sends a delivery again.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import DisabledWebhookUrl, WebhookAttempt, WebhookDelivery, utcnow
from core.db.session import session_scope
from core.runtime.settings import Settings
from core.services.jobs import JobRequestError
from core.services.webhooks.payload import build_payload
from core.services.webhooks.signing import get_or_create_secret, owner_token_id, sign, signing_keys
from core.services.webhooks.targets import Resolver, check_target, resolve

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
# A claimed try owns its row this long (connect, send and read each time out after 10 s); a
# worker that dies mid-try leaves a row that comes due again after it.
CLAIM_SECONDS = 60.0
# What is read of a receiver's answer: the status counts, the body does not.
MAX_RESPONSE_BYTES = 64 * 1024
# Backoff before retry n (1, 2, …): uniform in [0, min(cap, base * 2**(n-1))] ("full jitter",
# AWS Architecture Blog, "Exponential Backoff And Jitter", 2015). The base is 5 s; tests shorten
# it with DQ_WEBHOOK_BACKOFF_BASE_SECONDS (read here, not in Settings: no deployment needs it).
BACKOFF_CAP_SECONDS = 3600.0
_DEFAULT_BACKOFF_BASE_SECONDS = 5.0


# --- sending -----------------------------------------------------------------------------------


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address checked beforehand; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, with SNI and the certificate checked against the
    host name (not the address)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


@dataclass(frozen=True)
class SendResult:
    status_code: int | None
    error: str | None
    latency_ms: float

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def send(
    url: str,
    headers: dict[str, str],
    body: str,
    settings: Settings,
    *,
    resolver: Resolver = resolve,
    timeout: float = TIMEOUT_SECONDS,
) -> SendResult:
    """POST ``body`` to ``url`` once: resolve, check every address, connect to a checked one.
    Never raises for what the network or the receiver does; the result says it."""
    started = time.monotonic()

    def done(code: int | None, error: str | None) -> SendResult:
        return SendResult(code, error, round((time.monotonic() - started) * 1000, 1))

    try:
        target = check_target(url, settings, resolver=resolver, require_resolution=True)
    except JobRequestError as e:
        return done(None, f"refused: {e.message}")
    payload = body.encode()
    all_headers = {
        **headers,
        "Content-Type": "application/json",
        "User-Agent": "diffusion-queue-webhooks/1",
    }
    last_error = "no address to connect to"
    for address in target.addresses:
        kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
        connection = kind(target.host, target.port, address, timeout)
        try:
            try:
                connection.connect()
            except OSError as e:  # this address does not answer: try the next one
                last_error = f"connecting to {address}: {e}"
                continue
            connection.request("POST", target.path, body=payload, headers=all_headers)
            response = connection.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            code = response.status
            if 300 <= code < 400:
                where = response.getheader("Location") or "nowhere"
                return done(code, f"redirect to {where[:200]} not followed")
            if not 200 <= code < 300:
                return done(code, f"answered {code} {response.reason}"[:200])
            return done(code, None)
        except (OSError, http.client.HTTPException) as e:
            return done(None, f"{type(e).__name__}: {e}"[:500])
        finally:
            connection.close()
    return done(None, last_error[:500])


# --- one try of one delivery -------------------------------------------------------------------


def backoff_base_seconds() -> float:
    raw = os.environ.get("DQ_WEBHOOK_BACKOFF_BASE_SECONDS", "")
    try:
        return max(float(raw), 0.0) if raw else _DEFAULT_BACKOFF_BASE_SECONDS
    except ValueError:
        return _DEFAULT_BACKOFF_BASE_SECONDS


def backoff(attempt: int, base: float | None = None, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed try ``attempt`` (1, 2, …): full jitter over
    min(cap, base * 2**(attempt - 1))."""
    base = backoff_base_seconds() if base is None else base
    ceiling = min(BACKOFF_CAP_SECONDS, base * 2.0 ** min(attempt - 1, 62))
    return (rng or random).uniform(0.0, ceiling)


def url_sha256(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def is_disabled(session: Session, owner: str, url: str) -> bool:
    return (
        session.scalar(
            select(DisabledWebhookUrl.id).where(
                DisabledWebhookUrl.owner == owner, DisabledWebhookUrl.url_sha256 == url_sha256(url)
            )
        )
        is not None
    )


def disable_url(session: Session, owner: str, url: str) -> int:
    """Record that ``url`` answered 410 for ``owner`` and end the owner's pending deliveries to
    it; returns how many were ended."""
    if not is_disabled(session, owner, url):
        try:
            with session.begin_nested():
                session.add(
                    DisabledWebhookUrl(
                        owner=owner, url_sha256=url_sha256(url), url=url, disabled_at=utcnow()
                    )
                )
        except IntegrityError:  # another worker recorded it first
            pass
    ended = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.owner == owner,
            WebhookDelivery.url == url,
            WebhookDelivery.state == "pending",
        )
        .values(state="disabled", last_error="the URL answered 410 Gone and is disabled")
        .execution_options(synchronize_session=False)
    )
    return int(ended.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TryOutcome:
    """What one call of :func:`deliver` did: ``state`` is the delivery's state after it, or
    ``skipped`` when the row was not due (a duplicate message, or already finished)."""

    state: str
    attempt: int = 0
    status_code: int | None = None
    error: str | None = None


def deliver(
    engine: Engine,
    delivery_id: int,
    settings: Settings,
    *,
    resolver: Resolver = resolve,
    rng: random.Random | None = None,
) -> TryOutcome:
    """One try of one delivery, idempotent under duplicate task messages."""
    now = utcnow()
    with session_scope(engine) as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None or row.state != "pending" or row.next_attempt_at > now:
            return TryOutcome("skipped")
        attempt = row.attempts + 1
        claimed = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.state == "pending",
                WebhookDelivery.attempts == row.attempts,
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(attempts=attempt, next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return TryOutcome("skipped")
        if is_disabled(session, row.owner, row.url):
            disable_url(session, row.owner, row.url)
            return TryOutcome("disabled", attempt, error="the URL is disabled")
        if row.payload is None:
            row.payload = build_payload(session, row)
        token_id = owner_token_id(row.owner)
        keys = signing_keys(
            get_or_create_secret(session, token_id) if token_id is not None else None, now
        )
        url, message_id, body = row.url, row.message_id, row.payload
    if not keys:
        result = SendResult(None, f"no signing key: {row.owner} is not an API token", 0.0)
    else:
        result = send(
            url, sign(message_id, utcnow(), body, keys), body, settings, resolver=resolver
        )
    return _record(engine, delivery_id, attempt, result, settings, rng)


def _record(
    engine: Engine,
    delivery_id: int,
    attempt: int,
    result: SendResult,
    settings: Settings,
    rng: random.Random | None,
) -> TryOutcome:
    """Write the try's outcome, fenced by its attempt number: a row that moved on meanwhile (a
    replay, a 410 from another delivery) keeps its state; the attempt is logged either way."""
    now = utcnow()
    with session_scope(engine) as session:
        session.add(
            WebhookAttempt(
                delivery_id=delivery_id,
                attempt=attempt,
                at=now,
                status_code=result.status_code,
                latency_ms=result.latency_ms,
                error=result.error,
            )
        )
        row = session.get(WebhookDelivery, delivery_id)
        if row is None:
            return TryOutcome("skipped", attempt)
        values: dict[str, Any] = {
            "last_status_code": result.status_code,
            "last_error": result.error,
        }
        if result.delivered:
            state = "delivered"
            values |= {"state": state, "delivered_at": now}
        elif result.status_code == 410:
            state = "disabled"
        else:
            give_up_at = row.created_at + timedelta(seconds=settings.webhook_retry_window)
            next_at = now + timedelta(seconds=backoff(attempt, rng=rng))
            if now >= give_up_at:
                state = "failed"
                values["state"] = state
            else:
                state = "pending"
                # The relay sends it again once due; one last try at the end of the window.
                values |= {"next_attempt_at": min(next_at, give_up_at), "published_at": None}
        fenced = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.attempts == attempt,
                WebhookDelivery.state == "pending",
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if fenced.rowcount != 1:  # type: ignore[attr-defined]
            return TryOutcome("skipped", attempt, result.status_code, result.error)
        if state == "disabled":
            disable_url(session, row.owner, row.url)
    if state != "delivered":
        log.info("webhook %d try %d: %s", delivery_id, attempt, result.error)
    return TryOutcome(state, attempt, result.status_code, result.error)


# --- what users and admins see -----------------------------------------------------------------


class DeliveryNotFound(LookupError):
    pass


def deliveries_of_job(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.id)
        )
    )


def attempts_of(session: Session, delivery_ids: Sequence[int]) -> dict[int, list[WebhookAttempt]]:
    out: dict[int, list[WebhookAttempt]] = {i: [] for i in delivery_ids}
    if delivery_ids:
        for a in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(delivery_ids)))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.id)
        ):
            out[a.delivery_id].append(a)
    return out


def replay(session: Session, job_id: uuid.UUID, delivery_id: int) -> WebhookDelivery:
    """Send a delivery of the job again: the same ``webhook-id`` and body, one more attempt,
    now. A pending one is made due at once (a try in flight meanwhile still records its
    outcome). A disabled one re-enables its URL for the owner: replaying says the receiver is
    back. After the retry window a failed try ends it again (no automatic retries)."""
    row = session.get(WebhookDelivery, delivery_id)
    if row is None or row.job_id != job_id:
        raise DeliveryNotFound(f"no delivery {delivery_id} of job {job_id}")
    if row.state == "disabled":
        session.execute(
            delete(DisabledWebhookUrl).where(
                DisabledWebhookUrl.owner == row.owner,
                DisabledWebhookUrl.url_sha256 == url_sha256(row.url),
            )
        )
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(state="pending", next_attempt_at=utcnow(), published_at=None)
        .execution_options(synchronize_session=False)
    )
    session.refresh(row)
    return row


def failing_endpoints(session: Session, since: datetime, limit: int = 100) -> list[dict[str, Any]]:
    """(owner, url) pairs with deliveries failing, given up or disabled since ``since``."""

    def count_of(state: str) -> Any:
        return func.sum(case((WebhookDelivery.state == state, 1), else_=0))

    rows = session.execute(
        select(
            WebhookDelivery.owner,
            WebhookDelivery.url,
            func.count().label("deliveries"),
            count_of("failed").label("failed"),
            count_of("pending").label("pending"),
            func.max(WebhookDelivery.created_at).label("last_event_at"),
        )
        .where(
            WebhookDelivery.created_at >= since,
            WebhookDelivery.state.in_(["pending", "failed", "disabled"]),
            WebhookDelivery.last_error.is_not(None),
        )
        .group_by(WebhookDelivery.owner, WebhookDelivery.url)
        .order_by(func.max(WebhookDelivery.created_at).desc())
        .limit(limit)
    ).all()
    disabled = {
        (d.owner, d.url): d.disabled_at
        for d in session.scalars(select(DisabledWebhookUrl).order_by(DisabledWebhookUrl.id))
    }
    out = []
    for r in rows:
        out.append(
            {
                "owner": r.owner,
                "url": r.url,
                "failing_deliveries": int(r.deliveries),
                "given_up": int(r.failed or 0),
                "retrying": int(r.pending or 0),
                "last_event_at": r.last_event_at,
                "disabled_at": disabled.pop((r.owner, r.url), None),
            }
        )
    for (owner, url), at in disabled.items():
        out.append(
            {
                "owner": owner,
                "url": url,
                "failing_deliveries": 0,
                "given_up": 0,
                "retrying": 0,
                "last_event_at": None,
                "disabled_at": at,
            }
        )
    return out[:limit]
