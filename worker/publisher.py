"""The worker side's :class:`core.dispatch.Publisher`: Celery's ``send_task`` by name."""

from __future__ import annotations

from typing import Any

from celery import Celery


class CeleryPublisher:
    def __init__(self, app: Celery):
        self.app = app

    def publish(
        self, task: str, queue: str, kwargs: dict[str, Any], countdown: float | None = None
    ) -> None:
        self.app.send_task(task, kwargs=kwargs, queue=queue, countdown=countdown, retry=False)

    def queue_depth(self, queue: str) -> int | None:
        from kombu.exceptions import ChannelError

        try:
            with self.app.connection_for_read() as conn:
                _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
                return int(count)
        except ChannelError as e:
            # Redis forgets a queue with its last message (and after a restart without
            # persistence): no queue means no messages.
            return 0 if "NOT_FOUND" in str(e) else None
        except Exception:
            return None
