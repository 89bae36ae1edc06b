"""The outbox relay and reaper (core/dispatch.py), with a recording publisher, on SQLite and
PostgreSQL; and the Celery configuration every process shares."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus, TrainingRun, session_scope, transition_job, utcnow
from core.dispatch import celery_config, publish_job, relay_once
from core.jobs import JobRequest, submit_job
from core.settings import Settings

SETTINGS = Settings.from_env({}, job_max_attempts=2)


class Recorder:
    def __init__(self, depth: int | None = 0, fail: bool = False):
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.depth = depth
        self.fail = fail

    def publish(
        self, task: str, queue: str, kwargs: dict[str, Any], countdown: float | None = None
    ) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((task, queue, kwargs))

    def queue_depth(self, queue: str) -> int | None:
        return self.depth


def new_job(engine: Engine) -> uuid.UUID:
    with session_scope(engine) as s:
        job, _ = submit_job(s, JobRequest(prompt="a blue square"), "token:1", SETTINGS)
        return job.id


def job(engine: Engine, job_id: uuid.UUID) -> Job:
    with Session(engine) as s:
        got = s.get(Job, job_id)
        assert got is not None
        return got


def test_publish_sends_once_and_stamps_the_job(engine: Engine) -> None:
    job_id = new_job(engine)
    rec = Recorder()
    assert publish_job(engine, rec, job_id)
    assert not publish_job(engine, rec, job_id)  # already published
    assert rec.sent == [("dq.generate", "generate", {"job_id": str(job_id)})]
    assert job(engine, job_id).published_at is not None


def test_a_job_committed_while_the_broker_is_down_is_published_by_the_relay(engine: Engine) -> None:
    job_id = new_job(engine)
    with pytest.raises(ConnectionError):
        publish_job(engine, Recorder(fail=True), job_id)
    assert job(engine, job_id).published_at is None  # the stamp rolled back with the send
    down = relay_once(engine, Recorder(fail=True), SETTINGS)
    assert down.errors and not down.published
    rec = Recorder(depth=1)
    report = relay_once(engine, rec, SETTINGS)
    assert report.published == [job_id] and rec.sent[0][2] == {"job_id": str(job_id)}
    assert relay_once(engine, rec, SETTINGS).published == []  # nothing left to send


def test_expired_leases_are_requeued_then_failed_after_the_last_attempt(engine: Engine) -> None:
    job_id = new_job(engine)
    rec = Recorder(depth=1)
    relay_once(engine, rec, SETTINGS)
    for attempt in (1, 2):
        with session_scope(engine) as s:
            assert transition_job(s, job_id, JobStatus.RUNNING, attempts=attempt,
                                  lease_expires_at=utcnow() + timedelta(seconds=30))  # fmt: skip
        assert not relay_once(engine, rec, SETTINGS).requeued  # the lease is still good
        later = utcnow() + timedelta(minutes=1)
        report = relay_once(engine, rec, SETTINGS, now=later)
        if attempt == 1:
            assert report.requeued == [job_id] and report.published == [job_id]
            assert job(engine, job_id).status is JobStatus.QUEUED
        else:
            assert report.failed == [job_id]
            got = job(engine, job_id)
            assert got.status is JobStatus.FAILED
            assert got.error == (
                "the worker running this job stopped responding (2 of 2 attempts used); giving up"
            )


def test_queued_jobs_whose_message_was_lost_are_republished(engine: Engine) -> None:
    job_id = new_job(engine)
    relay_once(engine, Recorder(depth=1), SETTINGS)
    soon = utcnow() + timedelta(seconds=30)
    busy = Recorder(depth=5)  # messages are waiting: no reason to think this one was lost
    assert relay_once(engine, busy, SETTINGS, now=soon).republished == []
    empty = Recorder(depth=0)  # the broker restarted empty
    assert relay_once(engine, empty, SETTINGS, now=soon).republished == [job_id]
    assert empty.sent == [("dq.generate", "generate", {"job_id": str(job_id)})]


def test_training_runs_go_through_the_same_relay(engine: Engine) -> None:
    from core.training_runs import submit_training_run

    with session_scope(engine) as s:
        run = submit_training_run(s, SETTINGS, kind="autoencoder", dataset={"kind": "shapes"},
                                  created_by="token:9")  # fmt: skip
        run_id = run.id
    rec = Recorder(depth=1)
    assert relay_once(engine, rec, SETTINGS).published == [run_id]
    assert rec.sent == [("dq.train", "train", {"run_id": str(run_id)})]
    with Session(engine) as s:
        got = s.get(TrainingRun, run_id)
        assert got is not None and got.total_steps == 1200  # configs/autoencoder.toml


def test_celery_accepts_json_only_and_acks_late() -> None:
    redis = celery_config(Settings.from_env({"DQ_BROKER_URL": "redis://h:6379/0"}))
    assert redis["accept_content"] == ["json"] and redis["task_serializer"] == "json"
    assert redis["task_acks_late"] and redis["task_reject_on_worker_lost"]
    assert redis["worker_prefetch_multiplier"] == 1
    s = Settings.from_env({})
    limit = max(s.job_time_limit_seconds, s.train_time_limit_seconds)
    assert redis["broker_transport_options"]["visibility_timeout"] > limit
    assert redis["task_routes"]["dq.train"] == {"queue": "train"}
    # kombu's SQLAlchemy transport hands its options to create_engine: it must get none.
    assert celery_config(Settings.from_env({}))["broker_transport_options"] == {}
