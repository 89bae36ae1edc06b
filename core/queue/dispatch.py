"""Getting task messages to the broker, and getting lost work back into the queue.

The database is the outbox. A queued job or training run whose ``published_at`` is NULL has a
message still to send: :func:`publish_job` sends it right after the submitting transaction
commits, and :func:`relay_once` sends whatever is left (the broker was down, the web process died
between commit and send). The relay also

- re-queues running jobs and runs whose lease expired (their worker died), or fails them once
  they have used up their attempts;
- hands due webhook deliveries to the ``webhooks`` queue (:func:`publish_due_webhooks`);
- re-publishes queued work whose message can really be gone, and no more. The broker's queue
  should hold one message per queued item that has been published. When it is empty (Redis
  deletes a list with its last message, and forgets them all when it restarts without
  persistence) every queued item published a few seconds ago is sent again. When it holds fewer
  messages than there are such items, the difference is sent again, oldest first. When the
  broker cannot say how many it holds, nothing is. So the queue never grows with the backlog,
  and an autoscaler reading its length sees the work there is. A duplicate message is harmless:
  the worker's claim is a conditional UPDATE, so a second delivery finds the job no longer
  queued and does nothing.

Every query reads a bounded batch (``LIMIT``), and a pass sends a bounded number of messages, so
a pass stays short whatever the backlog; the next pass goes on where this one stopped.

The broker is reached through a :class:`Publisher`, so this module imports no Celery; every
process passes the one in ``core/queue/broker.py`` (tests pass fakes).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import counts
from core.db.models import Job, JobStatus, TrainingRun, WebhookDelivery, utcnow
from core.db.session import session_scope
from core.db.transitions import reap
from core.runtime.settings import Settings

log = logging.getLogger(__name__)

TASK_GENERATE = "dq.generate"
TASK_TRAIN = "dq.train"
TASK_DELIVER_WEBHOOK = "dq.deliver_webhook"
QUEUE_GENERATE = "generate"
QUEUE_TRAIN = "train"
# Webhook deliveries have a queue and workers of their own: a slow receiver never holds a GPU.
QUEUE_WEBHOOKS = "webhooks"

# A queued item whose message went out this long ago, while the broker's queue is empty, is
# published again: its message was lost.
REPUBLISH_WHEN_QUEUE_EMPTY = timedelta(seconds=10)
# With messages waiting but fewer than the published queued items, the oldest items published
# this long ago are sent again, one per missing message. A message can be out of the list for a
# while without being lost: a worker has taken it and is about to claim the job (milliseconds),
# or holds it until its countdown is due (a minute at most). One taken by a worker that died
# before claiming comes back by itself after the broker's visibility timeout, but that is hours:
# waiting for it would strand lost jobs behind a busy queue, and a duplicate costs one no-op.
REPUBLISH_WHEN_MISSING = timedelta(minutes=5)
# Rows read per query, and messages sent per queue and per reason in one pass.
RELAY_BATCH = 500
RELAY_MAX_PER_PASS = 5000
# A due webhook delivery whose message went out this long ago and was not taken up (its try
# would have pushed next_attempt_at ahead) lost its message: it is sent again.
REPUBLISH_WEBHOOK_AFTER = timedelta(minutes=2)


class Publisher(Protocol):
    """Sends task messages by name; wraps a Celery app's ``send_task``."""

    def publish(
        self, task: str, queue: str, kwargs: dict[str, Any], countdown: float | None = None
    ) -> None: ...

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``, or None when the broker cannot tell."""
        ...


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration, shared by the workers and the web app's sender."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickled message is refused, never deserialised.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        # The database, not a result backend, holds every outcome.
        "task_ignore_result": True,
        "result_backend": None,
        # A message is acknowledged only after its task ran; a lost worker's message comes back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Longer than any task's hard time limit, so Redis never hands a message that is still
        # being worked on to a second worker. (kombu's SQLAlchemy transport passes its options
        # to create_engine, so it gets none.)
        "broker_transport_options": (
            {"visibility_timeout": settings.broker_visibility_timeout}
            if settings.broker_url.startswith(("redis://", "rediss://"))
            else {}
        ),
        "task_routes": {
            TASK_GENERATE: {"queue": QUEUE_GENERATE},
            TASK_TRAIN: {"queue": QUEUE_TRAIN},
            TASK_DELIVER_WEBHOOK: {"queue": QUEUE_WEBHOOKS},
        },
        "task_default_queue": QUEUE_GENERATE,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def _publish(
    engine: Engine,
    publisher: Publisher,
    model: type[Job] | type[TrainingRun],
    row_id: uuid.UUID,
    *,
    force: bool,
    countdown: float | None = None,
    published_before: datetime | None = None,
) -> bool:
    """Stamp ``published_at``, commit, then send the message.

    The stamp is a conditional UPDATE, so of two relays only one sends. It is committed before
    the send, so no database lock is held across the network call; if the send fails, the stamp
    is taken back and the row waits for the next try. If this process dies between the two, the
    stamped row has no message: the relay re-publishes queued rows whose message seems lost.
    """
    task, queue, key = (
        (TASK_GENERATE, QUEUE_GENERATE, "job_id")
        if model is Job
        else (TASK_TRAIN, QUEUE_TRAIN, "run_id")
    )
    stamp = utcnow()
    with session_scope(engine) as session:
        where = [model.id == row_id, model.status == JobStatus.QUEUED]
        if not force:
            where.append(model.published_at.is_(None))
        elif published_before is not None:  # of two relays re-publishing, only one sends
            where.append(model.published_at < published_before)
        stamped = session.execute(
            update(model)
            .where(*where)
            .values(published_at=stamp)
            .execution_options(synchronize_session=False)
        )
        if stamped.rowcount != 1:  # type: ignore[attr-defined]
            return False
    try:
        publisher.publish(task, queue, {key: str(row_id)}, countdown=countdown)
    except BaseException:
        with session_scope(engine) as session:
            session.execute(
                update(model)
                .where(model.id == row_id, model.published_at == stamp)
                .values(published_at=None)
                .execution_options(synchronize_session=False)
            )
        raise
    return True


def publish_job(
    engine: Engine,
    publisher: Publisher,
    job_id: uuid.UUID,
    *,
    force: bool = False,
    countdown: float | None = None,
) -> bool:
    """Send the task message of a committed, queued job. Returns False when there was nothing
    to send (already published, or no longer queued). Broker errors propagate; the job stays
    queued and unpublished, and the relay sends it later."""
    return _publish(engine, publisher, Job, job_id, force=force, countdown=countdown)


def publish_run(
    engine: Engine, publisher: Publisher, run_id: uuid.UUID, *, force: bool = False
) -> bool:
    return _publish(engine, publisher, TrainingRun, run_id, force=force)


@dataclass
class RelayReport:
    published: list[uuid.UUID] = field(default_factory=list)
    republished: list[uuid.UUID] = field(default_factory=list)
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Webhook deliveries handed to the webhooks queue (not counted in bool(): the reaper's
    # summary line is about jobs and runs).
    webhooks: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.published or self.republished or self.requeued or self.failed)


def reap_expired(
    session: Session,
    model: type[Job] | type[TrainingRun],
    settings: Settings,
    now: datetime,
    report: RelayReport,
) -> None:
    """Running rows whose lease ran out by the database's clock (``now`` is not used: a
    reaper's own clock may be off): back to the queue, failed after the last attempt, or ended
    by their time limit (:func:`core.db.transitions.reap`)."""
    outcome = reap(session, model, settings.job_max_attempts)
    for row_id in outcome["requeued"]:
        log.warning("re-queued %s %s: its lease expired", model.__tablename__, row_id)
    report.requeued += outcome["requeued"]
    report.failed += outcome["failed"]


def relay_once(
    engine: Engine, publisher: Publisher, settings: Settings, now: datetime | None = None
) -> RelayReport:
    """One pass of the reaper and outbox relay; safe to run from several processes at once."""
    now = now or utcnow()
    report = RelayReport()
    with session_scope(engine) as session:
        reap_expired(session, Job, settings, now, report)
        reap_expired(session, TrainingRun, settings, now, report)
    for model, queue in ((Job, QUEUE_GENERATE), (TrainingRun, QUEUE_TRAIN)):
        if _publish_unpublished(engine, publisher, model, report) is True:
            _republish_lost(engine, publisher, model, queue, now, report)
    publish_due_webhooks(engine, publisher, now, report)
    return report


def publish_delivery(
    engine: Engine,
    publisher: Publisher,
    delivery_id: int,
    now: datetime | None = None,
    *,
    stale_before: datetime | None = None,
) -> bool:
    """Send the task message of a due, pending webhook delivery: stamp ``published_at`` with a
    conditional UPDATE (of two relays only one sends), commit, send; take the stamp back when
    the broker refuses. ``stale_before``: also re-send one stamped before then (a lost message).
    """
    now = now or utcnow()
    stamp = utcnow()
    unsent = WebhookDelivery.published_at.is_(None)
    with session_scope(engine) as session:
        stamped = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= now,
                unsent
                if stale_before is None
                else or_(unsent, WebhookDelivery.published_at < stale_before),
            )
            .values(published_at=stamp)
            .execution_options(synchronize_session=False)
        )
        if stamped.rowcount != 1:  # type: ignore[attr-defined]
            return False
    try:
        publisher.publish(TASK_DELIVER_WEBHOOK, QUEUE_WEBHOOKS, {"delivery_id": delivery_id})
    except BaseException:
        with session_scope(engine) as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.published_at == stamp)
                .values(published_at=None)
                .execution_options(synchronize_session=False)
            )
        raise
    return True


def publish_due_webhooks(
    engine: Engine, publisher: Publisher, now: datetime, report: RelayReport
) -> None:
    """Hand the webhooks queue every pending delivery that is due and has no message out: never
    sent, or a retry whose backoff is over (a failed try clears ``published_at``). Then, as for
    jobs, re-send as many due deliveries stamped long ago as the queue lacks messages for: a
    busy queue is not refilled with duplicates, an emptied one is. Bounded batches, earliest due
    first."""
    pending = [WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now]
    if not _publish_deliveries(
        engine, publisher, now, report, [*pending, WebhookDelivery.published_at.is_(None)]
    ):
        return
    stale_before = now - REPUBLISH_WEBHOOK_AFTER
    stale = [*pending, WebhookDelivery.published_at < stale_before]
    with session_scope(engine) as session:
        count = session.scalar(select(func.count()).select_from(WebhookDelivery).where(*stale))
    if not count:
        return
    try:
        depth = publisher.queue_depth(QUEUE_WEBHOOKS)
    except Exception as e:
        report.errors.append(f"queue depth of {QUEUE_WEBHOOKS}: {e}")
        return
    if depth is not None and count > depth:
        _publish_deliveries(
            engine, publisher, now, report, stale, limit=count - depth, stale_before=stale_before
        )


def _publish_deliveries(
    engine: Engine,
    publisher: Publisher,
    now: datetime,
    report: RelayReport,
    where: list[Any],
    limit: int = RELAY_MAX_PER_PASS,
    stale_before: datetime | None = None,
) -> bool:
    """Publish up to ``limit`` deliveries matching ``where``; False when the broker refused."""
    tried = 0
    limit = min(limit, RELAY_MAX_PER_PASS)
    while tried < limit:
        size = min(RELAY_BATCH, limit - tried)
        with session_scope(engine) as session:
            batch = session.scalars(
                select(WebhookDelivery.id)
                .where(*where)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(size)
            ).all()
        for delivery_id in batch:
            try:
                if publish_delivery(engine, publisher, delivery_id, now, stale_before=stale_before):
                    report.webhooks.append(delivery_id)
            except Exception as e:  # the broker is down: the next pass tries again
                report.errors.append(f"publishing webhook delivery {delivery_id}: {e}")
                return False
        tried += len(batch)
        if len(batch) < size:
            break
    return True


def _publish_unpublished(
    engine: Engine,
    publisher: Publisher,
    model: type[Job] | type[TrainingRun],
    report: RelayReport,
) -> bool | None:
    """Send the messages of queued rows that have none yet, oldest first. True when the outbox
    is empty; False when the broker refused one, None when the pass's cap left some: the rest
    wait for the next pass."""
    tried = 0
    while True:
        if tried >= RELAY_MAX_PER_PASS:
            return None
        with session_scope(engine) as session:
            batch = session.scalars(
                select(model.id)
                .where(model.status == JobStatus.QUEUED, model.published_at.is_(None))
                .order_by(model.created_at, model.id)
                .limit(RELAY_BATCH)
            ).all()
        for row_id in batch:  # each one sent leaves the outbox, so the next batch is new rows
            try:
                if _publish(engine, publisher, model, row_id, force=False):
                    report.published.append(row_id)
            except Exception as e:  # the broker is down: try again next pass
                report.errors.append(f"publishing {row_id}: {e}")
                return False
        tried += len(batch)
        if len(batch) < RELAY_BATCH:
            return True


def _republish_lost(
    engine: Engine,
    publisher: Publisher,
    model: type[Job] | type[TrainingRun],
    queue: str,
    now: datetime,
    report: RelayReport,
) -> None:
    """Send again as many queued rows as ``queue`` lacks messages for, oldest stamp first."""
    # Rows stamped from here on are not counted: their messages may or may not be in the depth
    # read next, and counting them could only make messages look missing that are not.
    started = utcnow()
    try:
        depth = publisher.queue_depth(queue)
    except Exception as e:
        report.errors.append(f"queue depth of {queue}: {e}")
        return
    if depth is None:  # the broker cannot tell what it holds: sending more could only duplicate
        return
    # The queued rows stamped before ``started``: all the queued ones (the status counts the
    # triggers keep, a few rows) less those with no stamp or a newer one, which the index on
    # (status, published_at) finds among the few the outbox has just sent. Constant in the
    # queue's depth; it runs only once the outbox is empty.
    fresh = [
        model.status == JobStatus.QUEUED,
        or_(model.published_at.is_(None), model.published_at >= started),
    ]
    with session_scope(engine) as session:
        queued = counts.read(session, counts.TABLES[model.__tablename__])[JobStatus.QUEUED.value]
        unstamped = session.scalar(select(func.count()).select_from(model).where(*fresh)) or 0
    published = queued - unstamped
    missing = min(published - depth, RELAY_MAX_PER_PASS)
    # A re-published row is stamped after ``started``, so it drops out of the next batch.
    cutoff = min(
        now - (REPUBLISH_WHEN_QUEUE_EMPTY if depth == 0 else REPUBLISH_WHEN_MISSING), started
    )
    while missing > 0:
        limit = min(missing, RELAY_BATCH)
        with session_scope(engine) as session:
            batch = session.scalars(
                select(model.id)
                .where(model.status == JobStatus.QUEUED, model.published_at < cutoff)
                .order_by(model.published_at, model.id)
                .limit(limit)
            ).all()
        for row_id in batch:
            try:
                if _publish(engine, publisher, model, row_id, force=True, published_before=cutoff):
                    report.republished.append(row_id)
            except Exception as e:
                report.errors.append(f"re-publishing {row_id}: {e}")
                return
        if len(batch) < limit:
            break
        missing -= len(batch)
