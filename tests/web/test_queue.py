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
from core.dispatch import TASK_GENERATE
from tests.services import REDIS_URL, require_redis
from tests.web.conftest import bearer, make_settings

# A database of its own on the shared Redis, flushed before and after.
BROKER_DB = 15


@pytest.fixture
def redis_broker() -> Iterator[Any]:
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + f"/{BROKER_DB}"
    require_redis(url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()


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
    publisher.check()
    assert app.test_client().get("/readyz").get_json()["checks"]["broker"] == "ok"


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
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["down"] == ["broker"]
