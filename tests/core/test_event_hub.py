"""The job-event nudge on Redis pub/sub (core/queue/notify.py) and the event hub that listens for
it (core/queue/event_hub.py), on fakeredis (tests/fake_redis.py). Their twin against the real
Redis, which CI requires, is tests/web/test_events.py::
test_a_notification_on_redis_wakes_the_stream_before_the_fallback_poll."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from core.db import JobStatus, session_scope, transition_job
from core.queue.event_hub import EventHub
from core.queue.notify import CHANNEL, notify, redis_url
from core.runtime.settings import Settings
from core.services.jobs import JobRequest, submit_job
from tests.fake_redis import FakeRedis, serve_fake_redis

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def next_message(pubsub: Any, timeout: float = 2.0) -> Any:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        message = pubsub.get_message(timeout=0.05)
        if message is not None:
            return message
    return None


def wait_for(condition: Any, timeout: float = 2.0) -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.01)


def listeners(fake: FakeRedis) -> int:
    return int(dict(fake.client.pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0))


def test_notify_publishes_the_job_ids_after_the_commit(fake_redis: FakeRedis) -> None:
    settings = Settings.from_env({}, broker_url=fake_redis.url)
    assert redis_url(settings) == fake_redis.url
    pubsub = fake_redis.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    ids = [uuid.uuid4(), uuid.uuid4()]
    notify(settings, ids)
    message = next_message(pubsub)
    assert message is not None and message["data"] == f"{ids[0]},{ids[1]}".encode()
    notify(settings, [])  # nothing to say: nothing sent
    assert next_message(pubsub, timeout=0.2) is None


@SQLITE
def test_a_notification_wakes_the_hub_before_its_fallback_poll(
    fake_redis: FakeRedis, engine: Engine
) -> None:
    """The hub SUBSCRIBEs on the broker's Redis; a worker's notify() wakes the stream of that
    job at once, with no job_events row to find, not at the fallback poll 5 s later."""
    hub = EventHub(engine, fake_redis.url, fallback_poll_seconds=5.0)
    job_id = uuid.uuid4()
    sub = hub.subscribe(job_id, "token:1")
    other = hub.subscribe(uuid.uuid4(), "token:1")
    try:
        wait_for(lambda: listeners(fake_redis) == 1)
        started = time.monotonic()
        notify(Settings.from_env({}, broker_url=fake_redis.url), [job_id])
        assert sub.wait(2.0)
        assert time.monotonic() - started < 1.0
        assert not other.wait(0)  # only that job's streams
    finally:
        hub.close()


@SQLITE
def test_when_redis_goes_away_the_hub_polls_the_database(engine: Engine) -> None:
    """A lost subscription is not a lost event: the hub goes back to polling job_events. (No
    twin on the real Redis: it would have to stop the Redis every test shares.)"""
    with session_scope(engine) as session:
        job, _ = submit_job(
            session, JobRequest(prompt="a blue square"), "token:1", Settings.from_env({})
        )
        job_id = job.id
    with serve_fake_redis() as fake:
        hub = EventHub(engine, fake.url, poll_seconds=0.05, fallback_poll_seconds=5.0)
        sub = hub.subscribe(job_id, "token:1")
        wait_for(lambda: listeners(fake) == 1)
    try:
        # Polling now: the first scan looks back, and finds the job's insert...
        assert sub.wait(3.0)
        with session_scope(engine) as session:
            assert transition_job(session, job_id, JobStatus.CANCELED)
        # ...and a later one its change, sooner than a live subscription's 5 s fallback poll.
        assert sub.wait(3.0)
    finally:
        hub.close()
