"""The webhook API: targets checked at submission, the signing key and its rotation, a job's
delivery log and replay, and failing endpoints for admins."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.engine import Engine
from standardwebhooks import Webhook

from core.db import Job, JobStatus, session_scope
from core.runtime.settings import Settings
from core.services.webhooks.delivery import deliver
from tests.core.test_webhooks import Receiver
from tests.web.conftest import RecordingPublisher, add_job, bearer
from tests.web.test_api_jobs import assert_problem

OPEN = Settings.from_env({}, webhook_allowed_networks="127.0.0.0/8")


def _submit(client: FlaskClient, token: str, **fields: Any) -> Any:
    body = {"prompt": "a red circle", **fields}
    return client.post("/api/v1/jobs", json=body, headers=bearer(token))


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "http://127.0.0.1:8000/hook",
        "https://localhost/hook",
        "https://[::1]/hook",
        "https://10.0.0.5/hook",
        "https://172.16.3.4/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data/",
    ],
)
def test_loopback_private_and_metadata_targets_are_refused_with_422(
    client: FlaskClient, user_token: str, url: str
) -> None:
    r = _submit(client, user_token, webhook=url)
    assert r.status_code == 422, r.get_json()
    assert r.content_type == "application/problem+json"
    assert [e["field"] for e in r.get_json()["errors"]] == ["webhook"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"webhook": "http://hooks.example.com/x"}, "webhook"),
        ({"webhook": "https://u:p@hooks.example.com/x"}, "webhook"),
        ({"webhook": "https://hooks.example.com/" + "a" * 2100}, "webhook"),
        ({"webhook": 5}, "webhook"),
        ({"webhook": "https://a.example.com/", "webhook_events_filter": ["done"]}, "filter"),
        ({"webhook": "https://a.example.com/", "webhook_events_filter": []}, "filter"),
    ],
)
def test_malformed_targets_and_filters_get_422_naming_the_field(
    client: FlaskClient, user_token: str, fields: dict[str, Any], field: str
) -> None:
    r = _submit(client, user_token, **fields)
    assert r.status_code == 422
    name = r.get_json()["errors"][0]["field"]
    assert name.startswith("webhook_events_filter" if field == "filter" else "webhook")


def test_a_job_shows_its_webhook_and_filter(client: FlaskClient, user_token: str) -> None:
    # The test machine resolves no public name: accepted, and checked again at every try.
    r = _submit(
        client,
        user_token,
        webhook="https://hooks.example.com/dq?x=1",
        webhook_events_filter=["failed", "completed"],
    )
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["webhook"] == "https://hooks.example.com/dq?x=1"
    assert job["webhook_events_filter"] == ["completed", "failed"]
    plain = _submit(client, user_token).get_json()
    assert plain["webhook"] is None and plain["webhook_events_filter"] is None


@pytest.mark.parametrize(
    ("delivery_id", "detail"),
    [
        (2**63 - 1, "has no webhook delivery"),  # the largest BIGINT: looked up, not there
        (2**63, "There is nothing at"),  # no BIGINT holds it: no route, as for a malformed id
        (2**64 + 7, "There is nothing at"),
        (10**30, "There is nothing at"),
    ],
)
def test_a_delivery_id_beyond_what_a_bigint_holds_is_404_not_a_database_error(
    client: FlaskClient, user_token: str, delivery_id: int, detail: str
) -> None:
    job_id = _submit(client, user_token).get_json()["id"]
    path = f"/api/v1/jobs/{job_id}/webhooks/{delivery_id}/replay"
    assert_problem(client.post(path, headers=bearer(user_token)), 404, detail)


def test_the_key_is_made_once_per_token_and_rotation_keeps_the_old_one_signing(
    client: FlaskClient, user_token: str, other_token: str
) -> None:
    first = client.get("/api/v1/webhooks/secret", headers=bearer(user_token)).get_json()
    again = client.get("/api/v1/webhooks/secret", headers=bearer(user_token)).get_json()
    other = client.get("/api/v1/webhooks/secret", headers=bearer(other_token)).get_json()
    assert first["key"].startswith("whsec_") and first == again and other["key"] != first["key"]
    assert first["previous_key_valid_until"] is None
    r = client.post("/api/v1/webhooks/secret/rotate", headers=bearer(user_token))
    assert r.status_code == 200
    rotated = r.get_json()
    assert rotated["key"] != first["key"] and rotated["previous_key_valid_until"] is not None
    now = client.get("/api/v1/webhooks/secret", headers=bearer(user_token)).get_json()
    assert now["key"] == rotated["key"]
    assert client.get("/api/v1/webhooks/secret").status_code == 401


def _owner(client: FlaskClient, token: str) -> str:
    """The owner string of a token: the owner of a job it submits."""
    job_id = _submit(client, token).get_json()["id"]
    with session_scope(client.application.extensions["dq"].engine) as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job.owner


def test_delivery_log_replay_and_failing_endpoints(
    client: FlaskClient,
    engine: Engine,
    user_token: str,
    other_token: str,
    admin_token: str,
    publisher: RecordingPublisher,
) -> None:
    receiver = Receiver([503])
    try:
        owner = _owner(client, user_token)
        job_id = add_job(engine, owner, webhook_url=receiver.url)
        with session_scope(engine) as s:
            s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELED))
        path = f"/api/v1/jobs/{job_id}/webhooks"
        (pending,) = client.get(path, headers=bearer(user_token)).get_json()["deliveries"]
        assert (pending["event"], pending["state"], pending["tries"]) == ("canceled", "pending", [])
        assert deliver(engine, pending["id"], OPEN).state == "pending"

        (failing,) = client.get(path, headers=bearer(user_token)).get_json()["deliveries"]
        assert failing["state"] == "pending" and failing["next_attempt_at"] is not None
        (attempt,) = failing["tries"]
        assert attempt["attempt"] == 1 and attempt["status_code"] == 503
        assert attempt["latency_ms"] >= 0 and "503" in attempt["error"]
        assert client.get(path, headers=bearer(other_token)).status_code == 404

        failing_list = client.get(
            "/api/v1/admin/webhooks/failing", headers=bearer(admin_token)
        ).get_json()["endpoints"]
        assert [(e["owner"], e["url"], e["retrying"]) for e in failing_list] == [
            (owner, receiver.url, 1)
        ]
        user = client.get("/api/v1/admin/webhooks/failing", headers=bearer(user_token))
        assert user.status_code == 403

        replay = f"{path}/{failing['id']}/replay"
        assert client.post(replay, headers=bearer(other_token)).status_code == 404
        assert client.post(f"{path}/999999/replay", headers=bearer(user_token)).status_code == 404
        r = client.post(replay, headers=bearer(user_token))
        assert r.status_code == 202
        (due,) = r.get_json()["deliveries"]
        assert due["state"] == "pending"
        assert ("dq.deliver_webhook", "webhooks", {"delivery_id": due["id"]}) in publisher.sent
        assert deliver(engine, due["id"], OPEN).state == "delivered"
        key = client.get("/api/v1/webhooks/secret", headers=bearer(user_token)).get_json()["key"]
        headers, body = receiver.requests[-1]
        assert Webhook(key).verify(body, headers)["data"]["id"] == str(job_id)
        assert len({h["webhook-id"] for h, _ in receiver.requests}) == 1
    finally:
        receiver.close()
