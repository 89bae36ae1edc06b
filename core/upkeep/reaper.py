"""The reaper and outbox relay as a process: ``dq reaper`` (``dq serve`` runs one too).

Every few seconds it runs :func:`core.queue.dispatch.relay_once`: re-queue work whose lease expired,
publish what was committed but never sent, re-publish queued work whose message was lost. Any
number of reapers may run; every move they make is a conditional UPDATE. Each pass also folds
the status-count deltas that /metrics reads (:func:`core.db.counts.fold`), and, when
DQ_RETENTION is set, goes on with the hourly prune (:class:`RetentionSchedule`).

It needs only ``core``: the broker is reached through :mod:`core.queue.broker`, which sends tasks by
name, so ``dq reaper`` imports neither the web app nor the worker's tasks.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from sqlalchemy.engine import Engine

from core.db import counts
from core.db.session import get_engine, session_scope
from core.queue.dispatch import relay_once
from core.queue.eta import forget_gone_workers
from core.queue.fairness import forget_idle_owners
from core.runtime.liveness import touch
from core.runtime.settings import Settings
from core.services.batches import finish_batches
from core.storage import Storage, make_storage
from core.upkeep.retention import Pruner, PruneReport

log = logging.getLogger("core.upkeep.reaper")

# A prune starts at most this often; between starts the reaper only relays.
PRUNE_EVERY_S = 3600.0
# A pass does this much of a prune, then relays again: re-queueing lost work never waits for
# more than a couple of small batches (each job costs two object listings).
PRUNE_BATCH_SIZE = 100
PRUNE_BATCHES_PER_PASS = 2


class RetentionSchedule:
    """The reaper's DQ_RETENTION prune: started at most once every ``every`` seconds, and run a
    few batches a pass until it is complete; then one audit row by "reaper" for all of it."""

    def __init__(self, settings: Settings, engine: Engine, every: float = PRUNE_EVERY_S):
        self.settings = settings
        self.engine = engine
        self.every = every
        self._storage: Storage | None = None
        self._pruner: Pruner | None = None
        self._last_start: float | None = None

    def run_pass(self, max_batches: int | None = PRUNE_BATCHES_PER_PASS) -> PruneReport | None:
        """Do this pass's share of the prune; the report once a prune is complete."""
        retention = self.settings.retention
        if retention is None:
            return None
        if self._pruner is None:
            now = time.monotonic()
            if self._last_start is not None and now - self._last_start < self.every:
                return None
            self._last_start = now
            if self._storage is None:
                self._storage = make_storage(self.settings)
            self._pruner = Pruner(
                self.engine, self._storage, self.settings, retention, batch_size=PRUNE_BATCH_SIZE
            )
        pruner = self._pruner
        try:
            if not pruner.step(max_batches):
                return None
        except Exception:
            self._pruner = None  # an error ends this prune; the next starts on schedule
            raise
        self._pruner = None
        pruner.record("reaper")
        return pruner.report


def fold_status_counts(engine: Engine) -> int:
    """Fold the status-count deltas into the counters /metrics reads, forget a batch of owners
    whose place in the fair order has passed, and the presence rows of workers gone a day."""
    with session_scope(engine) as session:
        folded = counts.fold(session)
    with session_scope(engine) as session:
        forget_idle_owners(session)
        forget_gone_workers(session)
    return folded


def run_reaper(
    settings: Settings,
    interval: float = 2.0,
    once: bool = False,
    liveness_file: str | None = None,
) -> None:
    """Relay every ``interval`` seconds until SIGTERM; ``once``: one pass, with a whole prune
    when DQ_RETENTION is set. ``liveness_file`` is touched after every pass, whether or not its
    work succeeded (a reaper waiting out a database outage is alive; one stuck in a pass is
    not)."""
    from core.queue.broker import CeleryPublisher

    engine = get_engine(settings)
    publisher = CeleryPublisher.from_settings(settings)
    retention = RetentionSchedule(settings, engine)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info("reaper started; pass every %.1f s", interval)
    if settings.retention is not None:
        log.info("retention: finished work older than %d s is pruned hourly", settings.retention)
    while not stop.is_set():
        try:
            with session_scope(engine) as session:
                finish_batches(session)  # each ended batch's "completed" webhook
        except Exception:
            log.exception("finishing batches failed")
        try:
            report = relay_once(engine, publisher, settings)
            if report:
                log.info(
                    "published %d, re-published %d, re-queued %d, failed %d",
                    len(report.published),
                    len(report.republished),
                    len(report.requeued),
                    len(report.failed),
                )
            for error in report.errors:
                log.warning("%s", error)
        except Exception:  # the database is down: keep trying
            log.exception("reaper pass failed")
        try:
            pruned = retention.run_pass(max_batches=None if once else PRUNE_BATCHES_PER_PASS)
            if pruned is not None:
                log.info(
                    "pruned work older than %d s: %s", pruned.older_than_seconds, pruned.summary()
                )
        except Exception:
            log.exception("prune failed; the next starts within the hour")
        try:
            fold_status_counts(engine)
        except Exception:
            log.exception("folding the status counts failed")
        if liveness_file:
            touch(liveness_file)
        if once:
            break
        stop.wait(interval)
    log.info("reaper stopped")
