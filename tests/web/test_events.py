"""Live push (SSE): GET /api/v1/jobs/<id>/events and the job page's /jobs/<id>/events.

Job changes are made as the worker makes them, by UPDATEs of the jobs row: the database's
triggers write the events (core.db.events), and the app's event hub notices them."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from core.db import Job, JobStatus, session_scope
from core.db.models import JobEvent
from core.queue.event_hub import EventHub
from core.queue.notify import notify
from core.runtime.settings import Settings
from core.storage import LocalStorage
from tests.services import REDIS_URL, require_redis
from tests.web.conftest import RecordingPublisher, add_image, add_job, bearer, make_settings


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path, sse_heartbeat_seconds=0.2)


@pytest.fixture
def hub(app: Any) -> Iterator[EventHub]:
    """A hub that polls every 50 ms, so that the tests wait little."""
    svc = app.extensions["dq"]
    made = EventHub(svc.read_engine, None, poll_seconds=0.05)
    app.extensions["dq_event_hub"] = made
    yield made
    made.close()


class Stream:
    """An open event stream, read event by event as a client would."""

    def __init__(self, response: Any):
        self.response = response
        self.chunks = iter(response.response)
        self.buffer = ""
        self.ended = False
        self.comments: list[str] = []
        self.retry: int | None = None

    def next(self) -> dict[str, Any] | None:
        """The next event (comments and retry hints are collected on the side); None at the
        end of the stream."""
        while "\n\n" not in self.buffer:
            try:
                chunk = next(self.chunks)
            except StopIteration:
                self.ended = True
                return None
            self.buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        block, self.buffer = self.buffer.split("\n\n", 1)
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                self.comments.append(value)
            elif field == "retry":
                self.retry = int(value)
            elif field == "id":
                event["id"] = int(value)
            elif field == "event":
                event["event"] = value
            elif field == "data":
                event["data"] = json.loads(value)
        return event if "event" in event else self.next()

    def until(self, name: str) -> list[dict[str, Any]]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
            if event["event"] == name:
                return events
        raise AssertionError(f"the stream ended before a {name} event: {events}")

    def rest(self) -> list[dict[str, Any]]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        self.response.close()


def open_stream(
    client: FlaskClient, job_id: uuid.UUID, token: str, last: int | None = None, timeout: int = 5
) -> Stream:
    headers = bearer(token)
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    response = client.get(
        f"/api/v1/jobs/{job_id}/events?timeout={timeout}", headers=headers, buffered=False
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    return Stream(response)


def set_job(engine: Engine, job_id: uuid.UUID, **values: Any) -> None:
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def later(seconds: float, change: Any) -> threading.Thread:
    """Another thread changes the database after a while, as a worker process would."""

    def run() -> None:
        time.sleep(seconds)
        change()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def event_ids(engine: Engine, job_id: uuid.UUID) -> list[int]:
    with session_scope(engine) as session:
        return list(
            session.scalars(
                select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )


def owner_of(token: str, engine: Engine) -> str:
    from core.services.tokens import authenticate

    with session_scope(engine) as session:
        found = authenticate(session, token)
        assert found is not None
        return f"token:{found.id}"


def test_a_client_that_resumes_with_last_event_id_misses_no_event_and_gets_none_twice(
    client: FlaskClient,
    engine: Engine,
    hub: EventHub,
    user_token: str,
    storage: LocalStorage,
) -> None:
    job_id = add_job(engine, owner_of(user_token, engine))
    first = open_stream(client, job_id, user_token)
    queued = first.next()
    assert queued is not None and queued["data"]["status"] == "queued"
    set_job(engine, job_id, status=JobStatus.RUNNING)
    set_job(engine, job_id, progress_step=1)
    seen = first.until("progress")
    assert [e["data"]["status"] for e in seen] == ["running", "running"]
    first.close()  # the client goes away mid-job
    assert hub.stream_count == 0

    # While it is away: two more steps and a preview.
    set_job(engine, job_id, progress_step=2)
    set_job(engine, job_id, preview_key=f"previews/{job_id}/1.png")
    set_job(engine, job_id, progress_step=3)
    last = seen[-1]["id"]
    resumed = open_stream(client, job_id, user_token, last=last)
    replayed = resumed.until("progress")
    replayed += resumed.until("progress")
    assert [e["event"] for e in replayed] == ["progress", "preview", "progress"]
    # The newest event of the replay carries the job as it is now, preview URL and all.
    assert replayed[-1]["data"]["job"]["progress"]["preview_url"]

    add_image(engine, job_id, storage)
    later(
        0.1,
        lambda: set_job(
            engine, job_id, status=JobStatus.SUCCEEDED, progress_step=20, preview_key=None
        ),
    ).join()
    ending = resumed.rest()
    assert resumed.ended
    assert [e["event"] for e in ending] == ["completed"]
    job = ending[-1]["data"]["job"]
    assert job["status"] == "succeeded" and job["images"][0]["url"]

    received = [e["id"] for e in [queued, *seen, *replayed, *ending]]
    assert received == event_ids(engine, job_id)  # every event, once, in order


def test_a_finished_job_replays_its_events_and_closes_and_a_client_at_its_end_gets_204(
    client: FlaskClient, engine: Engine, hub: EventHub, user_token: str
) -> None:
    job_id = add_job(engine, owner_of(user_token, engine))
    set_job(engine, job_id, status=JobStatus.RUNNING)
    set_job(engine, job_id, status=JobStatus.FAILED, error="the GPU ran out of memory")
    stream = open_stream(client, job_id, user_token)
    events = stream.rest()
    assert [e["event"] for e in events] == ["status", "status", "failed"]
    assert events[-1]["data"]["job"]["error"] == "the GPU ran out of memory"
    assert stream.retry is not None and stream.retry > 0
    response = client.get(
        f"/api/v1/jobs/{job_id}/events",
        headers={**bearer(user_token), "Last-Event-ID": str(events[-1]["id"])},
    )
    assert response.status_code == 204  # EventSource stops reconnecting


def test_another_owners_job_is_404_and_no_token_is_401(
    client: FlaskClient, engine: Engine, hub: EventHub, user_token: str, other_token: str
) -> None:
    job_id = add_job(engine, owner_of(user_token, engine))
    for path in (f"/api/v1/jobs/{job_id}/events", f"/api/v1/jobs/{uuid.uuid4()}/events"):
        response = client.get(path, headers=bearer(other_token))
        assert response.status_code == 404
        assert response.mimetype == "application/problem+json"
        assert response.get_json()["status"] == 404
    assert client.get(f"/api/v1/jobs/{job_id}/events").status_code == 401
    bad = client.get(
        f"/api/v1/jobs/{job_id}/events", headers={**bearer(user_token), "Last-Event-ID": "x"}
    )
    assert bad.status_code == 422
    assert hub.stream_count == 0


def test_an_idle_stream_sends_heartbeats_and_closes_at_its_timeout(
    client: FlaskClient, engine: Engine, hub: EventHub, user_token: str
) -> None:
    job_id = add_job(engine, owner_of(user_token, engine))
    started = time.monotonic()
    stream = open_stream(client, job_id, user_token, timeout=1)
    events = stream.rest()  # DQ_SSE_HEARTBEAT_SECONDS is 0.2 here
    assert 0.9 < time.monotonic() - started < 3
    assert [e["event"] for e in events] == ["status"]
    assert stream.comments.count("keep-alive") >= 3
    assert hub.stream_count == 0


def test_changes_made_by_another_process_show_up_live(
    client: FlaskClient, engine: Engine, hub: EventHub, user_token: str
) -> None:
    job_id = add_job(engine, owner_of(user_token, engine))
    stream = open_stream(client, job_id, user_token)
    stream.next()
    changed_at: list[float] = []

    def start() -> None:
        set_job(engine, job_id, status=JobStatus.RUNNING, progress_step=0)
        changed_at.append(time.monotonic())

    later(0.3, start)
    (event,) = stream.until("status")
    latency = time.monotonic() - changed_at[0]
    assert event["data"]["status"] == "running"
    assert latency < 1.0  # the hub polls every 50 ms here
    later(0.1, lambda: set_job(engine, job_id, status=JobStatus.CANCELED))
    assert [e["event"] for e in stream.rest()] == ["canceled"]


def test_a_waiting_job_hears_when_the_queue_ahead_of_it_moves(
    client: FlaskClient,
    engine: Engine,
    hub: EventHub,
    user_token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("web.events.QUEUE_REFRESH_SECONDS", 0.1)
    owner = owner_of(user_token, engine)
    ahead = add_job(engine, owner, seconds_ago=10)
    job_id = add_job(engine, owner)
    stream = open_stream(client, job_id, user_token)
    assert stream.next()["data"]["job"]["queue_position"] == 1
    later(0.1, lambda: set_job(engine, ahead, status=JobStatus.RUNNING))
    (moved,) = stream.until("queue")
    assert "id" not in moved  # not an event of this job: never replayed
    assert moved["data"]["job"]["queue_position"] == 0
    stream.close()


def test_the_job_page_streams_with_the_browser_session_only(
    client: FlaskClient, app: Any, engine: Engine, hub: EventHub
) -> None:
    with client.session_transaction() as session:
        session["owner"] = "a" * 32
    job_id = add_job(engine, "session:" + "a" * 32)
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert f'data-events-url="/jobs/{job_id}/events"' in page
    set_job(engine, job_id, status=JobStatus.CANCELED)
    response = client.get(f"/jobs/{job_id}/events", buffered=False)
    assert response.mimetype == "text/event-stream"
    events = Stream(response).rest()
    assert [e["event"] for e in events] == ["status", "canceled"]
    stranger = app.test_client()
    assert stranger.get(f"/jobs/{job_id}/events").status_code == 404


@pytest.fixture
def redis_settings(db_url: str, tmp_path: Path) -> Settings:
    require_redis(REDIS_URL)
    return make_settings(db_url, tmp_path, broker_url=REDIS_URL)


def test_a_notification_on_redis_wakes_the_stream_before_the_fallback_poll(
    redis_settings: Settings, engine: Engine, user_token: str
) -> None:
    from web import create_app

    app = create_app(redis_settings, publisher=RecordingPublisher())
    svc = app.extensions["dq"]
    hub = EventHub(svc.read_engine, REDIS_URL, fallback_poll_seconds=5.0)
    app.extensions["dq_event_hub"] = hub
    try:
        job_id = add_job(engine, owner_of(user_token, engine))
        stream = open_stream(app.test_client(), job_id, user_token)
        stream.next()
        time.sleep(0.3)  # the hub has subscribed and is waiting on Redis
        changed_at: list[float] = []

        def start_and_notify() -> None:
            set_job(engine, job_id, status=JobStatus.RUNNING)
            changed_at.append(time.monotonic())
            notify(redis_settings, [job_id])

        later(0.2, start_and_notify)
        (event,) = stream.until("status")
        latency = time.monotonic() - changed_at[0]
        assert event["data"]["status"] == "running"
        assert latency < 1.0, latency  # the fallback poll would take up to 5 s
        stream.close()
    finally:
        hub.close()


def test_past_dq_sse_max_streams_a_stream_gets_503_and_the_threads_stay_free(
    app: Any, client: FlaskClient, engine: Engine, user_token: str
) -> None:
    svc = app.extensions["dq"]
    full = EventHub(svc.read_engine, None, poll_seconds=0.05, max_streams=1)
    app.extensions["dq_event_hub"] = full
    try:
        job_id = add_job(engine, owner_of(user_token, engine), JobStatus.QUEUED)
        held = full.subscribe(uuid.uuid4(), "token:someone")  # the one stream it may hold
        r = client.get(f"/api/v1/jobs/{job_id}/events", headers=bearer(user_token))
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.mimetype == "application/problem+json" and "poll" in r.get_json()["detail"]
        # Pages and API calls still answer while streams are refused.
        assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(user_token)).status_code == 200
        full.unsubscribe(held)
        r = client.get(
            f"/api/v1/jobs/{job_id}/events?timeout=1", headers=bearer(user_token), buffered=False
        )
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        r.close()
    finally:
        full.close()
