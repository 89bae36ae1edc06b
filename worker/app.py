"""The Celery app of ``celery -A worker.app worker`` (``dq worker`` wraps it).

It is built by ``core.queue.broker.make_celery``, as every process's publisher is, with the
configuration of ``core.queue.dispatch.celery_config``: JSON only, late acks, a lost worker's
message re-queued, prefetch of one, and a visibility timeout longer than any task's time limit. The
tasks live in ``worker.tasks``.

Importing this module builds nothing: the app is made on first access to ``worker.app.app``
(which is what ``celery -A worker.app`` does), or by :func:`create_app`.

Time limits are enforced by each worker process's watchdog (``worker.watchdog``), under the solo
pool that ``dq worker`` runs and under prefork alike. Celery's own hard limit, which only prefork
honours, is set past the watchdog's, as a last resort.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_ready,
)

from core.queue.broker import make_celery
from core.queue.dispatch import TASK_GENERATE, TASK_TRAIN
from core.runtime.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("worker")

_app: Celery | None = None
_json_logs: list[bool] = []  # DQ_LOG_FORMAT=json, as the app was built with


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_log_lines(logger: logging.Logger, **_: object) -> None:
    # Celery installs its own handlers on the root and task loggers; give them our JSON lines.
    if _json_logs:
        from core.runtime.logs import restyle_handlers

        restyle_handlers(logger, "json")


def create_app(settings: Settings) -> Celery:
    import worker.tasks  # noqa: F401  (registers the shared tasks with the apps to come)

    app = make_celery(settings, set_as_current=True)
    if settings.log_format == "json":
        _json_logs.append(True)
    backstop = settings.worker_hang_grace_seconds + 60
    app.conf.update(
        include=["worker.tasks"],
        task_annotations={
            TASK_GENERATE: {"time_limit": settings.job_time_limit_seconds + backstop},
            TASK_TRAIN: {"time_limit": settings.train_time_limit_seconds + backstop},
        },
    )
    return app


def __getattr__(name: str) -> Any:
    global _app
    if name == "app":
        if _app is None:
            _app = create_app(Settings.from_env())
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must not share the parent's database connections.
    from core.db.session import dispose_engines

    dispose_engines()


@worker_ready.connect
def _start_watchdog(**_: object) -> None:
    # From the start, not from the first task: the liveness file tells an orchestrator that the
    # worker came up.
    from worker.context import get_context

    get_context().watchdog.start()
