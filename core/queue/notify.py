"""A nudge to the web processes that a job's events changed: ``PUBLISH dq:job-events <ids>``.

The events themselves are rows that database triggers write in the transaction of each change
(``core.db.events``); this message only says "look now", so that a live stream (SSE) shows a
step within milliseconds instead of at the web process's next poll (``core.queue.event_hub``). It is
sent after the commit, on Redis when DQ_BROKER_URL is one, and is best effort: a lost message
only delays an event until that poll. Without Redis it does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from core.runtime.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "dq:job-events"
# After a failed publish, stay quiet this long: a dead Redis must not cost every step a timeout.
BACKOFF_SECONDS = 5.0
SOCKET_TIMEOUT_SECONDS = 0.5

_clients: dict[str, Any] = {}
_quiet_until: dict[str, float] = {}
_lock = threading.Lock()


def redis_url(settings: Settings) -> str | None:
    """The Redis that carries the notifications: the broker's, when it is Redis."""
    url = settings.broker_url
    return url if url.startswith(("redis://", "rediss://")) else None


def _client(url: str) -> Any:
    with _lock:
        client = _clients.get(url)
        if client is None:
            import redis

            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
                socket_timeout=SOCKET_TIMEOUT_SECONDS,
            )
            _clients[url] = client
        return client


def encode(job_ids: Iterable[uuid.UUID | str]) -> str:
    return ",".join(str(job_id) for job_id in job_ids)


def decode(message: bytes | str) -> list[uuid.UUID]:
    """The job ids of a message; anything that is not one is skipped."""
    text = message.decode("ascii", "replace") if isinstance(message, bytes) else message
    found = []
    for part in text.split(","):
        try:
            found.append(uuid.UUID(part.strip()))
        except ValueError:
            continue
    return found


def notify(settings: Settings, job_ids: Iterable[uuid.UUID | str]) -> None:
    """Tell the web processes that these jobs have new events. Call it after the commit. Never
    raises: the caller's work is done whether or not anyone hears this."""
    url = redis_url(settings)
    ids = encode(job_ids)
    if url is None or not ids:
        return
    if _quiet_until.get(url, 0.0) > time.monotonic():
        return
    try:
        _client(url).publish(CHANNEL, ids)
    except Exception as e:  # best effort: the web processes' poll finds the events anyway
        _quiet_until[url] = time.monotonic() + BACKOFF_SECONDS
        log.warning("could not notify the web processes of job events (%s); they poll", e)
