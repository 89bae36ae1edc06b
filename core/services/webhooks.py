"""Signed webhooks, delivered from the database outbox.

A trigger adds a ``webhook_deliveries`` row in the transaction of each job status change that is
a webhook event (:mod:`core.db.events`); the relay (:func:`core.queue.dispatch.relay_once`) hands
due
rows to the ``webhooks`` queue, and :func:`deliver` makes one try of one row:

- claim the try with a conditional UPDATE that raises ``attempts`` (the fencing token) and pushes
  ``next_attempt_at`` past the try's longest duration, so a duplicate task message finds the row
  not due and does nothing, and a worker that dies mid-try leaves a row that comes due again;
- build the body once (the first try stores it: every retry sends the same bytes, under the same
  ``webhook-id``), sign it per Standard Webhooks with the ``standardwebhooks`` package, with the
  owner's key and, during a rotation, the previous key too;
- resolve the host, refuse any address that is not public (unless DQ_WEBHOOK_ALLOWED_NETWORKS
  names it), and connect to the address that was checked (no second lookup that DNS rebinding
  could answer differently), with SNI and certificate checks against the host name;
- only a 2xx counts; a redirect is not followed and counts as a failure; 410 Gone disables the
  URL for the owner; anything else is retried with exponential backoff and full jitter until
  DQ_WEBHOOK_RETRY_WINDOW has passed since the event.

Framework-free: no Flask, no Celery.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import (
    Batch,
    DisabledWebhookUrl,
    Image,
    Job,
    ModelVersion,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSecret,
    utcnow,
)
from core.db.session import session_scope
from core.runtime.settings import Settings
from core.services.jobs import JobRequestError, WebhookTarget
from core.services.model_versions import DEFAULT_MODEL_NAME

log = logging.getLogger(__name__)

EVENTS = ("start", "completed", "failed", "canceled")
MAX_URL_LENGTH = 2048
TIMEOUT_SECONDS = 10.0
# A claimed try owns its row this long (connect, send and read each time out after 10 s); a
# worker that dies mid-try leaves a row that comes due again after it.
CLAIM_SECONDS = 60.0
# What is read of a receiver's answer: the status counts, the body does not.
MAX_RESPONSE_BYTES = 64 * 1024
ROTATION_OVERLAP = timedelta(hours=24)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
# Backoff before retry n (1, 2, …): uniform in [0, min(cap, base * 2**(n-1))] ("full jitter",
# AWS Architecture Blog, "Exponential Backoff And Jitter", 2015). The base is 5 s; tests shorten
# it with DQ_WEBHOOK_BACKOFF_BASE_SECONDS (read here, not in Settings: no deployment needs it).
BACKOFF_CAP_SECONDS = 3600.0
_DEFAULT_BACKOFF_BASE_SECONDS = 5.0

# Cloud metadata services, named though they are link-local or private anyway.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

# --- the URL's syntax -------------------------------------------------------------------------
#
# Written without look-around, so that the same pattern reads alike in Python and in the API
# document's JSON Schema. ``WEBHOOK_URL_PATTERN`` is what any server accepts without settings:
# https to a dotted DNS name. ``_ANY_URL`` adds http and IP or single-label hosts, which are
# accepted only where DQ_WEBHOOK_ALLOW_HTTP or DQ_WEBHOOK_ALLOWED_NETWORKS allow them.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TLD = r"(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})"
_DNS_NAME = rf"(?:{_LABEL}\.)+{_TLD}"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_PCHAR = r"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
_REST = rf"(?::{_PORT})?(?:/(?:{_PCHAR}|/)*)?(?:\?(?:{_PCHAR}|[/?])*)?"
WEBHOOK_URL_PATTERN = rf"^https://{_DNS_NAME}{_REST}$"
_IPV4 = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"
_IPV6 = r"\[[0-9A-Fa-f:.]+\]"
_ANY_URL = re.compile(
    rf"(?P<scheme>https?)://(?P<host>{_DNS_NAME}|{_LABEL}|{_IPV4}|{_IPV6}){_REST}"
)
_NAMED = re.compile(_DNS_NAME)


Resolver = Callable[[str, int], Sequence[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


def allowed_networks(settings: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(part, strict=False)
        for part in settings.webhook_allowed_networks.split(",")
        if part.strip()
    ]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: Any, networks: Iterable[Any]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def forbidden_kind(address: Any) -> str | None:
    """Why ``address`` is no place for a webhook (None: a public address)."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    if not address.is_global:  # shared (100.64/10), documentation, benchmarking …
        return "special-purpose"
    return None


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart, and the addresses it may be sent to."""

    scheme: str
    host: str
    port: int
    path: str  # with the query
    addresses: tuple[str, ...]


def _parse(url: object, field: str = "webhook") -> tuple[str, str, int, str, bool]:
    """(scheme, host, port, path with query, host is a dotted DNS name)."""
    if not isinstance(url, str):
        raise JobRequestError(field, "must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise JobRequestError(field, f"is {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    if _ANY_URL.fullmatch(url) is None:
        if "@" in url.partition("://")[2].partition("/")[0]:
            raise JobRequestError(field, "must not carry credentials (user:password@)")
        raise JobRequestError(
            field,
            "must be an absolute https URL to a host name, e.g. https://example.com/hook "
            "(no credentials, no fragment, ASCII only)",
        )
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, host, port, path, _NAMED.fullmatch(host) is not None


def check_target(
    url: object,
    settings: Settings,
    *,
    resolver: Resolver = resolve,
    require_resolution: bool = True,
    field: str = "webhook",
) -> Target:
    """The target of ``url`` with the addresses it resolves to, all of them checked; raises
    JobRequestError naming ``field``.

    Every address must be public or inside DQ_WEBHOOK_ALLOWED_NETWORKS. Plain http needs
    DQ_WEBHOOK_ALLOW_HTTP or a target inside the allowed networks, and so does a host given as
    an IP address or a single-label name. A dotted name that does not resolve is refused only
    with ``require_resolution`` (at delivery); at submission it is accepted, because every try
    resolves and checks again.
    """
    scheme, host, port, path, named = _parse(url, field)
    networks = allowed_networks(settings)
    try:
        addresses = list(resolver(host, port))
    except (OSError, UnicodeError) as e:
        if require_resolution or not named:
            raise JobRequestError(field, f"the host {host} does not resolve ({e})") from None
        addresses = []
    parsed = []
    for text in addresses:
        address = _address(text)
        parsed.append(address)
        kind = forbidden_kind(address)
        if kind is not None and not _in(address, networks):
            raise JobRequestError(
                field,
                f"{host} resolves to {address}, a {kind} address; webhooks go only to public "
                "addresses, or to networks that DQ_WEBHOOK_ALLOWED_NETWORKS names",
            )
    allow_listed = bool(parsed) and all(_in(a, networks) for a in parsed)
    if not named and not allow_listed:
        raise JobRequestError(
            field,
            "must name its host by a dotted DNS name; an IP address or a single-label host is "
            "accepted only inside DQ_WEBHOOK_ALLOWED_NETWORKS",
        )
    if scheme == "http" and not (settings.webhook_allow_http or allow_listed):
        raise JobRequestError(
            field,
            "must use https (plain http only where DQ_WEBHOOK_ALLOW_HTTP is set, or to networks "
            "that DQ_WEBHOOK_ALLOWED_NETWORKS names)",
        )
    return Target(scheme, host, port, path, tuple(addresses))


def validate_target(
    url: object,
    events: object,
    settings: Settings,
    *,
    resolver: Resolver = resolve,
) -> WebhookTarget:
    """A submitted ``webhook`` and ``webhook_events_filter`` as a WebhookTarget; JobRequestError
    names the field at fault (the API answers 422)."""
    check_target(url, settings, resolver=resolver, require_resolution=False)
    assert isinstance(url, str)
    if events is None:
        return WebhookTarget(url, None)
    if not isinstance(events, (list, tuple)) or not all(isinstance(e, str) for e in events):
        raise JobRequestError("webhook_events_filter", "must be a list of event names")
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise JobRequestError(
            "webhook_events_filter",
            f"{', '.join(unknown)} is not an event; choose from {', '.join(EVENTS)}",
        )
    if not events:
        raise JobRequestError("webhook_events_filter", "must name at least one event")
    return WebhookTarget(url, tuple(e for e in EVENTS if e in events))


# --- secrets and signatures -------------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks key: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def get_or_create_secret(session: Session, token_id: int) -> WebhookSecret:
    """The token's signing key, made on first use (two racing callers get the same one)."""
    found = session.get(WebhookSecret, token_id)
    if found is not None:
        return found
    row = WebhookSecret(token_id=token_id, key=new_secret(), created_at=utcnow())
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = session.get(WebhookSecret, token_id, populate_existing=True)
        if found is None:
            raise
        return found
    return row


def rotate_secret(
    session: Session, token_id: int, overlap: timedelta = ROTATION_OVERLAP
) -> WebhookSecret:
    """A new key for the token; the one it replaces keeps signing for ``overlap`` (a second
    rotation ends that at once: only the latest previous key signs)."""
    row = get_or_create_secret(session, token_id)
    now = utcnow()
    row.previous_key = row.key
    row.previous_until = now + overlap
    row.key = new_secret()
    row.rotated_at = now
    session.flush()
    return row


def signing_keys(row: WebhookSecret | None, now: datetime) -> list[str]:
    """The keys that sign now: the current one, and the previous one during a rotation."""
    if row is None:
        return []
    keys = [row.key]
    if row.previous_key and row.previous_until is not None and row.previous_until > now:
        keys.append(row.previous_key)
    return keys


def sign(message_id: str, at: datetime, body: str, keys: Sequence[str]) -> dict[str, str]:
    """The Standard Webhooks headers of one try: ``webhook-signature`` holds one
    ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` per key, separated by spaces."""
    from standardwebhooks import Webhook

    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(key).sign(message_id, at, body) for key in keys),
    }


def owner_token_id(owner: str) -> int | None:
    """The API token of an owner string ``token:<id>``; None for anonymous form users."""
    kind, _, rest = owner.partition(":")
    return int(rest) if kind == "token" and rest.isdigit() else None


# --- the body ----------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def job_data(session: Session, job: Job) -> dict[str, Any]:
    """The job as a webhook shows it: what the API's job object says, with image object keys
    instead of presigned URLs (those expire before the last retry; GET the job for fresh ones)."""
    model = DEFAULT_MODEL_NAME
    if job.model_version_id is not None:
        model = session.scalar(
            select(ModelVersion.name).where(ModelVersion.id == job.model_version_id)
        ) or str(job.model_version_id)
    images = session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index))
    return {
        "object": "job",
        "id": str(job.id),
        "status": job.status.value,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "params": {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "steps": job.steps,
            "guidance": job.guidance,
            "sampler": job.sampler,
            "seed": job.seed,
            "num_images": job.num_images,
            "size": job.width,
            "model": model,
        },
        "images": [
            {"key": i.storage_key, "width": i.width, "height": i.height, "seed": i.seed}
            for i in images
        ],
        "error": job.error,
        "batch_id": str(job.batch_id) if job.batch_id else None,
    }


def batch_data(session: Session, batch: Batch) -> dict[str, Any]:
    jobs = session.execute(
        select(Job.id, Job.status).where(Job.batch_id == batch.id).order_by(Job.created_at, Job.id)
    ).all()
    return {
        "object": "batch",
        "id": str(batch.id),
        "size": batch.size,
        "created_at": _iso(batch.created_at),
        "finished_at": _iso(batch.finished_at),
        "jobs": [{"id": str(job_id), "status": status.value} for job_id, status in jobs],
    }


def build_payload(session: Session, delivery: WebhookDelivery) -> str:
    """``{"type": "job.completed", "timestamp": <the event>, "data": {...}}`` as compact JSON
    (Standard Webhooks' recommended shape; ``type`` is the object and the event)."""
    if delivery.job_id is not None:
        job = session.get(Job, delivery.job_id)
        data = job_data(session, job) if job is not None else {"object": "job"}
        kind = "job"
    else:
        batch = session.get(Batch, delivery.batch_id) if delivery.batch_id else None
        data = batch_data(session, batch) if batch is not None else {"object": "batch"}
        kind = "batch"
    body = {
        "type": f"{kind}.{delivery.event}",
        "timestamp": _iso(delivery.created_at),
        "data": data,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


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
