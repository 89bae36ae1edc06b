"""The broker as every process sees it: one Celery app factory and one publisher.

The workers run the app :func:`make_celery` builds; the web app, the reaper and a worker's own
re-queues send through :class:`CeleryPublisher`, by task name, so none of them imports the tasks.
Celery and kombu are imported inside the functions: ``core`` loads without them, and a process
that never touches the broker (``dq token``, ``dq serve``) never pays for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.queue.dispatch import celery_config
from core.runtime.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

# How long a health check or a depth query waits for the broker: a scrape or a relay pass must
# not hang on a broker that does not answer.
BROKER_TIMEOUT_SECONDS = 3.0


def make_celery(settings: Settings, *, set_as_current: bool = False) -> Celery:
    """A Celery app on the settings' broker, configured as
    :func:`core.queue.dispatch.celery_config`.

    Only the worker's own app (``worker.app``) becomes Celery's current app; one built to
    publish must not displace it in a worker process.
    """
    from celery import Celery

    if settings.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport polls the table once a second by default and hands its
        # transport options to create_engine, so the interval can only be set on the class.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = 0.05
    app = Celery("diffusion-queue", set_as_current=set_as_current)
    app.conf.update(celery_config(settings))
    return app


class CeleryPublisher:
    """The :class:`core.queue.dispatch.Publisher` of every process: ``send_task`` by name."""

    def __init__(self, app: Celery):
        self.app = app

    @classmethod
    def from_settings(cls, settings: Settings) -> CeleryPublisher:
        return cls(make_celery(settings))

    def publish(
        self, task: str, queue: str, kwargs: dict[str, Any], countdown: float | None = None
    ) -> None:
        """Send one message. One quick retry covers a pooled connection that the broker closed
        (a restart); past that the error propagates and the outbox relay sends it later."""
        self.app.send_task(
            task,
            kwargs=kwargs,
            queue=queue,
            countdown=countdown,
            retry=True,
            retry_policy={
                "max_retries": 1,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.2,
            },
        )

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``; None only when the broker cannot be asked.

        A queue the broker does not know counts as empty: Redis deletes a list with its last
        message, and forgets every list when it restarts without persistence. The relay reads
        0 as "every queued job may have lost its message", so the two cases must agree.
        """
        from kombu.exceptions import ChannelError

        try:
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(
                    max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS
                )
                _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
                return int(count)
        except ChannelError as e:
            if "NOT_FOUND" in str(e) or getattr(e, "code", None) == 404:
                return 0
            return None
        except Exception:  # the broker is down or does not answer: we cannot tell
            return None

    def check(self) -> None:
        """Raise when the broker cannot be reached (for /readyz/dependencies)."""
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS)
