"""The poll's read path agrees with core, and the token cache forgets in time."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.engine import Engine

import web.token_cache
from core.db import Job, JobStatus, session_scope, utcnow
from core.services.jobs import JobNotFound, get_job, queue_position
from tests.web.conftest import add_job, add_version
from web.caller import Caller
from web.resources import _JOBS, _job_rows, job_views, load_job
from web.token_cache import TokenCache


def test_queue_positions_agree_with_core(engine: Engine) -> None:
    # a's running job was queued (and so took a's first turn) before anything else here.
    running = add_job(engine, "a", JobStatus.QUEUED, seconds_ago=40)
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == running).values(status=JobStatus.RUNNING))
    ids = [
        add_job(engine, "a", JobStatus.QUEUED, seconds_ago=50),
        running,
        add_job(engine, "b", JobStatus.QUEUED, seconds_ago=30),
        add_job(engine, "a", JobStatus.SUCCEEDED, seconds_ago=20),
        add_job(engine, "b", JobStatus.QUEUED, seconds_ago=10),
        add_job(engine, "a", JobStatus.CANCELED, seconds_ago=5),
        add_job(engine, "a", JobStatus.QUEUED, seconds_ago=1),
    ]
    with session_scope(engine) as session:
        expected = [queue_position(session, get_job(session, i, None)) for i in ids]
        got = [view.queue_position for view in job_views(session, ids)]
    # Fair share: "a" has a job running, so b's first job comes before a's first waiting one.
    assert expected == [1, None, 0, None, 2, None, 3]
    assert got == expected


def test_load_job_sees_what_get_job_sees(engine: Engine) -> None:
    version = add_version(engine, "v7")
    mine = add_job(engine, "token:1", model_version_id=version)
    with session_scope(engine) as session:
        view = load_job(session, mine, "token:1")
        assert view.job.id == mine and view.model_name == "v7"
        assert load_job(session, mine, None).job.id == mine  # an admin
        for scope in ("token:2", "session:x"):
            with pytest.raises(JobNotFound):
                get_job(session, mine, scope)
            with pytest.raises(JobNotFound):
                load_job(session, mine, scope)
        with pytest.raises(JobNotFound):
            load_job(session, uuid.uuid4(), None)


def test_job_views_keep_the_order_given_and_skip_missing(engine: Engine) -> None:
    a, b = add_job(engine, "x"), add_job(engine, "x")
    with session_scope(engine) as session:
        views = job_views(session, [b, uuid.uuid4(), a])
    assert [v.job.id for v in views] == [b, a]
    assert all(v.model_name == "default" for v in views)


def test_the_driver_level_read_gives_the_rows_sqlalchemy_gives(engine: Engine) -> None:
    # On PostgreSQL a poll reads its job's row through the driver's cursor (web.resources.
    # _job_rows): every column must come back as the SQLAlchemy statement returns it.
    version = add_version(engine, "v9")
    now = utcnow()
    ids = [
        add_job(engine, "a"),
        add_job(
            engine,
            "b",
            JobStatus.FAILED,
            latency=2.5,
            model_version_id=version,
            guidance_interval=[0.1, 0.9],
            webhook_url="https://example.com/hook",
            webhook_events=["job.succeeded"],
            error="boom",
            init_upload_id=uuid.uuid4(),
            mask_upload_id=uuid.uuid4(),
            strength=0.6,
            worker_host="w1",
            preview_key="previews/x.png",
            progress_step=7,
            fair_key=12.5,
        ),
        add_job(engine, "c", JobStatus.RUNNING, started_at=now),
    ]
    with engine.connect() as connection:
        got = list(_job_rows(connection, ids))
        expected = connection.execute(_JOBS, {"job_ids": ids}).all()
        # One id (a poll) takes the statement of its own, `id = %(job_id)s`.
        one = [row for job_id in [*ids, uuid.uuid4()] for row in _job_rows(connection, [job_id])]
    by_id = {row.id: row for row in expected}
    assert len(got) == 3 and {row.id for row in got} == set(ids)
    assert [row.id for row in one] == ids
    for row in [*got, *one]:
        assert row._asdict() == by_id[row.id]._asdict()
        assert row.status is by_id[row.id].status  # the enum, not its text
        assert row.created_at.utcoffset() == timedelta(0)
    driver = engine.dialect.name == "postgresql"
    assert (type(got[0]).__name__ == "JobRow") is driver


def test_token_cache_forgets_after_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(web.token_cache, "monotonic", lambda: now[0])
    cache = TokenCache(ttl=5.0, size=2)
    alice = Caller("token:1")
    cache.put("h1", alice)
    assert cache.get("h1") is alice
    now[0] = 104.9
    assert cache.get("h1") is alice
    now[0] = 105.0
    assert cache.get("h1") is None


def test_token_cache_is_bounded_and_can_be_off() -> None:
    cache = TokenCache(ttl=5.0, size=2)
    for i in range(3):
        cache.put(f"h{i}", Caller(f"token:{i}"))
    assert cache.get("h0") is None and cache.get("h2") == Caller("token:2")
    off = TokenCache(ttl=0)
    off.put("h", Caller("token:1"))
    assert off.get("h") is None


def test_docs_page_and_document_are_public(client: FlaskClient) -> None:
    document: dict[str, Any] = client.get("/api/v1/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"
    errors = document["paths"]["/api/v1/jobs"]["post"]["responses"]
    assert "application/problem+json" in errors["422"]["content"]
    job_in = document["components"]["schemas"]["JobIn"]["properties"]
    assert job_in["steps"]["maximum"] == 200 and job_in["num_images"]["maximum"] == 8
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200 and "/api/v1/openapi.json" in docs.get_data(as_text=True)


def test_docs_page_loads_swagger_ui_from_this_app_not_a_cdn(client: FlaskClient) -> None:
    page = client.get("/api/v1/docs").get_data(as_text=True)
    assets = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert len(assets) >= 4 and not [a for a in assets if "://" in a], assets
    kinds = {".css": "text/css", ".js": "javascript", ".png": "image/png"}
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.data) > 100, url
        assert kinds[Path(url).suffix] in asset.content_type, (url, asset.content_type)
    assert client.get("/api/v1/docs/assets/index.html").status_code == 404
    assert client.get("/api/v1/docs/assets/..%2Fsettings.py").status_code == 404
    document = client.get("/api/v1/openapi.json").get_json()
    assert not [p for p in document["paths"] if p.startswith("/api/v1/docs")]


def test_every_operation_is_tagged_so_the_docs_page_groups_them(client: FlaskClient) -> None:
    document: dict[str, Any] = client.get("/api/v1/openapi.json").get_json()
    tags = {
        (method, path): operation["tags"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert tags[("post", "/api/v1/jobs")] == ["Jobs"]
    assert tags[("get", "/api/v1/models")] == ["Jobs"]
    assert tags[("post", "/api/v1/admin/training-runs")] == ["Admin"]
    assert {t for ts in tags.values() for t in ts} == {t["name"] for t in document["tags"]}


def test_polls_read_the_queue_through_a_view_at_most_its_age_old(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll reads its job's row, and the queue through the process's QueueSnapshot, read
    again once DQ_QUEUE_SNAPSHOT_SECONDS old: a job claimed elsewhere (a worker) moves the
    others' positions once the view is that old. This process's own writes (a submit, a cancel)
    renew it at once."""
    import core.queue.eta as eta
    from tests.web.conftest import bearer, make_settings
    from web import create_app

    loads: list[int] = []
    load = eta.QueueSnapshot.load
    monkeypatch.setattr(eta.QueueSnapshot, "load", lambda *a, **k: loads.append(1) or load(*a, **k))
    clock = [1000.0]
    monkeypatch.setattr(eta.time, "monotonic", lambda: clock[0])

    app = create_app(make_settings(db_url, tmp_path, queue_snapshot_seconds=2.0))
    client = app.test_client()
    first = add_job(engine, "other", seconds_ago=10)

    def post(prompt: str) -> str:
        sent = client.post("/api/v1/jobs", json={"prompt": prompt}, headers=bearer(user_token))
        assert sent.status_code == 202, sent.json
        return str(sent.json["id"])

    def position(job_id: str) -> int | None:
        polled = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(user_token))
        assert polled.status_code == 200
        return polled.json["queue_position"]  # type: ignore[no-any-return]

    mine = post("a red circle")
    assert position(mine) == 1 and len(loads) == 1
    for _ in range(5):
        assert position(mine) == 1
    assert len(loads) == 1  # six polls, one read of the queue

    with session_scope(engine) as session:  # a worker claims the first job
        session.execute(update(Job).where(Job.id == first).values(status=JobStatus.RUNNING))
    assert position(mine) == 1  # the view is not 2 s old yet
    clock[0] += 2.0
    assert position(mine) == 0 and len(loads) == 2

    second = post("a blue square")  # this process's submit renews the view
    assert position(second) == 1 and position(mine) == 0 and len(loads) == 3
    assert client.post(f"/api/v1/jobs/{mine}/cancel", headers=bearer(user_token)).status_code == 200
    assert position(second) == 0 and len(loads) == 4


def test_a_queue_view_of_age_zero_is_read_for_every_poll(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from tests.web.conftest import bearer, make_settings
    from web import create_app

    client = create_app(make_settings(db_url, tmp_path, queue_snapshot_seconds=0)).test_client()
    first = add_job(engine, "other", seconds_ago=10)
    mine = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).json["id"]
    assert (
        client.get(f"/api/v1/jobs/{mine}", headers=bearer(user_token)).json["queue_position"] == 1
    )
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == first).values(status=JobStatus.CANCELED))
    assert (
        client.get(f"/api/v1/jobs/{mine}", headers=bearer(user_token)).json["queue_position"] == 0
    )
