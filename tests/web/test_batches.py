"""Batch submissions over the API (/api/v1/batches) and the form's one-prompt-per-line mode, on
SQLite and PostgreSQL."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus, session_scope
from core.db.models import Batch
from core.storage import LocalStorage
from tests.web.conftest import (
    RecordingPublisher,
    add_image,
    bearer,
    csrf_token,
    make_settings,
)

MATRIX = {
    "template": "a {color} {shape}",
    "values": {"color": ["red", "green"], "shape": ["circle", "square", "triangle"]},
}


def post(client: FlaskClient, token: str, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/api/v1/batches", json=body, headers={**bearer(token), **headers})


def counts(engine: Engine) -> tuple[int, int]:
    with Session(engine) as s:
        jobs = s.scalar(select(func.count()).select_from(Job)) or 0
        return jobs, s.scalar(select(func.count()).select_from(Batch)) or 0


def test_a_2x3_matrix_is_202_with_6_jobs_seeded_from_the_base_and_published(
    client: FlaskClient, user_token: str, publisher: RecordingPublisher
) -> None:
    r = post(client, user_token, {"matrix": MATRIX, "seed": 40, "num_images": 2, "steps": 5})
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert r.headers["Location"] == f"/api/v1/batches/{body['id']}"
    assert body["size"] == 6 and body["status"] == "active" and body["base_seed"] == 40
    assert body["counts"] == {"queued": 6, "running": 0, "succeeded": 0, "failed": 0,
                              "canceled": 0}  # fmt: skip
    assert [j["prompt"] for j in body["jobs"]] == [
        f"a {c} {s}" for c in ("red", "green") for s in ("circle", "square", "triangle")
    ]
    assert [j["seed"] for j in body["jobs"]] == [40, 42, 44, 46, 48, 50]
    assert body["params"]["matrix"] == MATRIX and body["params"]["steps"] == 5
    assert sorted(kw["job_id"] for _, _, kw in publisher.sent) == sorted(
        j["id"] for j in body["jobs"]
    )
    assert client.get(r.headers["Location"], headers=bearer(user_token)).get_json() == body


def test_a_prompt_list_makes_one_job_per_prompt(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    r = post(client, user_token, {"prompts": ["a red circle", "a blue square"], "sampler": "ddim"})
    assert r.status_code == 202
    with Session(engine) as s:
        jobs = s.scalars(select(Job).order_by(Job.seed)).all()
        assert {(j.sampler, str(j.batch_id)) for j in jobs} == {("ddim", r.get_json()["id"])}
        assert sorted(j.prompt for j in jobs) == ["a blue square", "a red circle"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": [f"p{i}" for i in range(101)]}, "prompts"),
        ({"matrix": {"template": "{a}{b}{c}", "values": {"a": list("abcde"),
          "b": list("abcde"), "c": list("abcde")}}}, "matrix"),
    ],
)  # fmt: skip
def test_over_the_cap_is_422_naming_it(
    client: FlaskClient, user_token: str, engine: Engine, body: dict[str, Any], field: str
) -> None:
    r = post(client, user_token, body)
    assert r.status_code == 422
    problem = r.get_json()
    assert "DQ_MAX_BATCH_ITEMS" in problem["detail"] and "100" in problem["detail"]
    assert problem["errors"][0]["field"] == field
    assert counts(engine) == (0, 0)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": ["a red circle", "   "]}, "prompts.1"),
        ({"prompts": ["a red circle", "x" * 1001]}, "prompts.1"),
        ({"prompts": ["a", "b"], "steps": 0}, "steps"),
        ({"matrix": {"template": "a {color}", "values": {"shape": ["x"]}}}, "matrix.values"),
        ({"matrix": {"template": "a {color}", "values": {"color": []}}}, "matrix.values.color"),
        ({"prompts": ["a"], "matrix": MATRIX}, "prompts"),
        ({"steps": 3}, "prompts"),
        ({"prompts": ["a"], "webhook": "http://example.com/hook"}, "webhook"),
        ({"prompts": ["a"], "webhook": "https://example.com/h",
          "webhook_events_filter": ["done"]}, "webhook_events_filter.0"),
    ],
)  # fmt: skip
def test_a_bad_item_is_422_naming_it_and_nothing_is_added(
    client: FlaskClient, user_token: str, engine: Engine, body: dict[str, Any], field: str
) -> None:
    r = post(client, user_token, body)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["errors"][0]["field"] == field
    assert counts(engine) == (0, 0)


def test_the_per_owner_cap_counts_the_whole_batch_429(
    db_url: str, tmp_path: Path, engine: Engine, user_token: str
) -> None:
    from web import create_app

    app = create_app(
        make_settings(db_url, tmp_path, max_active_jobs_per_owner=5),
        publisher=RecordingPublisher(),
    )
    client = app.test_client()
    assert post(client, user_token, {"prompts": ["a"] * 4}).status_code == 202
    r = post(client, user_token, {"prompts": ["b"] * 2})
    assert r.status_code == 429 and "DQ_MAX_ACTIVE_JOBS_PER_OWNER" in r.get_json()["detail"]
    assert r.headers["Retry-After"]
    assert counts(engine) == (4, 1)


def test_an_idempotent_replay_returns_the_same_batch(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    body = {"matrix": MATRIX, "webhook": "https://example.com/hook"}
    first = post(client, user_token, body, **{"Idempotency-Key": "b-1"})
    again = post(client, user_token, body, **{"Idempotency-Key": "b-1"})
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert counts(engine) == (6, 1)
    other = post(client, user_token, {"prompts": ["x"]}, **{"Idempotency-Key": "b-1"})
    assert other.status_code == 409


def test_another_owners_batch_is_404_but_an_admin_sees_it(
    client: FlaskClient, user_token: str, other_token: str, admin_token: str
) -> None:
    batch_id = post(client, user_token, {"prompts": ["a"]}).get_json()["id"]
    assert client.get(f"/api/v1/batches/{batch_id}", headers=bearer(other_token)).status_code == 404
    r = client.post(f"/api/v1/batches/{batch_id}/cancel", headers=bearer(other_token))
    assert r.status_code == 404
    missing = client.get(f"/api/v1/batches/{uuid.uuid4()}", headers=bearer(user_token))
    assert missing.status_code == 404
    assert client.get("/api/v1/batches", headers=bearer(other_token)).get_json()["total"] == 0
    assert client.get(f"/api/v1/batches/{batch_id}", headers=bearer(admin_token)).status_code == 200


def test_cancelling_the_batch_cancels_all_its_jobs(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    batch_id = post(client, user_token, {"matrix": MATRIX}).get_json()["id"]
    r = client.post(f"/api/v1/batches/{batch_id}/cancel", headers=bearer(user_token))
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "ended" and body["counts"]["canceled"] == 6
    assert {j["status"] for j in body["jobs"]} == {"canceled"}
    with Session(engine) as s:
        assert set(s.scalars(select(Job.status))) == {JobStatus.CANCELED}


def test_list_is_newest_first_and_paginated_and_a_finished_job_shows_its_images(
    client: FlaskClient, user_token: str, engine: Engine, storage: LocalStorage
) -> None:
    ids = [post(client, user_token, {"prompts": [f"p{i}"]}).get_json()["id"] for i in range(3)]
    page = client.get("/api/v1/batches?limit=2", headers=bearer(user_token)).get_json()
    assert page["total"] == 3 and [b["id"] for b in page["batches"]] == ids[::-1][:2]
    assert "jobs" not in page["batches"][0] and page["batches"][0]["counts"]["queued"] == 1
    page = client.get("/api/v1/batches?limit=2&offset=2", headers=bearer(user_token)).get_json()
    assert [b["id"] for b in page["batches"]] == ids[:1]
    with session_scope(engine) as s:
        job_id = s.scalar(select(Job.id).where(Job.batch_id == uuid.UUID(ids[0])))
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.SUCCEEDED))
    assert job_id is not None
    add_image(engine, job_id, storage)
    body = client.get(f"/api/v1/batches/{ids[0]}", headers=bearer(user_token)).get_json()
    (job,) = body["jobs"]
    assert job["status"] == "succeeded" and len(job["images"]) == 1
    assert client.get(job["images"][0]["url"]).status_code == 200
    r = client.get("/api/v1/batches?limit=0", headers=bearer(user_token))
    assert r.status_code == 422


def test_a_body_that_is_not_json_is_415(client: FlaskClient, user_token: str) -> None:
    r = client.post(
        "/api/v1/batches", data="prompts=a", headers=bearer(user_token),
        content_type="application/x-www-form-urlencoded",
    )  # fmt: skip
    assert r.status_code == 415


# --- the form ---------------------------------------------------------------------------------

FORM = {
    "prompt": "a red circle\n\n  a blue square  \r\na green triangle\n",
    "negative_prompt": "",
    "steps": "20",
    "guidance": "4",
    "sampler": "dpmpp-2m",
    "seed": "9",
    "num_images": "2",
    "one_per_line": "y",
}


def test_the_forms_one_prompt_per_line_mode_makes_a_batch_and_shows_it(
    client: FlaskClient, engine: Engine, publisher: RecordingPublisher
) -> None:
    r = client.post("/", data={**FORM, "csrf_token": csrf_token(client)})
    assert r.status_code == 303
    match = re.fullmatch(r"/batches/([0-9a-f-]{36})", r.headers["Location"])
    assert match
    with Session(engine) as s:
        jobs = s.scalars(select(Job).order_by(Job.seed)).all()
        assert [(j.prompt, j.seed) for j in jobs] == [
            ("a red circle", 9), ("a blue square", 11), ("a green triangle", 13)
        ]  # fmt: skip
        assert {str(j.batch_id) for j in jobs} == {match.group(1)}
    assert len(publisher.sent) == 3
    page = client.get(r.headers["Location"])
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and html.count('class="thumb empty"') == 3
    assert "a blue square" in html and 'http-equiv="refresh"' in html
    # Another browser does not see it; cancelling from the page cancels every job.
    assert FlaskClient(client.application).get(r.headers["Location"]).status_code == 404
    cancel = client.post(f"{r.headers['Location']}/cancel", data={"csrf_token": csrf_token(client)})
    assert cancel.status_code == 303
    with Session(engine) as s:
        assert set(s.scalars(select(Job.status))) == {JobStatus.CANCELED}


def test_the_forms_batch_errors_land_on_the_prompt(client: FlaskClient, engine: Engine) -> None:
    lines = "a red circle\n" + "x" * 1001
    r = client.post("/", data={**FORM, "prompt": lines, "csrf_token": csrf_token(client)})
    assert r.status_code == 422
    assert "prompt 2 of 2: is 1001 characters" in r.get_data(as_text=True)
    assert counts(engine) == (0, 0)


def test_with_login_required_the_batch_form_and_page_need_a_sign_in(
    db_url: str, tmp_path: Path, engine: Engine
) -> None:
    from web import create_app

    app = create_app(
        make_settings(db_url, tmp_path, form_requires_login=True), publisher=RecordingPublisher()
    )
    client = app.test_client()
    r = client.post("/", data={**FORM, "csrf_token": csrf_token(client, "/login")})
    assert r.status_code == 401
    assert counts(engine) == (0, 0)
    page = client.get(f"/batches/{uuid.uuid4()}")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
