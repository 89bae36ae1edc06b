"""One thread per web process that wakes the live streams (SSE) whose jobs have new events.

Database triggers append a ``job_events`` row in the transaction of every change to a job
(``core.db.events``). The hub finds new rows with one query, ``id > last seen`` (bounded), and
sets the wake-up of every stream following one of those jobs; the stream then reads its own
job's rows after the last id it sent. So however many streams are open, the database sees one
query per poll from this process, plus one per stream only when its job changed.

When to look:

- with Redis (DQ_BROKER_URL=redis://…) the hub SUBSCRIBEs to ``dq:job-events``, where workers
  publish job ids after they commit (``core.queue.notify``): an event shows within milliseconds. It
  still looks every ``fallback_poll_seconds``, so a lost message (or a change made elsewhere: a
  cancel in the web app, the reaper) only waits until then;
- without Redis (the embedded defaults) it looks every ``poll_seconds``.

PostgreSQL hands out ids before commit, so a row can become visible after rows with larger ids.
The hub remembers the ids it skipped over and asks for them again for ``gap_seconds``; a
notified job's streams are woken by the message itself, whatever the ids say. Streams never
trust the hub for content, only for timing: each reads its job's rows by id, so a spurious
wake-up costs one query and a missed one cannot lose an event.

The thread starts with the first stream and stops when none has been open for a while.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine

from core.db.models import JobEvent
from core.queue.notify import CHANNEL, decode

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
FALLBACK_POLL_SECONDS = 1.0
SCAN_LIMIT = 1000
GAP_SECONDS = 30.0
MAX_GAPS = 10_000
IDLE_STOP_SECONDS = 30.0
REDIS_RETRY_SECONDS = 5.0


class ServerBusy(Exception):
    """This process holds its DQ_SSE_MAX_STREAMS streams already."""


class TooManyStreams(Exception):
    """The owner already has the most open streams one process allows."""


class Subscription:
    """One open stream's wake-up: set by the hub when its job has new events."""

    def __init__(self, job_id: uuid.UUID, owner: str):
        self.job_id = job_id
        self.owner = owner
        self._woken = threading.Event()
        self.closed = False

    def wake(self) -> None:
        self._woken.set()

    def wait(self, timeout: float) -> bool:
        """True when woken (and the flag is cleared, so read *after* this returns)."""
        if self._woken.wait(max(0.0, timeout)):
            self._woken.clear()
            return True
        return False


class EventHub:
    def __init__(
        self,
        engine: Engine,
        redis_url: str | None = None,
        *,
        poll_seconds: float = POLL_SECONDS,
        fallback_poll_seconds: float = FALLBACK_POLL_SECONDS,
        max_streams_per_owner: int = 100,
        max_streams: int | None = None,
        idle_stop_seconds: float = IDLE_STOP_SECONDS,
    ):
        self.engine = engine
        self.redis_url = redis_url
        self.poll_seconds = poll_seconds
        self.fallback_poll_seconds = fallback_poll_seconds
        self.max_streams_per_owner = max_streams_per_owner
        self.max_streams = max_streams
        self.idle_stop_seconds = idle_stop_seconds
        # Counts status changes of any job: a queued job's position may have moved.
        self.queue_version = 0
        self._subs: dict[uuid.UUID, set[Subscription]] = defaultdict(set)
        self._per_owner: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_id: int | None = None
        self._gaps: dict[int, float] = {}  # skipped id -> when to stop asking for it
        self._idle_since = time.monotonic()

    # --- streams ------------------------------------------------------------------------

    def subscribe(self, job_id: uuid.UUID, owner: str) -> Subscription:
        sub = Subscription(job_id, owner)
        with self._lock:
            held = sum(self._per_owner.values())
            if self.max_streams is not None and held >= self.max_streams:
                raise ServerBusy(f"this server holds {held} event streams, its most")
            if self._per_owner[owner] >= self.max_streams_per_owner:
                raise TooManyStreams(
                    f"{self.max_streams_per_owner} event streams are open for you already"
                )
            self._per_owner[owner] += 1
            self._subs[job_id].add(sub)
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="dq-event-hub", daemon=True)
                self._thread.start()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Idempotent: a stream's generator and its response's close both call it."""
        with self._lock:
            if sub.closed:
                return
            sub.closed = True
            subs = self._subs.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.job_id]
            self._per_owner[sub.owner] -= 1
            if self._per_owner[sub.owner] <= 0:
                del self._per_owner[sub.owner]
            if not self._subs:
                self._idle_since = time.monotonic()

    @property
    def stream_count(self) -> int:
        with self._lock:
            return sum(len(subs) for subs in self._subs.values())

    def wake(self, job_ids: list[uuid.UUID]) -> None:
        with self._lock:
            subs = [sub for job_id in job_ids for sub in self._subs.get(job_id, ())]
        for sub in subs:
            sub.wake()

    def close(self) -> None:
        """Stop the thread (tests; a process that exits needs nothing: it is a daemon)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    # --- the thread ---------------------------------------------------------------------

    def _should_stop(self) -> bool:
        """Under the lock, so that a stream subscribing now starts a new thread."""
        with self._lock:
            idle = not self._subs and time.monotonic() - self._idle_since > self.idle_stop_seconds
            if self._stop.is_set() or idle:
                self._thread = None
                return True
            return False

    def _run(self) -> None:
        pubsub: Any = None
        retry_redis_at = 0.0
        while not self._should_stop():
            if self.redis_url and pubsub is None and time.monotonic() >= retry_redis_at:
                try:
                    pubsub = self._subscribe_redis(self.redis_url)
                except Exception as e:
                    log.warning("event hub: no Redis notifications (%s); polling", e)
                    retry_redis_at = time.monotonic() + REDIS_RETRY_SECONDS
            notified: list[uuid.UUID] = []
            if pubsub is not None:
                try:
                    notified = self._listen(pubsub)
                except Exception as e:
                    log.warning("event hub: Redis subscription lost (%s); polling", e)
                    self._close_quietly(pubsub)
                    pubsub = None
                    retry_redis_at = time.monotonic() + REDIS_RETRY_SECONDS
            else:
                self._stop.wait(self.poll_seconds)
            if notified:
                self.wake(notified)
            try:
                self.scan()
            except Exception as e:  # the database is away: try again at the next turn
                log.warning("event hub: reading job events failed (%s)", e)
                self._stop.wait(self.poll_seconds)
        self._close_quietly(pubsub)

    def _subscribe_redis(self, url: str) -> Any:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2.0, health_check_interval=30)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(CHANNEL)
        return pubsub

    def _listen(self, pubsub: Any) -> list[uuid.UUID]:
        """Job ids from the messages that arrive within the fallback interval (the first one
        ends the wait; those already queued behind it are taken too)."""
        found: list[uuid.UUID] = []
        until = time.monotonic() + self.fallback_poll_seconds
        message = None
        # In slices, so that close() is heard within a quarter of a second.
        while message is None and not self._stop.is_set() and time.monotonic() < until:
            message = pubsub.get_message(timeout=min(0.25, until - time.monotonic()))
        while message is not None and len(found) < SCAN_LIMIT:
            if message.get("type") == "message":
                found.extend(decode(message["data"]))
            message = pubsub.get_message(timeout=0)
        return found

    @staticmethod
    def _close_quietly(pubsub: Any) -> None:
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def scan(self) -> None:
        """Read the rows added since the last scan (and skipped ids that may have committed
        since) and wake the streams of their jobs."""
        now = time.monotonic()
        first = self._last_id is None
        with self.engine.connect() as connection:
            if self._last_id is None:
                newest = connection.execute(select(func.max(JobEvent.id))).scalar()
                # Look back a little: rows with smaller ids may still be committing.
                self._last_id = max(0, (newest or 0) - SCAN_LIMIT)
            self._gaps = {i: until for i, until in self._gaps.items() if until > now}
            since = self._last_id
            condition = JobEvent.id > since
            if self._gaps:
                condition = or_(condition, JobEvent.id.in_(list(self._gaps)))
            rows = connection.execute(
                select(JobEvent.id, JobEvent.job_id, JobEvent.kind)
                .where(condition)
                .order_by(JobEvent.id)
                .limit(SCAN_LIMIT)
            ).all()
        if not rows:
            return
        expected = since + 1
        for row in rows:
            self._gaps.pop(row.id, None)
            if row.id > since:
                for skipped in range(expected, min(row.id, expected + MAX_GAPS)):
                    self._gaps[skipped] = now + GAP_SECONDS
                expected = row.id + 1
        if len(self._gaps) > MAX_GAPS:  # keep the newest
            for skipped in sorted(self._gaps)[: len(self._gaps) - MAX_GAPS]:
                del self._gaps[skipped]
        self._last_id = max(since, rows[-1].id)
        if not first and any(row.kind == "status" for row in rows):
            self.queue_version += 1
        self.wake(list({row.job_id for row in rows}))
