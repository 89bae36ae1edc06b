"""The web app's side of the broker: send task messages by name, never importing ``worker``.

:class:`CeleryPublisher` is the :class:`core.dispatch.Publisher` the app uses unless a test
passes another one to :func:`web.create_app`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.dispatch import celery_config
from core.settings import Settings


class CeleryPublisher:
    """Publishes through a Celery app configured exactly as the workers' (same routes, JSON)."""

    def __init__(self, settings: Settings):
        self.app = Celery("dq-web", config_source=celery_config(settings), set_as_current=False)

    def publish(
        self, task: str, queue: str, kwargs: dict[str, Any], countdown: float | None = None
    ) -> None:
        self.app.send_task(task, kwargs=kwargs, queue=queue, countdown=countdown)

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``; None when the broker cannot be asked."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
                declared = conn.default_channel.queue_declare(queue=queue, passive=True)
                return int(declared.message_count)
        except Exception:  # an absent queue or a broker that is down: we cannot tell
            return None

    def check(self) -> None:
        """Raise when the broker cannot be reached (for /readyz)."""
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
