"""The reaper and outbox relay as a process: ``dq reaper`` (``dq serve`` runs one too).

Every few seconds it runs :func:`core.dispatch.relay_once`: re-queue work whose lease expired,
publish what was committed but never sent, re-publish queued work whose message was lost. Any
number of reapers may run; every move they make is a conditional UPDATE.

It needs only ``core``: the broker is reached through :mod:`core.broker`, which sends tasks by
name, so ``dq reaper`` imports neither the web app nor the worker's tasks.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from core.db.session import get_engine
from core.dispatch import relay_once
from core.settings import Settings

log = logging.getLogger("core.reaper")


def run_reaper(settings: Settings, interval: float = 2.0, once: bool = False) -> None:
    from core.broker import CeleryPublisher

    engine = get_engine(settings)
    publisher = CeleryPublisher.from_settings(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info("reaper started; pass every %.1f s", interval)
    while not stop.is_set():
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
        if once:
            break
        stop.wait(interval)
    log.info("reaper stopped")
