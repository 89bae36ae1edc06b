"""Lease renewal: a thread that keeps the jobs and runs this process holds marked as alive.

Every claim sets ``lease_expires_at``; this thread pushes it forward every third of the lease,
by the database's clock and fenced by the claim's token (``core.db.transitions.renew``). If the
process dies (SIGKILL, OOM killer, power), renewals stop, the lease runs out, and the reaper puts
the work back in the queue. Past a claim's deadline renewals stop too, so a worker stuck in a
task cannot keep its work forever.

A renewal that finds the row no longer held (the reaper re-queued it while this process was
stalled, and another worker claimed it) marks the lease lost: the task polls :meth:`lost` and
stops that work at once.

The same thread tells the database every :data:`PRESENCE_EVERY_S` that this worker is alive and
which queues it has taken work from (``worker_presence``, read by ``core.queue.eta``: waits divide
by the live generation workers), and which model versions its cache holds (``models``: ids as
strings, null for the shipped default, most recently used last). It starts with the first claim,
so a worker counts from its first job on; an idle worker with an empty queue changes no estimate.
The row also says what precision the worker's models run in (``precision``: fp32, bf16 or fp16,
DQ_PRECISION resolved for its device; null until it has loaded a model).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.engine import Engine

from core.db.models import Job
from core.db.session import session_scope
from core.db.transitions import Lease, renew
from core.queue.dispatch import QUEUE_GENERATE, QUEUE_TRAIN
from core.queue.eta import mark_present
from worker.identity import worker_identity

log = logging.getLogger(__name__)

PRESENCE_EVERY_S = 10.0


class Heartbeat:
    def __init__(
        self,
        engine: Engine,
        lease_seconds: float,
        models: Callable[[], list[uuid.UUID | None]] | None = None,
        precision: Callable[[], str | None] | None = None,
    ):
        self.engine = engine
        self.precision = precision  # what the loaded models run in, for worker_presence
        self.models = models  # what the model cache holds, for worker_presence
        self.lease = timedelta(seconds=lease_seconds)
        self._held: dict[uuid.UUID, Lease] = {}
        self._lost: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queues: set[str] = set()  # the kinds of work held so far, for worker_presence

    @property
    def lease_seconds(self) -> float:
        return self.lease.total_seconds()

    def hold(self, *leases: Lease) -> None:
        with self._lock:
            for lease in leases:
                self._held[lease.id] = lease
                self._lost.discard(lease.id)
                self._queues.add(QUEUE_GENERATE if lease.model is Job else QUEUE_TRAIN)
        self._ensure_thread()

    def release(self, *ids: uuid.UUID) -> None:
        with self._lock:
            for i in ids:
                self._held.pop(i, None)
                self._lost.discard(i)

    def lost(self) -> set[uuid.UUID]:
        """Ids whose lease a renewal found gone since they were held."""
        with self._lock:
            return set(self._lost)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dq-heartbeat", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        with self._lock:
            held = list(self._held.values())
        if not held:
            return
        lost = []
        with session_scope(self.engine) as session:
            for lease in held:
                if renew(session, lease, self.lease_seconds) is False:
                    lost.append(lease)
        with self._lock:
            for lease in lost:
                if self._held.pop(lease.id, None) is not None:
                    self._lost.add(lease.id)
                    log.warning(
                        "lost %s %s: it is no longer held by attempt %d of this worker "
                        "(re-queued while this worker was stalled?); stopping its work",
                        lease.noun,
                        lease.id,
                        lease.token,
                    )

    def announce(self) -> None:
        """Mark this worker present now, with the queues it has taken work from."""
        with self._lock:
            queues = ",".join(sorted(self._queues))
        held = None
        if self.models is not None:
            held = [None if v is None else str(v) for v in self.models()]
        precision = self.precision() if self.precision is not None else None
        with session_scope(self.engine) as session:
            mark_present(session, worker_identity(), queues, models=held, precision=precision)

    def _run(self) -> None:
        interval = self.lease.total_seconds() / 3
        tick = min(interval, PRESENCE_EVERY_S)
        next_presence = time.monotonic()
        next_beat = next_presence + interval
        while True:
            now = time.monotonic()
            if now >= next_presence:
                next_presence = now + PRESENCE_EVERY_S
                try:
                    self.announce()
                except Exception:  # a nicety for ETAs; never worth a log line per tick
                    log.debug("could not record this worker's presence", exc_info=True)
            if now >= next_beat:
                next_beat = now + interval
                try:
                    self.beat()
                except Exception:  # the database blinked; the next beat tries again
                    log.exception("lease renewal failed")
            if self._stop.wait(tick):
                return

    def stop(self) -> None:
        self._stop.set()
