"""Admin API: training runs (start, list, watch, cancel) and model versions (activate)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core.db import (
    JobStatus,
    ModelKind,
    ModelVersion,
    TrainingMetric,
    TrainingRun,
    session_scope,
    utcnow,
)
from core.queue.dispatch import QUEUE_TRAIN, TASK_TRAIN
from core.storage import LocalStorage
from tests.web.conftest import PNG_BYTES, RecordingPublisher, add_version, bearer
from tests.web.test_api_jobs import assert_problem

SHAPES_RUN = {"kind": "denoiser", "dataset": {"kind": "shapes", "seed": 3}}


def count_runs(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(TrainingRun)) or 0)


def add_run(engine: Engine, status: JobStatus = JobStatus.QUEUED, **values: Any) -> uuid.UUID:
    run = TrainingRun(
        id=uuid.uuid4(),
        status=status,
        kind=ModelKind.DENOISER,
        dataset={"kind": "shapes"},
        config={},
        created_by="token:1",
        total_steps=100,
        created_at=utcnow(),
        **values,
    )
    with session_scope(engine) as session:
        session.add(run)
    return run.id


def test_start_a_run_returns_202_with_location_and_publishes_it(
    client: FlaskClient, admin_token: str, publisher: RecordingPublisher, engine: Engine
) -> None:
    body = {
        **SHAPES_RUN,
        "config": {"train": {"steps": 500, "lr": 0.0003}},
        "activate": True,
    }
    r = client.post("/api/v1/admin/training-runs", json=body, headers=bearer(admin_token))
    assert r.status_code == 202, r.get_json()
    run = r.get_json()
    assert r.headers["Location"] == f"/api/v1/admin/training-runs/{run['id']}"
    assert run["status"] == "queued" and run["kind"] == "denoiser"
    assert run["total_steps"] == 500 and run["step"] == 0
    assert run["dataset"] == {"kind": "shapes", "seed": 3}
    assert run["config"]["train"] == {"steps": 500, "lr": 0.0003}
    assert run["config"]["activate"] is True
    assert run["metrics"] == {} and run["samples_url"] is None
    assert publisher.sent == [(TASK_TRAIN, QUEUE_TRAIN, {"run_id": run["id"]})]
    assert count_runs(engine) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "vae", "dataset": {"kind": "shapes"}}, "kind"),
        ({"kind": "denoiser"}, "dataset"),
        ({"kind": "denoiser", "dataset": {"kind": "http", "url": "http://x"}}, "dataset.kind"),
        ({"kind": "denoiser", "dataset": {"kind": "s3", "uri": "https://x/y"}}, "dataset.uri"),
        ({"kind": "denoiser", "dataset": {"kind": "path", "path": "../etc"}}, "dataset.path"),
        ({"kind": "denoiser", "dataset": {"kind": "path", "path": "/etc"}}, "dataset.path"),
        ({**SHAPES_RUN, "config": {"train": {"lr": 0}}}, "config.train.lr"),
        ({**SHAPES_RUN, "config": {"train": {"steps": "many"}}}, "config.train.steps"),
        ({**SHAPES_RUN, "config": {"optimizer": {}}}, "config.optimizer"),
        ({**SHAPES_RUN, "config": {"train": {"lr": float("nan")}}}, "config"),
        ({**SHAPES_RUN, "activate": "yes"}, "activate"),
        ({**SHAPES_RUN, "epochs": 3}, "epochs"),
        (
            {
                "kind": "autoencoder",
                "dataset": {"kind": "shapes"},
                "autoencoder_version_id": str(uuid.uuid4()),
            },
            "autoencoder_version_id",
        ),
    ],
)
def test_bad_runs_get_422_naming_the_field_and_write_nothing(
    client: FlaskClient,
    admin_token: str,
    engine: Engine,
    publisher: RecordingPublisher,
    body: dict[str, Any],
    field: str,
) -> None:
    r = client.post("/api/v1/admin/training-runs", json=body, headers=bearer(admin_token))
    problem = assert_problem(r, 422, field)
    assert any(e["field"] == field for e in problem["errors"]), problem
    assert count_runs(engine) == 0 and publisher.sent == []


def test_a_run_naming_a_missing_version_is_404_and_a_denoiser_version_409(
    client: FlaskClient, admin_token: str, engine: Engine, publisher: RecordingPublisher
) -> None:
    """Schema-valid references to the wrong thing: the document lists these answers."""
    missing = {**SHAPES_RUN, "autoencoder_version_id": str(uuid.uuid4())}
    r = client.post("/api/v1/admin/training-runs", json=missing, headers=bearer(admin_token))
    assert_problem(r, 404, "no model version")
    denoiser = add_version(engine, "d1", kind=ModelKind.DENOISER)
    wrong = {**SHAPES_RUN, "autoencoder_version_id": str(denoiser)}
    r = client.post("/api/v1/admin/training-runs", json=wrong, headers=bearer(admin_token))
    assert_problem(r, 409, "is a denoiser")
    assert count_runs(engine) == 0 and publisher.sent == []
    document = client.get("/api/v1/openapi.json").get_json()
    responses = document["paths"]["/api/v1/admin/training-runs"]["post"]["responses"]
    assert {"404", "409", "422"} <= set(responses)


ADMIN_CALLS = [
    ("post", "/api/v1/admin/training-runs"),
    ("get", "/api/v1/admin/training-runs"),
    ("get", "/api/v1/admin/training-runs/{run}"),
    ("post", "/api/v1/admin/training-runs/{run}/cancel"),
    ("post", "/api/v1/admin/models/{version}/activate"),
    ("post", "/api/v1/admin/models/default/activate"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
def test_a_user_token_gets_403_on_every_admin_endpoint_and_changes_nothing(
    client: FlaskClient, user_token: str, engine: Engine, method: str, path: str
) -> None:
    run_id = add_run(engine)
    version_id = add_version(engine, "v1")
    url = path.format(run=run_id, version=version_id)
    r = getattr(client, method)(url, json=SHAPES_RUN, headers=bearer(user_token))
    assert_problem(r, 403, "admins")
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        version = session.get(ModelVersion, version_id)
        assert run is not None and run.status is JobStatus.QUEUED and not run.cancel_requested
        assert version is not None and not version.is_active
    assert count_runs(engine) == 1


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
def test_no_token_gets_401_on_every_admin_endpoint(
    client: FlaskClient, method: str, path: str
) -> None:
    url = path.format(run=uuid.uuid4(), version=uuid.uuid4())
    assert_problem(getattr(client, method)(url, json=SHAPES_RUN), 401)


def test_list_runs_newest_first_with_status_filter(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    first = add_run(engine)
    second = add_run(engine, JobStatus.RUNNING, step=40)
    page = client.get("/api/v1/admin/training-runs", headers=bearer(admin_token)).get_json()
    assert page["total"] == 2
    assert [r["id"] for r in page["runs"]] == [str(second), str(first)]
    assert "metrics" not in page["runs"][0]
    running = client.get(
        "/api/v1/admin/training-runs?status=running", headers=bearer(admin_token)
    ).get_json()
    assert [(r["id"], r["step"]) for r in running["runs"]] == [(str(second), 40)]


def test_run_detail_has_every_metric_series_and_the_samples(
    client: FlaskClient, admin_token: str, engine: Engine, storage: LocalStorage
) -> None:
    run_id = add_run(engine, JobStatus.RUNNING, step=30)
    with session_scope(engine) as session:
        for step in (10, 20, 30):
            session.add(TrainingMetric(run_id=run_id, step=step, name="loss", value=1.0 / step))
        session.add(TrainingMetric(run_id=run_id, step=30, name="lr", value=2e-4))
    path = f"/api/v1/admin/training-runs/{run_id}"
    run = client.get(path, headers=bearer(admin_token)).get_json()
    assert run["step"] == 30 and run["status"] == "running"
    assert run["metrics"]["loss"] == [
        {"step": 10, "value": pytest.approx(0.1)},
        {"step": 20, "value": pytest.approx(0.05)},
        {"step": 30, "value": pytest.approx(1 / 30)},
    ]
    assert run["metrics"]["lr"] == [{"step": 30, "value": pytest.approx(2e-4)}]
    assert run["samples_url"] is None
    storage.put(f"runs/{run_id}/samples.png", PNG_BYTES, "image/png")
    run = client.get(path, headers=bearer(admin_token)).get_json()
    assert client.get(run["samples_url"]).data == PNG_BYTES


def test_unknown_run_is_404(client: FlaskClient, admin_token: str) -> None:
    path = f"/api/v1/admin/training-runs/{uuid.uuid4()}"
    assert_problem(client.get(path, headers=bearer(admin_token)), 404, "no training run")
    assert_problem(client.post(path + "/cancel", headers=bearer(admin_token)), 404)


def test_cancel_a_queued_run_at_once_and_ask_a_running_one_to_stop(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    queued, running = add_run(engine), add_run(engine, JobStatus.RUNNING)
    r = client.post(f"/api/v1/admin/training-runs/{queued}/cancel", headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["status"] == "canceled"
    r = client.post(f"/api/v1/admin/training-runs/{running}/cancel", headers=bearer(admin_token))
    assert r.get_json()["status"] == "running" and r.get_json()["cancel_requested"] is True
    with session_scope(engine) as session:
        row = session.get(TrainingRun, running)
        assert row is not None and row.cancel_requested


def test_cancel_a_finished_run_is_409(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    done = add_run(engine, JobStatus.SUCCEEDED)
    r = client.post(f"/api/v1/admin/training-runs/{done}/cancel", headers=bearer(admin_token))
    assert_problem(r, 409, "already succeeded")


def test_activate_a_version_then_go_back_to_the_default(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    old = add_version(engine, "v1")
    new = add_version(engine, "v2", metrics={"clip": 0.3})
    client.post(f"/api/v1/admin/models/{old}/activate", headers=bearer(admin_token))
    r = client.post(f"/api/v1/admin/models/{new}/activate", headers=bearer(admin_token))
    assert r.status_code == 200
    body = r.get_json()
    assert body["serving"]["name"] == "v2" and body["serving"]["id"] == str(new)
    assert {v["name"]: v["is_active"] for v in body["versions"]} == {"v1": False, "v2": True}
    r = client.post("/api/v1/admin/models/default/activate", headers=bearer(admin_token))
    assert r.get_json()["serving"] == {**r.get_json()["serving"], "name": "default", "id": None}
    assert not any(v["is_active"] for v in r.get_json()["versions"])


def test_activate_an_unknown_version_is_404(client: FlaskClient, admin_token: str) -> None:
    r = client.post(f"/api/v1/admin/models/{uuid.uuid4()}/activate", headers=bearer(admin_token))
    assert_problem(r, 404, "no model version")
