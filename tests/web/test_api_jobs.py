"""REST API v1: submitting, polling, listing and canceling jobs, and every error it answers."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import web.token_cache
from core.db import Job, JobStatus, session_scope
from core.queue.dispatch import QUEUE_GENERATE, TASK_GENERATE, relay_once
from core.runtime.settings import Settings
from core.services.jobs import MAX_SEED
from core.services.model_versions import activate_version, serving_model
from core.services.tokens import revoke_token
from core.storage import LocalStorage
from tests.web.conftest import (
    RecordingPublisher,
    add_image,
    add_job,
    add_version,
    bearer,
    make_settings,
)
from web import TOKEN_CACHE_SECONDS

JOB_FIELDS = {
    "id",
    "status",
    "progress",
    "queue_position",
    "queue_position_exact",
    "estimated_start",
    "estimated_finish",
    "created_at",
    "started_at",
    "finished_at",
    "params",
    "images",
    "error",
    "webhook",
    "webhook_events_filter",
}


def owner_of(engine: Engine, token: str) -> str:
    from core.services.tokens import authenticate

    with session_scope(engine) as session:
        row = authenticate(session, token)
        assert row is not None
        return f"token:{row.id}"


def assert_problem(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    for word in words:
        assert word in body["detail"], body
    return body


# --- submit ---------------------------------------------------------------------------------


def test_submit_returns_202_with_location_and_the_job_with_defaults_filled_in(
    client: FlaskClient, user_token: str, publisher: RecordingPublisher, engine: Engine
) -> None:
    r = client.post("/api/v1/jobs", json={"prompt": "a blue square"}, headers=bearer(user_token))
    assert r.status_code == 202
    job = r.get_json()
    assert set(job) == JOB_FIELDS
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    with session_scope(engine) as session:
        model = serving_model(session)
        row = session.get(Job, uuid.UUID(job["id"]))
        assert row is not None and row.published_at is not None
    assert job["status"] == "queued" and job["queue_position"] == 0
    assert job["progress"] == {"step": 0, "total": model.steps, "preview_url": None}
    params = job["params"]
    assert params["steps"] == model.steps and params["sampler"] == model.sampler
    assert params["guidance"] == model.guidance and params["size"] == model.image_size
    assert params["model"] == "default" and params["num_images"] == 1
    assert 0 <= params["seed"] <= MAX_SEED and params["seed"] == row.seed
    assert job["created_at"].endswith("+00:00") and job["started_at"] is None
    assert job["images"] == [] and job["error"] is None
    assert publisher.sent == [(TASK_GENERATE, QUEUE_GENERATE, {"job_id": job["id"]})]


def test_submit_keeps_every_given_parameter(client: FlaskClient, user_token: str) -> None:
    body = {
        "prompt": "a small green circle",
        "negative_prompt": "red",
        "steps": 12,
        "guidance": 2.5,
        "sampler": "ddim",
        "seed": 1234,
        "num_images": 3,
        "size": 64,
    }
    r = client.post("/api/v1/jobs", json=body, headers=bearer(user_token))
    assert r.status_code == 202
    params = r.get_json()["params"]
    assert {k: params[k] for k in body} == body


def test_whole_numbers_written_as_floats_and_prompts_with_leading_spaces_are_accepted(
    client: FlaskClient, user_token: str
) -> None:
    """What the API document allows: 12.0 is the integer 12 (as in JSON Schema), and a prompt
    is blank only when every character is whitespace."""
    body = {"prompt": "\n  a red circle", "steps": 12.0, "num_images": 2.0, "seed": 7.0}
    r = client.post("/api/v1/jobs", json=body, headers=bearer(user_token))
    assert r.status_code == 202, r.get_json()
    params = r.get_json()["params"]
    assert (params["steps"], params["num_images"], params["seed"]) == (12, 2, 7)
    assert params["prompt"] == "\n  a red circle"
    for bad in ({"prompt": " \t\x1c"}, {"prompt": "x", "steps": 12.5}):
        assert client.post("/api/v1/jobs", json=bad, headers=bearer(user_token)).status_code == 422


def test_guidance_interval_is_two_levels_in_either_order_defaulting_to_the_models(
    client: FlaskClient, user_token: str
) -> None:
    def submit(**extra: Any) -> Any:
        body = {"prompt": "a red circle", **extra}
        return client.post("/api/v1/jobs", json=body, headers=bearer(user_token))

    r = submit(guidance_interval=[0.6, 0.1])
    assert r.status_code == 202 and r.get_json()["params"]["guidance_interval"] == [0.1, 0.6]
    default = submit().get_json()["params"]["guidance_interval"]
    models = client.get("/api/v1/models", headers=bearer(user_token)).get_json()
    assert default == models["serving"]["defaults"]["guidance_interval"]
    for bad in ([0.5], [0.1, 0.2, 0.3], [0.1, 1.5], ["a", 0.2], [True, 0.5]):
        problem = assert_problem(submit(guidance_interval=bad), 422, "guidance_interval")
        assert problem["errors"][0]["field"].startswith("guidance_interval")


def test_queue_position_counts_the_jobs_ahead(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    # Two other owners' first jobs come first; a running job is ahead of no one.
    add_job(engine, "someone-else", seconds_ago=5)
    add_job(engine, "a-third", seconds_ago=4)
    add_job(engine, "a-fourth", JobStatus.RUNNING, seconds_ago=10)
    r = client.post("/api/v1/jobs", json={"prompt": "a square"}, headers=bearer(user_token))
    assert r.get_json()["queue_position"] == 2


def test_same_idempotency_key_and_body_returns_the_same_job(
    client: FlaskClient, user_token: str, publisher: RecordingPublisher, jobs_of: Any
) -> None:
    headers = {**bearer(user_token), "Idempotency-Key": "order-17"}
    first = client.post("/api/v1/jobs", json={"prompt": "a circle"}, headers=headers)
    again = client.post("/api/v1/jobs", json={"prompt": "a circle"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert first.get_json()["params"]["seed"] == again.get_json()["params"]["seed"]
    assert len(jobs_of()) == 1 and len(publisher.sent) == 1


def test_same_idempotency_key_with_another_body_is_a_conflict(
    client: FlaskClient, user_token: str, jobs_of: Any
) -> None:
    headers = {**bearer(user_token), "Idempotency-Key": "order-18"}
    client.post("/api/v1/jobs", json={"prompt": "a circle"}, headers=headers)
    r = client.post("/api/v1/jobs", json={"prompt": "a square"}, headers=headers)
    assert_problem(r, 409, "Idempotency-Key")
    assert len(jobs_of()) == 1


def test_idempotency_keys_belong_to_their_caller(
    client: FlaskClient, user_token: str, other_token: str, jobs_of: Any
) -> None:
    for token in (user_token, other_token):
        r = client.post(
            "/api/v1/jobs",
            json={"prompt": "a circle"},
            headers={**bearer(token), "Idempotency-Key": "k"},
        )
        assert r.status_code == 202
    assert len(jobs_of()) == 2


def test_broker_down_still_answers_202_and_the_relay_publishes_later(
    client: FlaskClient,
    user_token: str,
    publisher: RecordingPublisher,
    engine: Engine,
    settings: Settings,
) -> None:
    publisher.down = True
    r = client.post("/api/v1/jobs", json={"prompt": "a circle"}, headers=bearer(user_token))
    assert r.status_code == 202
    job_id = uuid.UUID(r.get_json()["id"])
    with session_scope(engine) as session:
        row = session.get(Job, job_id)
        assert row is not None and row.status is JobStatus.QUEUED and row.published_at is None
    publisher.down = False
    report = relay_once(engine, publisher, settings)
    assert report.published == [job_id]
    assert publisher.sent == [(TASK_GENERATE, QUEUE_GENERATE, {"job_id": str(job_id)})]


def test_a_failed_commit_answers_503_and_leaves_nothing(
    client: FlaskClient, user_token: str, publisher: RecordingPublisher, jobs_of: Any
) -> None:
    def lose_connection(session: Session) -> None:
        # Only the transaction that holds the new job, not the token lookup before it.
        if any(isinstance(obj, Job) for obj in session.identity_map.values()):
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    event.listen(Session, "before_commit", lose_connection)
    try:
        r = client.post("/api/v1/jobs", json={"prompt": "a circle"}, headers=bearer(user_token))
    finally:
        event.remove(Session, "before_commit", lose_connection)
    body = assert_problem(r, 503, "database")
    assert "nothing was saved" in body["detail"]
    assert jobs_of() == [] and publisher.sent == []


def test_database_down_answers_503(tmp_path: Path) -> None:
    from web import create_app

    # Nothing listens on port 1: every connection is refused at once.
    down = make_settings("postgresql+psycopg://postgres@127.0.0.1:1/test", tmp_path)
    app = create_app(down, publisher=RecordingPublisher())
    r = app.test_client().post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer("dq_any"))
    assert_problem(r, 503, "database is unavailable")
    assert r.headers["Retry-After"] == "5"


# --- errors on submit -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt": "x", "steps": 0}, "steps", "must be at least 1"),
        ({"prompt": "x", "steps": 201}, "steps", "from 1 to 200"),  # DQ_MAX_STEPS
        ({"prompt": "x", "steps": "20"}, "steps", "must be an integer"),
        ({"prompt": "x", "steps": 2.5}, "steps", "must be an integer"),
        ({"prompt": "x", "guidance": 31}, "guidance", "from 0 to 30"),
        ({"prompt": "x", "guidance": "4"}, "guidance", "must be a number"),
        ({"prompt": "x", "guidance": True}, "guidance", "must be a number"),
        ({"prompt": "x", "sampler": "euler"}, "sampler", "must be one of"),
        ({"prompt": "x", "seed": -1}, "seed", "from 0"),
        ({"prompt": "x", "num_images": 9}, "num_images", "from 1 to 8"),
        ({"prompt": "x", "size": 40}, "size", "multiple of"),
        ({"prompt": "x", "size": 4096}, "size", "from"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 1001}, "prompt", "limit is 1000"),
        ({"prompt": "a\u0000b"}, "prompt", "NUL"),
        ({"prompt": "\ud800"}, "prompt", "valid Unicode"),
        ({}, "prompt", "is required"),
        ({"prompt": "x", "colour": "red"}, "colour", "is not a known field"),
        (["a list"], "body", "must be a JSON object"),
    ],
)
def test_bad_fields_get_422_naming_the_field(
    client: FlaskClient,
    user_token: str,
    jobs_of: Any,
    body: Any,
    field: str,
    message: str,
) -> None:
    r = client.post("/api/v1/jobs", json=body, headers=bearer(user_token))
    problem = assert_problem(r, 422, field)
    assert any(e["field"] == field and message in e["message"] for e in problem["errors"]), problem
    assert jobs_of() == []


def test_malformed_json_is_400(client: FlaskClient, user_token: str) -> None:
    r = client.post(
        "/api/v1/jobs",
        data='{"prompt": "x",',
        content_type="application/json",
        headers=bearer(user_token),
    )
    assert_problem(r, 400, "not valid JSON")


def test_a_body_over_the_limit_is_413(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str, admin_token: str
) -> None:
    """A job's body may carry two inline images of DQ_MAX_UPLOAD_BYTES (as base64) besides the
    usual 64 KiB; past that, 413 naming the limit. Other endpoints keep 64 KiB."""
    from tests.web.conftest import make_settings
    from web import create_app

    client = create_app(make_settings(db_url, tmp_path, max_upload_bytes=12_000)).test_client()
    limit = 2 * (4 * 12_002 // 3) + 64 * 1024
    r = client.post("/api/v1/jobs", json={"prompt": "x" * limit}, headers=bearer(user_token))
    assert_problem(r, 413, f"{limit // 1024} KiB")
    r = client.post("/api/v1/jobs", json={"prompt": "x" * 70_000}, headers=bearer(user_token))
    assert_problem(r, 422, "prompt")  # within the limit: the prompt's own check answers
    r = client.post(
        "/api/v1/admin/training-runs", json={"x": "y" * 70_000}, headers=bearer(admin_token)
    )
    assert_problem(r, 413, "64 KiB")


def test_a_body_that_is_not_json_is_415(client: FlaskClient, user_token: str) -> None:
    r = client.post(
        "/api/v1/jobs", data="prompt=x", content_type="text/plain", headers=bearer(user_token)
    )
    assert_problem(r, 415, "application/json")


def test_too_long_idempotency_key_is_422(client: FlaskClient, user_token: str) -> None:
    r = client.post(
        "/api/v1/jobs",
        json={"prompt": "x"},
        headers={**bearer(user_token), "Idempotency-Key": "k" * 256},
    )
    assert_problem(r, 422, "Idempotency-Key")


def test_rate_limit_answers_429_with_retry_after_per_caller(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str, other_token: str
) -> None:
    from web import create_app

    app = create_app(
        make_settings(db_url, tmp_path, rate_limit="2/minute"), publisher=RecordingPublisher()
    )
    client = app.test_client()
    codes = [
        client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).status_code
        for _ in range(3)
    ]
    assert codes == [202, 202, 429]
    r = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token))
    assert_problem(r, 429, "limit is 2 per 1 minute")
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    # Another caller has its own budget, and reading is never limited.
    other = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(other_token))
    assert other.status_code == 202
    assert client.get("/api/v1/jobs", headers=bearer(user_token)).status_code == 200


# --- authentication and ownership -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/api/v1/jobs"),
        ("get", "/api/v1/jobs"),
        ("get", f"/api/v1/jobs/{uuid.uuid4()}"),
        ("post", f"/api/v1/jobs/{uuid.uuid4()}/cancel"),
        ("get", "/api/v1/models"),
    ],
)
def test_missing_or_wrong_token_is_401(
    client: FlaskClient, engine: Engine, method: str, path: str
) -> None:
    r = getattr(client, method)(path, json={"prompt": "x"})
    assert_problem(r, 401, "Authorization: Bearer")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = getattr(client, method)(path, json={"prompt": "x"}, headers=bearer("dq_not-a-token"))
    assert_problem(r, 401, "not valid")
    r = getattr(client, method)(path, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_problem(r, 401)


def test_a_revoked_token_is_401_once_the_process_forgets_it(
    client: FlaskClient, engine: Engine, user_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get("/api/v1/jobs", headers=bearer(user_token)).status_code == 200
    with session_scope(engine) as session:
        revoke_token(session, user_token)
    # The process trusts a token it checked for TOKEN_CACHE_SECONDS, then asks the database.
    assert client.get("/api/v1/jobs", headers=bearer(user_token)).status_code == 200
    later = time.monotonic() + TOKEN_CACHE_SECONDS + 0.1
    monkeypatch.setattr(web.token_cache, "monotonic", lambda: later)
    assert_problem(client.get("/api/v1/jobs", headers=bearer(user_token)), 401, "revoked")


def test_without_the_token_cache_revocation_is_immediate(
    app: Any, engine: Engine, user_token: str
) -> None:
    app.extensions["dq"].token_cache.ttl = 0
    client = app.test_client()
    assert client.get("/api/v1/jobs", headers=bearer(user_token)).status_code == 200
    with session_scope(engine) as session:
        revoke_token(session, user_token)
    assert_problem(client.get("/api/v1/jobs", headers=bearer(user_token)), 401, "revoked")


def test_another_callers_job_is_404_but_an_admin_sees_it(
    client: FlaskClient, user_token: str, other_token: str, admin_token: str
) -> None:
    job = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).get_json()
    path = f"/api/v1/jobs/{job['id']}"
    assert client.get(path, headers=bearer(user_token)).status_code == 200
    assert_problem(client.get(path, headers=bearer(other_token)), 404, "no job")
    assert_problem(client.post(path + "/cancel", headers=bearer(other_token)), 404)
    assert client.get(path, headers=bearer(admin_token)).get_json()["id"] == job["id"]


# --- poll -----------------------------------------------------------------------------------


def test_poll_shows_progress_and_preview_while_running(
    client: FlaskClient, engine: Engine, user_token: str, storage: LocalStorage
) -> None:
    owner = owner_of(engine, user_token)
    job_id = add_job(
        engine, owner, JobStatus.RUNNING, progress_step=7, preview_key="previews/p.png"
    )
    storage.put("previews/p.png", b"png", "image/png")
    job = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(user_token)).get_json()
    assert job["status"] == "running" and job["queue_position"] is None
    assert job["progress"]["step"] == 7 and job["progress"]["total"] == 20
    url = job["progress"]["preview_url"]
    assert url.startswith("/files/previews/p.png?expires=")
    assert client.get(url).data == b"png"


def test_poll_of_a_finished_job_lists_its_images_with_working_urls(
    client: FlaskClient, engine: Engine, user_token: str, storage: LocalStorage
) -> None:
    owner = owner_of(engine, user_token)
    job_id = add_job(engine, owner, JobStatus.SUCCEEDED, num_images=2, latency=3.0)
    add_image(engine, job_id, storage, 0)
    add_image(engine, job_id, storage, 1)
    job = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(user_token)).get_json()
    assert job["status"] == "succeeded" and job["progress"]["preview_url"] is None
    assert [(i["width"], i["height"], i["seed"]) for i in job["images"]] == [
        (64, 64, 7),
        (64, 64, 8),
    ]
    fetched = client.get(job["images"][1]["url"])
    assert fetched.status_code == 200 and fetched.mimetype == "image/png"
    assert job["finished_at"] is not None and job["started_at"] is not None


def test_poll_of_a_failed_job_carries_its_error(
    client: FlaskClient, engine: Engine, user_token: str
) -> None:
    owner = owner_of(engine, user_token)
    job_id = add_job(engine, owner, JobStatus.FAILED, error="the model is gone")
    job = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(user_token)).get_json()
    assert job["status"] == "failed" and job["error"] == "the model is gone"


def test_unknown_and_malformed_job_ids_are_404(client: FlaskClient, user_token: str) -> None:
    assert_problem(client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=bearer(user_token)), 404)
    assert_problem(client.get("/api/v1/jobs/not-a-uuid", headers=bearer(user_token)), 404)


def test_wrong_method_is_405_naming_the_allowed_ones(client: FlaskClient) -> None:
    body = assert_problem(client.delete("/api/v1/jobs"), 405, "DELETE is not allowed")
    assert "POST" in body["detail"] and "GET" in body["detail"]


# --- list -----------------------------------------------------------------------------------


def test_list_is_newest_first_paginated_and_filtered_by_status(
    client: FlaskClient, engine: Engine, user_token: str, admin_token: str
) -> None:
    owner = owner_of(engine, user_token)
    ids = [add_job(engine, owner, seconds_ago=10 - i) for i in range(5)]
    done = add_job(engine, owner, JobStatus.SUCCEEDED, seconds_ago=20)
    add_job(engine, "token:999", seconds_ago=1)  # not the caller's
    r = client.get("/api/v1/jobs?limit=2&offset=1", headers=bearer(user_token))
    page = r.get_json()
    assert page["total"] == 6 and page["limit"] == 2 and page["offset"] == 1
    assert [j["id"] for j in page["jobs"]] == [str(ids[3]), str(ids[2])]
    assert all(set(j) == JOB_FIELDS for j in page["jobs"])
    r = client.get("/api/v1/jobs?status=succeeded", headers=bearer(user_token))
    assert [j["id"] for j in r.get_json()["jobs"]] == [str(done)]
    # An admin lists everyone's jobs.
    assert client.get("/api/v1/jobs", headers=bearer(admin_token)).get_json()["total"] == 7


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=lost", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("offset=-1", "offset"),
        ("limit=ten", "limit"),
    ],
)
def test_bad_list_parameters_are_422(
    client: FlaskClient, user_token: str, query: str, field: str
) -> None:
    r = client.get(f"/api/v1/jobs?{query}", headers=bearer(user_token))
    assert_problem(r, 422, field)


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_is_immediate(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    job = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).get_json()
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bearer(user_token))
    assert r.status_code == 200
    assert r.get_json()["status"] == "canceled" and r.get_json()["finished_at"] is not None
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bearer(user_token))
    assert again.status_code == 200 and again.get_json()["status"] == "canceled"


def test_cancel_of_a_running_job_asks_the_worker_to_stop(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    job_id = add_job(engine, owner_of(engine, user_token), JobStatus.RUNNING)
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(user_token))
    assert r.status_code == 200 and r.get_json()["status"] == "running"
    with session_scope(engine) as session:
        row = session.get(Job, job_id)
        assert row is not None and row.cancel_requested is True


def test_cancel_of_a_finished_job_is_409(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    job_id = add_job(engine, owner_of(engine, user_token), JobStatus.SUCCEEDED)
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(user_token))
    assert_problem(r, 409, "already succeeded")
    with session_scope(engine) as session:
        row = session.scalar(select(Job).where(Job.id == job_id))
        assert row is not None and row.status is JobStatus.SUCCEEDED


# --- models ---------------------------------------------------------------------------------


def test_models_lists_versions_and_the_one_serving(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    r = client.get("/api/v1/models", headers=bearer(user_token))
    assert r.status_code == 200
    assert r.get_json()["serving"]["name"] == "default" and r.get_json()["versions"] == []
    version_id = add_version(
        engine,
        "shapes-v2",
        config={"sampling_defaults": {"steps": 31, "sampler": "ddim", "guidance": 3.0}},
        metrics={"fid": 12.5},
    )
    with session_scope(engine) as session:
        activate_version(session, version_id)
    body = client.get("/api/v1/models", headers=bearer(user_token)).get_json()
    assert body["serving"]["name"] == "shapes-v2"
    assert body["serving"]["defaults"] == {
        "steps": 31,
        "guidance": 3.0,
        "sampler": "ddim",
        "guidance_interval": [0.0, 1.0],
    }
    assert [(v["name"], v["is_active"], v["metrics"]) for v in body["versions"]] == [
        ("shapes-v2", True, {"fid": 12.5})
    ]
    # New jobs take the active version's defaults and name it.
    job = client.post("/api/v1/jobs", json={"prompt": "x"}, headers=bearer(user_token)).get_json()
    assert job["params"]["model"] == "shapes-v2" and job["params"]["steps"] == 31


def test_a_poll_answers_304_while_nothing_it_shows_has_changed(
    client: FlaskClient, app: Any, user_token: str, engine: Engine
) -> None:
    """ETag and If-None-Match: the same tag while the job waits where it was; a new one once
    a job ahead of it leaves the queue, and again when it runs, with its progress, and ends.
    Retry-After tells the poller how long to wait, and is gone once the job has ended."""
    ahead = client.post("/api/v1/jobs", json={"prompt": "a"}, headers=bearer(user_token))
    r = client.post("/api/v1/jobs", json={"prompt": "b"}, headers=bearer(user_token))
    url = r.headers["Location"]
    job_id = uuid.UUID(r.get_json()["id"])

    first = client.get(url, headers=bearer(user_token))
    assert first.status_code == 200 and first.get_json()["queue_position"] == 1
    assert first.get_json()["queue_position_exact"] is True
    etag = first.headers["ETag"]
    assert etag.startswith('"') and first.headers["Retry-After"] == "2"
    assert first.headers["Cache-Control"] == "private, no-cache"

    def poll(tag: str) -> Any:
        return client.get(url, headers={**bearer(user_token), "If-None-Match": tag})

    same = poll(etag)
    assert same.status_code == 304 and same.get_data() == b""
    assert same.headers["ETag"] == etag and same.headers["Retry-After"] == "2"
    assert poll(f'"other", W/{etag}').status_code == 304  # a list, weak or not
    assert poll('"something-else"').status_code == 200

    def set_job(jid: uuid.UUID, **values: Any) -> None:
        with session_scope(engine) as s:
            s.execute(update(Job).where(Job.id == jid).values(**values))

    set_job(uuid.UUID(ahead.get_json()["id"]), status=JobStatus.CANCELED)
    # Another process's change shows once the process's view of the queue is
    # DQ_QUEUE_SNAPSHOT_SECONDS old (tests/web/test_resources.py); here, at once.
    app.extensions["dq"].queue_snapshots.clear()
    moved = poll(etag)
    assert moved.status_code == 200 and moved.get_json()["queue_position"] == 0
    set_job(job_id, status=JobStatus.RUNNING, progress_step=3)
    running = poll(moved.headers["ETag"])
    assert running.status_code == 200 and running.headers["Retry-After"] == "1"
    assert poll(running.headers["ETag"]).status_code == 304
    set_job(job_id, progress_step=4)
    stepped = poll(running.headers["ETag"])
    assert stepped.status_code == 200 and stepped.get_json()["progress"]["step"] == 4
    set_job(job_id, status=JobStatus.FAILED, error="boom")
    ended = poll(stepped.headers["ETag"])
    assert ended.status_code == 200 and "Retry-After" not in ended.headers
    assert poll(ended.headers["ETag"]).status_code == 304
    # Another caller learns nothing from a tag: 404 as before.
    other = client.get(url, headers={**bearer(_other(engine)), "If-None-Match": etag})
    assert other.status_code == 404


def _other(engine: Engine) -> str:
    from core.services.tokens import create_token

    with session_scope(engine) as s:
        return create_token(s, "user", "mallory")[1]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_poll_that_meets_a_connection_postgresql_dropped_reads_again(
    client: FlaskClient, app: Any, user_token: str
) -> None:
    """Pooled connections used a moment ago are not pinged (core.db.session); when PostgreSQL
    has dropped one in that moment (a restart), the poll's read runs again on a fresh
    connection and answers 200, not 503."""
    from tests.core.test_db import _drop_pooled_connection

    submitted = client.post(
        "/api/v1/jobs", json={"prompt": "a red circle"}, headers=bearer(user_token)
    )
    job_id = submitted.json["id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(user_token)).status_code == 200
    engine = app.extensions["dq"].engine
    assert engine.pool.checkedin() == 1
    _drop_pooled_connection(engine)
    polled = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(user_token))
    assert polled.status_code == 200, polled.json
    assert polled.json["id"] == job_id
