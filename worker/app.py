"""The Celery app: ``celery -A worker.app worker`` (``dq worker`` wraps it).

It is built by ``core.broker.make_celery``, as every process's publisher is, with the
configuration of ``core.dispatch.celery_config``: JSON only, late acks, a lost worker's message
re-queued, prefetch of one, and a visibility timeout longer than any task's time limit. The
tasks are thin wrappers around ``worker.generation`` and ``worker.training``.
"""

from __future__ import annotations

import logging
import uuid

from celery.signals import worker_process_init

from core.broker import make_celery
from core.dispatch import TASK_GENERATE, TASK_TRAIN
from core.settings import Settings

log = logging.getLogger("worker")

settings = Settings.from_env()
app = make_celery(settings, set_as_current=True)


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must not share the parent's database connections.
    from core.db.session import dispose_engines

    dispose_engines()


def _parse_id(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        log.error("message with a malformed id %r acknowledged and dropped", value)
        return None


@app.task(
    name=TASK_GENERATE,
    ignore_result=True,
    time_limit=settings.job_time_limit_seconds,
    soft_time_limit=max(settings.job_time_limit_seconds - 30, 1),
)
def generate(job_id: str) -> None:
    """Run one generation job, and any compatible queued jobs with it."""
    from worker.context import get_context
    from worker.generation import run_generation

    parsed = _parse_id(job_id)
    if parsed is not None:
        run_generation(get_context(), parsed)


@app.task(
    name=TASK_TRAIN,
    ignore_result=True,
    time_limit=settings.train_time_limit_seconds,
    soft_time_limit=max(settings.train_time_limit_seconds - 60, 1),
)
def train(run_id: str) -> None:
    """Run (or resume) one training run."""
    from worker.context import get_context
    from worker.training import run_training

    parsed = _parse_id(run_id)
    if parsed is not None:
        run_training(get_context(), parsed)
