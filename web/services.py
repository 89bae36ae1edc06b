"""What one app instance talks to: its settings, database engine (and replica), object store,
broker and rate limiter, built once by :func:`web.create_app` and reached from a request by
:func:`services`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app
from sqlalchemy.engine import Engine

from core.queue.dispatch import Publisher
from core.runtime.settings import Settings
from core.storage import Storage

if TYPE_CHECKING:
    from flask_limiter import Limiter

    from core.queue.eta import SnapshotCache
    from web.token_cache import TokenCache


@dataclass
class Replica:
    """A streaming replica of the database, and until when (time.monotonic()) reads skip it
    after it failed (:func:`web.db.replica_read`)."""

    engine: Engine
    skip_until: float = 0.0


@dataclass
class Services:
    settings: Settings
    engine: Engine
    storage: Storage
    publisher: Publisher
    token_cache: TokenCache
    # Positions and ETAs read the queue through this, at most queue_snapshot_seconds old.
    queue_snapshots: SnapshotCache
    # GET requests read through this one: the same pool (see web.db).
    read_engine: Engine
    limiter: Limiter | None = None
    # Polls, lists and pages read from this streaming replica first, when one is set (web.db).
    replica: Replica | None = None


def services() -> Services:
    """The services of the app handling the current request."""
    found: Services = current_app.extensions["dq"]
    return found
