"""What a worker process holds for its whole life: settings, engine, storage, the model cache,
the lease heartbeat, the time-limit watchdog and a publisher. Built once, on first use, in the
process that runs tasks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from core.db.session import get_engine
from core.queue.dispatch import Publisher
from core.queue.fairness import Affinity
from core.runtime.settings import Settings
from core.storage import Storage, make_storage
from worker.heartbeat import Heartbeat
from worker.identity import worker_identity
from worker.models import ModelCache
from worker.watchdog import Watchdog


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    storage: Storage
    models: ModelCache
    heartbeat: Heartbeat
    watchdog: Watchdog
    publisher: Publisher
    host: str
    affinity: Affinity = field(default_factory=lambda: Affinity(0.0))


_context: WorkerContext | None = None
_lock = threading.Lock()


def build_context(settings: Settings, publisher: Publisher, **overrides: Any) -> WorkerContext:
    for path in settings.local_paths():
        path.mkdir(parents=True, exist_ok=True)
    engine = overrides.get("engine") or get_engine(settings)
    storage = overrides.get("storage") or make_storage(settings)
    host = worker_identity()
    models = ModelCache(
        engine,
        storage,
        settings.model_cache_dir,
        device=settings.device,
        memory_bytes=settings.worker_model_memory_mb * 2**20,
        precision=settings.precision,
    )
    heartbeat = Heartbeat(
        engine,
        settings.job_lease_seconds,
        models=models.held,
        precision=lambda: models.running_precision,
    )
    models.on_load = heartbeat.announce
    return WorkerContext(
        settings=settings,
        engine=engine,
        storage=storage,
        models=models,
        heartbeat=heartbeat,
        watchdog=overrides.get("watchdog")
        or Watchdog(settings.worker_hang_grace_seconds, settings.worker_liveness_file),
        publisher=publisher,
        host=host,
        affinity=Affinity(settings.model_affinity_wait_seconds),
    )


def get_context() -> WorkerContext:
    """The process-wide context of a Celery worker. Its publisher is a Celery app of its own,
    built by ``core.queue.broker``, so this module never imports the tasks in ``worker.app``."""
    global _context
    with _lock:
        if _context is None:
            from core.queue.broker import CeleryPublisher, make_celery

            settings = Settings.from_env()
            _context = build_context(settings, CeleryPublisher(make_celery(settings)))
        return _context
