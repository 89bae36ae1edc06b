"""/healthz, /readyz, /readyz/dependencies and /metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from core.db import JobStatus
from core.storage import StorageError
from tests.web.conftest import RecordingPublisher, add_job, bearer, make_settings
from tests.web.test_admin_api import add_run


def samples(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    out = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_healthz_is_200_without_touching_anything(tmp_path: Path) -> None:
    from web import create_app

    down = make_settings("postgresql+psycopg://postgres@127.0.0.1:1/test", tmp_path)
    r = create_app(down, publisher=RecordingPublisher()).test_client().get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}


def test_readyz_is_200_when_the_database_answers(client: FlaskClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ready", "down": [], "checks": {"database": "ok"}}


def test_dependencies_are_200_when_everything_answers(client: FlaskClient) -> None:
    r = client.get("/readyz/dependencies")
    assert r.status_code == 200
    assert r.get_json() == {
        "database": {"ok": True, "error": None},
        "broker": {"ok": True, "error": None},
        "storage": {"ok": True, "error": None},
    }


def test_a_broker_outage_keeps_readyz_200_and_is_named_by_dependencies(
    client: FlaskClient, publisher: RecordingPublisher, user_token: str
) -> None:
    publisher.down = True
    assert client.get("/readyz").status_code == 200  # the pod stays in the load balancer
    r = client.get("/readyz/dependencies")
    assert r.status_code == 503
    body = r.get_json()
    assert body["broker"]["ok"] is False and "refused" in body["broker"]["error"]
    assert body["database"] == {"ok": True, "error": None}
    assert body["storage"] == {"ok": True, "error": None}
    # ...because a submit still succeeds: the job waits in the outbox for the reaper.
    submitted = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token))
    assert submitted.status_code == 202


def test_a_storage_outage_keeps_readyz_200_and_is_named_by_dependencies(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise StorageError("S3 bucket 'images' does not exist")

    monkeypatch.setattr(app.extensions["dq"].storage, "check", broken)
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    r = client.get("/readyz/dependencies")
    assert r.status_code == 503
    body = r.get_json()
    assert body["storage"]["ok"] is False and "does not exist" in body["storage"]["error"]
    assert body["broker"]["ok"] is True


def test_readyz_names_the_database_when_it_is_down(tmp_path: Path) -> None:
    from web import create_app

    down = make_settings("postgresql+psycopg://postgres@127.0.0.1:1/test", tmp_path)
    client = create_app(down, publisher=RecordingPublisher()).test_client()
    r = client.get("/readyz")
    assert r.status_code == 503 and r.get_json()["down"] == ["database"]
    r = client.get("/readyz/dependencies")
    assert r.status_code == 503 and r.get_json()["database"]["ok"] is False


def test_metrics_count_jobs_and_runs_by_status_and_the_queue(
    client: FlaskClient, engine: Engine, publisher: RecordingPublisher
) -> None:
    for status, n in ((JobStatus.QUEUED, 3), (JobStatus.RUNNING, 1), (JobStatus.FAILED, 2)):
        for _ in range(n):
            add_job(engine, "token:1", status)
    add_run(engine, JobStatus.RUNNING)
    publisher.publish("dq.generate", "generate", {"job_id": "x"})
    publisher.publish("dq.generate", "generate", {"job_id": "y"})
    got = samples(client)
    assert got[("dq_jobs", (("status", "queued"),))] == 3
    assert got[("dq_jobs", (("status", "running"),))] == 1
    assert got[("dq_jobs", (("status", "failed"),))] == 2
    assert got[("dq_jobs", (("status", "succeeded"),))] == 0
    assert got[("dq_training_runs", (("status", "running"),))] == 1
    assert got[("dq_queue_depth", (("queue", "generate"),))] == 2
    assert got[("dq_queue_depth", (("queue", "train"),))] == 0


def test_metrics_latency_histogram_buckets_succeeded_jobs(
    client: FlaskClient, engine: Engine
) -> None:
    for latency in (0.3, 1.5, 4.0, 45.0):
        add_job(engine, "token:1", JobStatus.SUCCEEDED, seconds_ago=100, latency=latency)
    add_job(engine, "token:1", JobStatus.FAILED, seconds_ago=100, latency=2.0)  # not counted
    got = samples(client)

    def bucket(le: str) -> float:
        return got[("dq_job_latency_seconds_bucket", (("le", le),))]

    assert [bucket(b) for b in ("0.5", "1.0", "2.0", "5.0", "30.0", "60.0", "+Inf")] == [
        1,
        1,
        2,
        3,
        3,
        4,
        4,
    ]
    assert got[("dq_job_latency_seconds_count", ())] == 4
    assert got[("dq_job_latency_seconds_sum", ())] == pytest.approx(50.8)


def test_metrics_leave_out_queue_depth_when_the_broker_cannot_tell(
    client: FlaskClient, publisher: RecordingPublisher
) -> None:
    publisher.down = True
    got = samples(client)
    assert not any(name == "dq_queue_depth" for name, _ in got)
    assert got[("dq_jobs", (("status", "queued"),))] == 0


def test_metrics_say_which_dependencies_are_up(
    client: FlaskClient, publisher: RecordingPublisher
) -> None:
    got = samples(client)
    for name in ("database", "broker", "storage"):
        assert got[("dq_dependency_up", (("dependency", name),))] == 1


def test_metrics_probe_the_broker_at_most_every_ten_seconds(
    client: FlaskClient, publisher: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    import web.dependencies

    clock = [1000.0]
    monkeypatch.setattr(web.dependencies, "monotonic", lambda: clock[0])
    probes = []
    check = publisher.check

    def counted() -> None:
        probes.append(clock[0])
        check()

    monkeypatch.setattr(publisher, "check", counted)
    broker = ("dq_dependency_up", (("dependency", "broker"),))
    assert samples(client)[broker] == 1
    publisher.down = True
    clock[0] += 9
    assert samples(client)[broker] == 1  # the result of 9 s ago still stands
    assert len(probes) == 1
    clock[0] += 1
    assert samples(client)[broker] == 0
    assert len(probes) == 2


def test_metrics_answer_with_the_database_down(tmp_path: Path) -> None:
    from web import create_app

    down = make_settings("postgresql+psycopg://postgres@127.0.0.1:1/test", tmp_path)
    got = samples(create_app(down, publisher=RecordingPublisher()).test_client())
    assert got[("dq_dependency_up", (("dependency", "database"),))] == 0
    assert got[("dq_dependency_up", (("dependency", "broker"),))] == 1
    assert not any(name == "dq_jobs" for name, _ in got)


def test_metrics_need_the_token_when_one_is_set(tmp_path: Path, engine: Engine) -> None:
    from web import create_app

    url = engine.url.render_as_string(hide_password=False)
    settings = dataclasses.replace(make_settings(url, tmp_path), metrics_token="m" * 40)
    client = create_app(settings, publisher=RecordingPublisher()).test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + "m" * 40}):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 401 and r.mimetype == "application/problem+json"
        assert "DQ_METRICS_TOKEN" in r.get_json()["detail"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.get("/metrics", headers={"Authorization": "Bearer " + "m" * 40})
    assert r.status_code == 200 and b"dq_jobs" in r.data


def test_a_scrape_never_counts_or_scans_the_jobs_table(
    client: FlaskClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O(1) in the size of the tables: counts come from status_counts; the only read of jobs is
    the newest succeeded ones, LIMITed, through the (status, finished_at) index."""
    from sqlalchemy import event

    for status in (JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED):
        add_job(engine, "token:1", status, seconds_ago=10, latency=1.0)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.lower().split()))

    svc_engine = client.application.extensions["dq"].engine
    event.listen(svc_engine, "before_cursor_execute", record)
    try:
        got = samples(client)
    finally:
        event.remove(svc_engine, "before_cursor_execute", record)
    assert got[("dq_jobs", (("status", "queued"),))] == 1
    assert got[("dq_jobs", (("status", "succeeded"),))] == 1
    on_jobs = [s for s in statements if " from jobs" in s]
    assert on_jobs, statements
    for statement in on_jobs:
        assert "count(" not in statement and "group by" not in statement
        assert " limit " in statement and "where jobs.status = " in statement
    assert not any(" from training_runs" in s for s in statements)
