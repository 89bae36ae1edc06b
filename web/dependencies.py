"""What the web app depends on, each probed on its own: the database, the broker and storage.

Only the database decides whether a web process can serve (``/readyz``): a submit commits the
job and its outbox row, and the reaper sends the message once the broker is back, so a broker
outage must not take every web pod out of the load balancer. The other two are reported for
people and alerts: ``/readyz/dependencies`` probes all three at each request, and the
``dq_dependency_up`` gauges in ``/metrics`` read a result at most ``ttl`` seconds old, so that a
scrape does not cost a round trip to the broker and the store every time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

from core.db.session import check_database
from web.services import Services

log = logging.getLogger(__name__)

DEPENDENCIES = ("database", "broker", "storage")
PROBE_CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class DependencyState:
    ok: bool
    error: str | None = None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def probe(name: str, check: Callable[[], None]) -> DependencyState:
    """Run one check; any exception means down, and its first line says why."""
    try:
        check()
    except Exception as e:
        log.warning("%s is down: %s", name, e)
        return DependencyState(ok=False, error=_first_line(e))
    return DependencyState(ok=True)


def probe_database(svc: Services) -> DependencyState:
    return probe("database", lambda: check_database(svc.engine))


def probe_dependencies(svc: Services) -> dict[str, DependencyState]:
    """Every dependency, probed now."""
    # A publisher without a check (a test's fake) has no connection that could be down.
    broker_check: Callable[[], None] = getattr(svc.publisher, "check", lambda: None)
    return {
        "database": probe_database(svc),
        "broker": probe("broker", broker_check),
        "storage": probe("storage", svc.storage.check),
    }


class CachedProbe:
    """:func:`probe_dependencies`, answered from the last result while it is younger than
    ``ttl`` seconds. One caller probes at a time; the others wait for its result."""

    def __init__(self, svc: Services, ttl: float = PROBE_CACHE_SECONDS):
        self.svc = svc
        self.ttl = ttl
        self._lock = threading.Lock()
        self._result: dict[str, DependencyState] | None = None
        self._at = 0.0

    def get(self) -> dict[str, DependencyState]:
        with self._lock:
            if self._result is None or monotonic() - self._at >= self.ttl:
                self._result = probe_dependencies(self.svc)
                self._at = monotonic()
            return self._result
