"""Lease renewal: a thread that keeps the jobs and runs this process holds marked as alive.

Every claim sets ``lease_expires_at``; this thread pushes it forward every third of the lease.
If the process dies (SIGKILL, OOM killer, power), renewals stop, the lease runs out, and the
reaper (``core.dispatch.relay_once``) puts the work back in the queue.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.engine import Engine

from core.db.models import Job, JobStatus, TrainingRun, utcnow
from core.db.session import session_scope

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, engine: Engine, lease_seconds: float, host: str):
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)
        self.host = host
        self._held: dict[uuid.UUID, type[Job] | type[TrainingRun]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lease_expiry(self) -> datetime:
        return utcnow() + self.lease

    def hold(self, model: type[Job] | type[TrainingRun], *ids: uuid.UUID) -> None:
        with self._lock:
            for i in ids:
                self._held[i] = model
        self._ensure_thread()

    def release(self, *ids: uuid.UUID) -> None:
        with self._lock:
            for i in ids:
                self._held.pop(i, None)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dq-heartbeat", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        with self._lock:
            held = dict(self._held)
        if not held:
            return
        expires = self.lease_expiry()
        with session_scope(self.engine) as session:
            for model in (Job, TrainingRun):
                ids = [i for i, m in held.items() if m is model]
                if ids:
                    session.execute(
                        update(model)
                        .where(model.id.in_(ids), model.status == JobStatus.RUNNING)
                        .values(lease_expires_at=expires)
                        .execution_options(synchronize_session=False)
                    )

    def _run(self) -> None:
        interval = self.lease.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                self.beat()
            except Exception:  # the database blinked; the next beat tries again
                log.exception("lease renewal failed")

    def stop(self) -> None:
        self._stop.set()
