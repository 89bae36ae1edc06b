"""Time limits that hold under any pool, and a liveness file for the orchestrator.

Celery's ``time_limit`` needs the prefork pool; ``dq worker`` runs the solo pool (one process per
GPU, the model stays loaded), where it does nothing. So every worker process runs this watchdog
thread instead. For the task in hand it knows the time limit, measured on the monotonic clock
from the claim:

- up to the limit the task runs; the task polls :meth:`Watchdog.past_deadline` between steps and
  ends itself (a job fails naming the limit, a training run checkpoints and is re-queued);
- a task still running ``grace`` seconds past its limit is stuck where no Python check runs (a
  wedged CUDA kernel, a storage call that never returns). The watchdog records the outcome from
  its own thread, fenced like any write, and exits the process with :data:`EXIT_HUNG`
  (``os._exit``: no cleanup that could hang too). Its supervisor (Kubernetes, ``dq serve``,
  Celery's prefork parent) starts a fresh one.

The heartbeat stops renewing a lease past its deadline (``core.db.transitions.renew``), so even a
watchdog that never got to write leaves a row the reaper ends.

While no task is past its limit the watchdog touches the liveness file every tick. A probe
(``dq worker-alive FILE``) finds a stale file when the process is hung or gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_HUNG = 70  # EX_SOFTWARE: the process is alive but cannot go on
TICK_S = 1.0


class Watchdog:
    def __init__(self, grace_seconds: float, liveness_file: str | Path | None = None):
        self.grace = grace_seconds
        self.liveness_file = Path(liveness_file) if liveness_file else None
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._limit = 0.0
        self._what = ""
        self._on_hang: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    # --- the task's side ----------------------------------------------------------------------

    def begin(self, what: str, limit_seconds: float, on_hang: Callable[[], None]) -> None:
        """A task starts: ``on_hang`` records its outcome if it is stuck past the limit."""
        with self._lock:
            self._deadline = time.monotonic() + limit_seconds
            self._limit = limit_seconds
            self._what = what
            self._on_hang = on_hang
        self.start()

    def end(self) -> None:
        with self._lock:
            self._deadline = None
            self._on_hang = None

    def past_deadline(self) -> bool:
        with self._lock:
            return self._deadline is not None and time.monotonic() > self._deadline

    # --- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (again in a forked child, where threads do not survive)."""
        if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="dq-watchdog", daemon=True)
            self._thread.start()

    def touch(self) -> None:
        if self.liveness_file is None:
            return
        try:
            self.liveness_file.parent.mkdir(parents=True, exist_ok=True)
            self.liveness_file.touch()
        except OSError:
            log.warning("cannot touch the liveness file %s", self.liveness_file, exc_info=True)

    def check(self) -> None:
        """One tick: touch the liveness file, or end a process stuck past its limit."""
        with self._lock:
            deadline, on_hang, what, limit = self._deadline, self._on_hang, self._what, self._limit
        now = time.monotonic()
        if deadline is None or now <= deadline:
            self.touch()
            return
        if now <= deadline + self.grace:
            return  # past the limit: the task is expected to end itself between steps
        log.critical(
            "%s is still running %.0f s past its %g s time limit; it is stuck where no check "
            "runs. Recording its outcome and exiting (status %d) so that the supervisor "
            "starts a fresh worker",
            what,
            now - deadline,
            limit,
            EXIT_HUNG,
        )
        if on_hang is not None:
            writer = threading.Thread(target=self._record, args=(on_hang,), daemon=True)
            writer.start()
            writer.join(timeout=15)  # a dead database must not keep the hung process alive
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_HUNG)

    @staticmethod
    def _record(on_hang: Callable[[], None]) -> None:
        try:
            on_hang()
        except Exception:
            log.exception("could not record the outcome; the reaper will")

    def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:
                log.exception("watchdog tick failed")
            time.sleep(TICK_S)
