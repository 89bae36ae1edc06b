"""Job events and webhook deliveries written by triggers, in the transaction of the change."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus
from core.db.models import JobEvent, WebhookDelivery
from tests.core.test_db import new_job


def _set(session: Session, job_id: uuid.UUID, **values: Any) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


def test_every_status_change_progress_step_and_preview_is_an_event_in_order(
    engine: Engine,
) -> None:
    with Session(engine) as session:
        job = new_job(owner="token:7")
        session.add(job)
        session.commit()
        _set(session, job.id, status=JobStatus.RUNNING)
        _set(session, job.id, progress_step=1)
        _set(session, job.id, preview_key="previews/x/1.png")
        _set(session, job.id, progress_step=2)
        _set(session, job.id, progress_step=2)  # no change: no event
        _set(session, job.id, status=JobStatus.SUCCEEDED, progress_step=4, preview_key=None)
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
        ).all()
        assert [(e.kind, e.status, e.step) for e in rows] == [
            ("status", "queued", 0),
            ("status", "running", 0),
            ("progress", "running", 1),
            ("preview", "running", 1),
            ("progress", "running", 2),
            ("status", "succeeded", 4),
        ]
        assert all(e.at is not None and e.at.tzinfo is not None for e in rows)
        # No webhook URL: no deliveries.
        assert session.scalars(select(WebhookDelivery)).all() == []


def test_webhook_deliveries_follow_the_filter_and_a_retried_start_is_one_message(
    engine: Engine,
) -> None:
    with Session(engine) as session:
        every = new_job(owner="token:7", webhook_url="https://example.com/hook")
        only_end = new_job(
            owner="token:7",
            webhook_url="https://example.com/end",
            webhook_events=["completed", "failed"],
        )
        session.add_all([every, only_end])
        session.commit()
        for job in (every, only_end):
            _set(session, job.id, status=JobStatus.RUNNING)
            _set(session, job.id, status=JobStatus.QUEUED)  # a lost worker: re-queued
            _set(session, job.id, status=JobStatus.RUNNING)
            _set(session, job.id, status=JobStatus.FAILED)
        rows = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        got = [(r.job_id, r.event, r.url, r.state, r.owner) for r in rows]
        assert got == [
            (every.id, "start", "https://example.com/hook", "pending", "token:7"),
            (every.id, "failed", "https://example.com/hook", "pending", "token:7"),
            (only_end.id, "failed", "https://example.com/end", "pending", "token:7"),
        ]
        ids = [r.message_id for r in rows]
        assert len(set(ids)) == 3 and all(i.startswith("msg_") for i in ids)
        assert ids[0] == f"msg_{every.id.hex}_start"
        assert all(r.next_attempt_at is not None and r.attempts == 0 for r in rows)


def test_a_rolled_back_change_leaves_no_event_and_no_delivery(engine: Engine) -> None:
    with Session(engine) as session:
        job = new_job(owner="token:7", webhook_url="https://example.com/hook")
        session.add(job)
        session.commit()
        session.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.CANCELED))
        session.rollback()
        assert session.scalars(select(WebhookDelivery)).all() == []
        kinds = session.scalars(select(JobEvent.status).where(JobEvent.job_id == job.id)).all()
        assert kinds == ["queued"]
