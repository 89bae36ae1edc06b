"""The outbox relay and reaper (core/queue/dispatch.py), with a recording publisher, on SQLite and
PostgreSQL, and with the real publisher on Redis and on fakeredis; and the Celery configuration
every process shares."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus, TrainingRun, session_scope, transition_job, utcnow
from core.db.transitions import Lease, db_now, transition, update_held
from core.queue.dispatch import (
    REPUBLISH_WHEN_MISSING,
    REPUBLISH_WHEN_QUEUE_EMPTY,
    RelayReport,
    celery_config,
    publish_job,
    relay_once,
)
from core.runtime.settings import Settings
from core.services.jobs import JobRequest, submit_job
from tests.fake_redis import FakeRedis
from tests.services import REDIS_URL, empty_redis

SETTINGS = Settings.from_env({}, job_max_attempts=2, max_active_jobs_per_owner=1000)


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


class Queue(Recorder):
    """A broker queue that nobody consumes: its depth is the number of messages sent to it."""

    def queue_depth(self, queue: str) -> int | None:
        return sum(1 for _, q, _ in self.sent if q == queue)


def new_job(engine: Engine) -> uuid.UUID:
    return new_jobs(engine, 1)[0]


def new_jobs(engine: Engine, n: int) -> list[uuid.UUID]:
    """``n`` committed, queued jobs whose messages are still to be sent."""
    with session_scope(engine) as s:
        jobs = [submit_job(s, JobRequest(prompt="a blue square"), "token:1", SETTINGS)[0]
                for _ in range(n)]  # fmt: skip
        s.flush()
        return [job.id for job in jobs]


def cycles(n: int) -> list[datetime]:
    """The clock of ``n`` relay passes, each past every re-publishing delay since the last."""
    step = max(REPUBLISH_WHEN_MISSING, REPUBLISH_WHEN_QUEUE_EMPTY) + timedelta(minutes=1)
    start = utcnow()
    return [start + i * step for i in range(n)]


def job_ids_in(redis: Any, queue: str = "generate") -> list[str]:
    """The job ids of the Celery messages in ``queue``'s Redis list, newest first (LPUSH)."""
    bodies = (json.loads(m)["body"] for m in redis.lrange(queue, 0, -1))
    return [json.loads(base64.b64decode(b))[1]["job_id"] for b in bodies]


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
    """Leases expire by the database's clock: a reaper whose own clock runs ahead (``now``)
    re-queues nothing early."""
    job_id = new_job(engine)
    rec = Recorder(depth=1)
    relay_once(engine, rec, SETTINGS)
    for attempt in (1, 2):
        with session_scope(engine) as s:
            assert transition_job(s, job_id, JobStatus.RUNNING, attempts=attempt,
                                  lease_expires_at=db_now(30), deadline_at=db_now(600))  # fmt: skip
        skewed = utcnow() + timedelta(minutes=5)  # this reaper's clock is 5 minutes fast
        assert not relay_once(engine, rec, SETTINGS, now=skewed).requeued  # still good
        with session_scope(engine) as s:  # 30 s pass on the database's clock
            assert update_held(s, Lease(Job, job_id, attempt), lease_expires_at=db_now(-1))
        report = relay_once(engine, rec, SETTINGS)
        if attempt == 1:
            assert report.requeued == [job_id] and report.published == [job_id]
            got = job(engine, job_id)
            assert got.status is JobStatus.QUEUED
            assert (got.progress_step, got.lease_expires_at, got.deadline_at) == (0, None, None)
        else:
            assert report.failed == [job_id]
            got = job(engine, job_id)
            assert got.status is JobStatus.FAILED
            assert got.error == (
                "the worker running this job stopped responding (2 of 2 attempts used); giving up"
            )


def test_a_job_past_its_deadline_is_failed_naming_the_limit_and_a_run_is_requeued(
    engine: Engine,
) -> None:
    from core.db import ModelKind

    job_id = new_job(engine)
    with session_scope(engine) as s:
        run = TrainingRun(kind=ModelKind.AUTOENCODER, created_by="token:1", total_steps=10)
        s.add(run)
        s.flush()
        run_id = run.id
    relay_once(engine, Recorder(depth=2), SETTINGS)
    with session_scope(engine) as s:
        for model, row_id in ((Job, job_id), (TrainingRun, run_id)):
            # Claimed 30 s ago with a 20 s limit: the heartbeat stopped renewing at the deadline.
            assert transition(s, model, row_id, JobStatus.RUNNING, attempts=1,
                              started_at=db_now(-30), deadline_at=db_now(-10),
                              lease_expires_at=db_now(-5))  # fmt: skip
    report = relay_once(engine, Recorder(depth=2), SETTINGS)
    assert report.failed == [job_id] and report.requeued == [run_id]
    got = job(engine, job_id)
    assert (got.status, got.error) == (JobStatus.FAILED, "ran past the 20 s time limit")
    with Session(engine) as s:
        again = s.get(TrainingRun, run_id)
        assert again is not None and again.status is JobStatus.QUEUED


def test_a_renewal_past_the_deadline_is_refused_and_a_stale_token_is_lost(engine: Engine) -> None:
    from core.db.transitions import renew, requeue

    job_id = new_job(engine)
    with session_scope(engine) as s:
        assert transition_job(s, job_id, JobStatus.RUNNING, attempts=1,
                              lease_expires_at=db_now(5), deadline_at=db_now(60))  # fmt: skip
        lease = Lease(Job, job_id, 1)
        assert renew(s, lease, 5) is True
        assert update_held(s, lease, deadline_at=db_now(-1))
        assert renew(s, lease, 5) is None  # held, but past its deadline: not renewed
        assert requeue(s, lease)
        assert transition_job(s, job_id, JobStatus.RUNNING, attempts=2)  # another claim
        assert renew(s, lease, 5) is False  # the first claim's token is stale
        assert not update_held(s, lease, progress_step=7)
        assert update_held(s, Lease(Job, job_id, 2), progress_step=7)


def test_queued_jobs_whose_message_was_lost_are_republished(engine: Engine) -> None:
    job_id = new_job(engine)
    relay_once(engine, Recorder(depth=1), SETTINGS)
    soon = utcnow() + timedelta(seconds=30)
    busy = Recorder(depth=5)  # messages are waiting: no reason to think this one was lost
    assert relay_once(engine, busy, SETTINGS, now=soon).republished == []
    empty = Recorder(depth=0)  # the broker restarted empty
    assert relay_once(engine, empty, SETTINGS, now=soon).republished == [job_id]
    assert empty.sent == [("dq.generate", "generate", {"job_id": str(job_id)})]


def test_500_waiting_jobs_over_5_relay_cycles_leave_at_most_500_messages(engine: Engine) -> None:
    ids = new_jobs(engine, 500)
    queue = Queue()
    for i, now in enumerate(cycles(5)):
        report = relay_once(engine, queue, SETTINGS, now=now)
        assert len(report.published) == (500 if i == 0 else 0)
        assert report.republished == []
    assert len(queue.sent) == 500  # one message per job, however long they wait
    assert sorted(kwargs["job_id"] for _, _, kwargs in queue.sent) == sorted(map(str, ids))


def test_a_busy_queue_short_of_messages_gets_the_oldest_ones_back(engine: Engine) -> None:
    new_jobs(engine, 10)
    first = Recorder(depth=10)
    relay_once(engine, first, SETTINGS)
    ids = [uuid.UUID(kwargs["job_id"]) for _, _, kwargs in first.sent]  # in order of stamps
    short = Recorder(depth=3)  # e.g. Redis restarted empty, then three new jobs were sent
    soon = utcnow() + timedelta(seconds=30)
    # A message out of the list for a few seconds may just be on its way to a worker.
    assert relay_once(engine, short, SETTINGS, now=soon).republished == []
    later = utcnow() + REPUBLISH_WHEN_MISSING + timedelta(seconds=1)
    report = relay_once(engine, short, SETTINGS, now=later)
    assert report.republished == ids[:7]  # as many as are missing, oldest stamp first
    assert [kwargs["job_id"] for _, _, kwargs in short.sent] == [str(i) for i in ids[:7]]
    full = Recorder(depth=10)
    assert relay_once(engine, full, SETTINGS, now=later + REPUBLISH_WHEN_MISSING).republished == []


def test_nothing_is_republished_when_the_broker_cannot_tell_its_depth(engine: Engine) -> None:
    new_jobs(engine, 3)
    relay_once(engine, Recorder(depth=3), SETTINGS)
    unknown = Recorder(depth=None)
    assert relay_once(engine, unknown, SETTINGS, now=utcnow() + timedelta(days=1)) == RelayReport()
    assert unknown.sent == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_redis_holds_one_message_per_waiting_job_and_gets_them_back_once_flushed(
    engine: Engine,
) -> None:
    from core.queue.broker import CeleryPublisher

    settings = Settings.from_env({}, job_max_attempts=2, broker_url=REDIS_URL)
    publisher = CeleryPublisher.from_settings(settings)
    with empty_redis() as redis:

        def queued_ids() -> list[str]:
            return sorted(job_ids_in(redis))

        ids = sorted(map(str, new_jobs(engine, 500)))
        clock = cycles(7)
        for now in clock[:5]:
            relay_once(engine, publisher, settings, now=now)
            assert redis.llen("generate") == 500
        assert queued_ids() == ids  # every job has a message, and only one

        redis.flushdb()  # Redis restarted without persistence: the queue is forgotten
        assert publisher.queue_depth("generate") == 0
        report = relay_once(engine, publisher, settings, now=clock[5])
        assert sorted(map(str, report.republished)) == ids
        assert queued_ids() == ids
        assert relay_once(engine, publisher, settings, now=clock[6]).republished == []
        assert redis.llen("generate") == 500


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fakeredis_holds_one_message_per_waiting_job_and_gets_them_back_once_flushed(
    fake_redis: FakeRedis, engine: Engine
) -> None:
    """The fast twin of test_redis_holds_one_message_per_waiting_job_and_gets_them_back_once_flushed
    above: the real publisher, its broker on fakeredis, and fewer jobs."""
    from core.queue.broker import CeleryPublisher

    settings = Settings.from_env({}, job_max_attempts=2, broker_url=fake_redis.url)
    publisher = CeleryPublisher.from_settings(settings)
    redis = fake_redis.client
    ids = sorted(map(str, new_jobs(engine, 50)))
    clock = cycles(7)
    for now in clock[:5]:
        relay_once(engine, publisher, settings, now=now)
        assert redis.llen("generate") == 50
    assert sorted(job_ids_in(redis)) == ids  # every job has a message, and only one

    redis.flushall()  # Redis restarted without persistence: the queue is forgotten
    assert publisher.queue_depth("generate") == 0
    report = relay_once(engine, publisher, settings, now=clock[5])
    assert sorted(map(str, report.republished)) == ids
    assert sorted(job_ids_in(redis)) == ids
    assert relay_once(engine, publisher, settings, now=clock[6]).republished == []
    assert redis.llen("generate") == 50


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("length", [0, 1, 6, 10, 13])
def test_the_relay_sends_again_as_many_messages_as_the_redis_list_lacks(
    fake_redis: FakeRedis, engine: Engine, length: int
) -> None:
    """The depth the relay reads is the length of the queue's Redis list (kombu's LLEN): with
    ``length`` of 10 messages left, the 10 - ``length`` oldest jobs are sent again, and a list
    holding more than 10 gets nothing. The fast twin, over lists of given lengths, of
    test_redis_holds_one_message_per_waiting_job_and_gets_them_back_once_flushed (real Redis)
    and of test_a_busy_queue_short_of_messages_gets_the_oldest_ones_back (a recorded depth)."""
    from core.queue.broker import CeleryPublisher

    settings = Settings.from_env({}, job_max_attempts=2, broker_url=fake_redis.url)
    publisher = CeleryPublisher.from_settings(settings)
    redis = fake_redis.client
    new_jobs(engine, 10)
    start, later = cycles(2)
    assert len(relay_once(engine, publisher, settings, now=start).published) == 10
    oldest_first = job_ids_in(redis)[::-1]
    if length == 0:  # Redis deletes a list with its last message
        redis.delete("generate")
    elif length < 10:  # the broker lost the oldest messages
        redis.ltrim("generate", 0, length - 1)
    elif length > 10:  # duplicates of some messages are waiting too
        redis.rpush("generate", *redis.lrange("generate", 0, length - 11))
    assert redis.llen("generate") == length
    assert publisher.queue_depth("generate") == length

    report = relay_once(engine, publisher, settings, now=later)
    missing = oldest_first[: max(0, 10 - length)]
    assert [str(job_id) for job_id in report.republished] == missing
    assert redis.llen("generate") == max(10, length)
    assert sorted(set(job_ids_in(redis))) == sorted(oldest_first)
    assert relay_once(engine, publisher, settings, now=later).republished == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_reaper_sends_again_the_message_of_a_job_the_broker_forgot(
    fake_redis: FakeRedis, db_url: str, engine: Engine
) -> None:
    """One pass of ``dq reaper`` (run_reaper), its broker on fakeredis. The fast twin of
    tests/worker/test_generation_inprocess.py::
    test_a_job_lost_when_the_broker_restarted_empty_is_republished_and_runs, which runs the job
    on a worker over the real Redis."""
    from core.queue.broker import CeleryPublisher
    from core.upkeep.reaper import run_reaper

    settings = Settings.from_env({}, database_url=db_url, broker_url=fake_redis.url)
    job_id = new_job(engine)
    assert publish_job(engine, CeleryPublisher.from_settings(settings), job_id)
    assert job_ids_in(fake_redis.client) == [str(job_id)]
    fake_redis.client.flushall()  # Redis restarts and comes back empty
    with session_scope(engine) as s:  # ... a while after the message went out
        sent = s.get(Job, job_id)
        assert sent is not None and sent.published_at is not None
        sent.published_at -= REPUBLISH_WHEN_QUEUE_EMPTY + timedelta(seconds=1)
    run_reaper(settings, once=True)
    assert job_ids_in(fake_redis.client) == [str(job_id)]
    run_reaper(settings, once=True)  # the message is there again: nothing more is sent
    assert job_ids_in(fake_redis.client) == [str(job_id)]


def test_training_runs_go_through_the_same_relay(engine: Engine) -> None:
    from core.services.training_runs import submit_training_run

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
