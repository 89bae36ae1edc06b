"""The Celery publisher against a real Redis broker: a submitted job's message lands in the
``generate`` queue, by task name."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from core.db import Job, session_scope
from core.queue.dispatch import TASK_GENERATE
from tests.services import REDIS_URL, empty_redis
from tests.web.conftest import bearer, make_settings


@pytest.fixture
def redis_broker() -> Iterator[Any]:
    with empty_redis() as client:
        yield REDIS_URL, client


def test_submitted_job_lands_in_the_generate_queue(
    redis_broker: Any, db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from web import create_app

    url, redis_client = redis_broker
    app = create_app(make_settings(db_url, tmp_path, broker_url=url))
    r = app.test_client().post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token))
    assert r.status_code == 202
    job_id = r.get_json()["id"]
    assert redis_client.llen("generate") == 1
    message = json.loads(redis_client.lindex("generate", 0))
    assert message["headers"]["task"] == TASK_GENERATE
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [] and kwargs == {"job_id": job_id}
    with session_scope(engine) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None and job.published_at is not None
    publisher = app.extensions["dq"].publisher
    assert publisher.queue_depth("generate") == 1
    # Redis deletes a list with its last message: a queue it forgot holds no messages.
    redis_client.delete("generate")
    assert publisher.queue_depth("generate") == 0
    publisher.check()
    assert app.test_client().get("/readyz/dependencies").get_json()["broker"]["ok"] is True


def test_an_unreachable_broker_leaves_the_job_for_the_relay(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from web import create_app

    # Nothing listens on port 1: the connection is refused at once.
    app = create_app(make_settings(db_url, tmp_path, broker_url="redis://127.0.0.1:1/0"))
    r = app.test_client().post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token))
    assert r.status_code == 202
    with session_scope(engine) as session:
        job = session.get(Job, uuid.UUID(r.get_json()["id"]))
        assert job is not None and job.published_at is None
    assert app.extensions["dq"].publisher.queue_depth("generate") is None
    assert app.test_client().get("/readyz").status_code == 200  # the database answers
    deps = app.test_client().get("/readyz/dependencies")
    assert deps.status_code == 503 and deps.get_json()["broker"]["ok"] is False
