"""The audit trail: each admin action leaves a row (who, what, which thing, the request id and
address) in its own transaction, and admins read it, a page at a time, through the API and on
a page."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.db import session_scope
from core.db.models import AuditEvent
from core.services.audit import record
from core.services.tokens import create_token, revoke_token
from tests.web.conftest import add_version, bearer, csrf_token
from tests.web.test_admin_api import SHAPES_RUN, add_run
from tests.web.test_admin_sessions import sign_in, sign_out, token_id
from tests.web.test_api_jobs import assert_problem


def events(engine: Engine, **where: str) -> list[AuditEvent]:
    """Audit rows, oldest first, e.g. ``events(engine, action="run.cancel")``."""
    query = select(AuditEvent).order_by(AuditEvent.id)
    for column, value in where.items():
        query = query.where(getattr(AuditEvent, column) == value)
    with session_scope(engine) as session:
        return list(session.scalars(query))


def rid(value: str) -> dict[str, str]:
    return {"X-Request-ID": value}


def test_admin_api_actions_are_recorded_with_actor_target_and_request_id(
    client: FlaskClient, admin_token: str, user_token: str, engine: Engine
) -> None:
    admin = f"token:{token_id(engine, admin_token)}"
    headers = {**bearer(admin_token), **rid("req-run")}
    run_id = client.post(
        "/api/v1/admin/training-runs", json=SHAPES_RUN, headers=headers
    ).get_json()["id"]
    client.post(
        f"/api/v1/admin/training-runs/{run_id}/cancel",
        headers={**bearer(admin_token), **rid("req-cancel")},
    )
    version = add_version(engine, "shapes-v2")
    client.post(
        f"/api/v1/admin/models/{version}/activate",
        headers={**bearer(admin_token), **rid("req-activate")},
    )
    client.post("/api/v1/admin/models/default/activate", headers=bearer(admin_token))
    user = token_id(engine, user_token)
    client.post(
        f"/api/v1/admin/tokens/{user}/revoke", headers={**bearer(admin_token), **rid("req-rev")}
    )
    done = [
        (e.actor, e.action, e.target, e.request_id, e.client)
        for e in events(engine)
        if e.actor == admin
    ]
    assert done[:4] == [
        (admin, "run.create", f"run:{run_id}", "req-run", "127.0.0.1"),
        (admin, "run.cancel", f"run:{run_id}", "req-cancel", "127.0.0.1"),
        (admin, "model.activate", f"model:{version}", "req-activate", "127.0.0.1"),
        (admin, "model.activate", "model:default", done[3][3], "127.0.0.1"),
    ]
    assert done[4] == (admin, "token.revoke", f"token:{user}", "req-rev", "127.0.0.1")
    (revoked,) = events(engine, action="token.revoke")
    assert revoked.detail == {"role": "user", "sessions_ended": 0}
    (cancel,) = events(engine, action="run.cancel")
    assert cancel.detail["status"] == "canceled"


def test_a_refused_action_leaves_no_audit_row(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    r = client.post(f"/api/v1/admin/models/{missing}/activate", headers=bearer(admin_token))
    assert r.status_code == 404
    r = client.post(
        "/api/v1/admin/training-runs", json={"kind": "vae"}, headers=bearer(admin_token)
    )
    assert r.status_code == 422
    assert [e.action for e in events(engine)] == ["token.create"]  # the fixture's token only


def test_admin_page_actions_and_sign_ins_are_recorded(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    admin = f"token:{token_id(engine, admin_token)}"
    sign_in(client, admin_token)
    version = add_version(engine, "shapes-v3")
    run_id = add_run(engine)
    csrf = csrf_token(client, "/admin/runs")
    form = {"kind": "denoiser", "dataset_kind": "shapes", "autoencoder_version_id": ""}
    r = client.post("/admin/runs", data={**form, "csrf_token": csrf}, headers=rid("page-run"))
    assert r.status_code == 303
    r = client.post(f"/admin/runs/{run_id}/cancel", data={"csrf_token": csrf}, headers=rid("pc"))
    assert r.status_code == 303
    r = client.post(f"/admin/models/{version}/activate", data={"csrf_token": csrf})
    assert r.status_code == 303
    sign_out(client)
    mine = events(engine, actor=admin)
    assert [e.action for e in mine] == [
        "sign_in",
        "run.create",
        "run.cancel",
        "model.activate",
        "sign_out",
    ]
    assert mine[0].target == mine[-1].target and mine[0].target.startswith("session:")
    assert mine[0].detail == {"role": "admin"} and mine[0].client == "127.0.0.1"
    assert (mine[1].request_id, mine[2].request_id) == ("page-run", "pc")
    assert mine[2].target == f"run:{run_id}" and mine[3].target == f"model:{version}"


def test_tokens_made_and_revoked_by_the_dq_command_are_recorded_as_cli(engine: Engine) -> None:
    with session_scope(engine) as session:
        row, plaintext = create_token(session, "user", "carol")
        revoke_token(session, plaintext)
        revoke_token(session, plaintext)  # again: nothing changes, nothing is recorded
    made, revoked = events(engine)
    assert (made.actor, made.action, made.target) == ("cli", "token.create", f"token:{row.id}")
    assert made.detail == {"role": "user", "label": "carol"}
    assert (revoked.actor, revoked.action, revoked.target) == ("cli", "token.revoke", made.target)


def fill(engine: Engine, count: int) -> None:
    with session_scope(engine) as session:
        for i in range(count):
            action = "run.create" if i % 2 else "model.activate"
            record(session, f"token:{100 + i % 3}", action, f"thing:{i}", request_id=f"r{i}")


def test_the_api_pages_back_newest_first_and_filters(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    fill(engine, 7)  # after the fixture's token.create: 8 events in all
    seen: list[str] = []
    before: int | None = None
    pages = 0
    while True:
        query = f"?limit=3&before={before}" if before else "?limit=3"
        body = client.get(f"/api/v1/admin/audit{query}", headers=bearer(admin_token)).get_json()
        seen += [e["target"] for e in body["events"]]
        pages += 1
        before = body["next_before"]
        if before is None:
            break
    assert pages == 3 and seen[:7] == [f"thing:{i}" for i in range(6, -1, -1)]
    assert seen[7].startswith("token:")
    first = client.get("/api/v1/admin/audit?limit=1", headers=bearer(admin_token)).get_json()
    (event,) = first["events"]
    assert set(event) == {
        "id",
        "at",
        "actor",
        "action",
        "target",
        "detail",
        "request_id",
        "client",
    }
    assert event["request_id"] == "r6" and event["at"].endswith("+00:00")
    runs = client.get("/api/v1/admin/audit?action=run.create", headers=bearer(admin_token))
    assert [e["target"] for e in runs.get_json()["events"]] == ["thing:5", "thing:3", "thing:1"]
    by = client.get("/api/v1/admin/audit?actor=token:101", headers=bearer(admin_token))
    assert [e["target"] for e in by.get_json()["events"]] == ["thing:4", "thing:1"]


def test_the_audit_api_refuses_bad_queries_and_non_admins(
    client: FlaskClient, admin_token: str, user_token: str
) -> None:
    for query in (
        "limit=201",
        "limit=0",
        "before=-1",
        "action=drop.table",
        "actor=token%001",  # PostgreSQL text holds no NUL
        "colour=red",
    ):
        r = client.get(f"/api/v1/admin/audit?{query}", headers=bearer(admin_token))
        assert_problem(r, 422)
    body = assert_problem(client.get("/api/v1/admin/audit", headers=bearer(user_token)), 403)
    assert "admins" in body["detail"] and body["request_id"]
    assert_problem(client.get("/api/v1/admin/audit"), 401)


def test_the_audit_page_shows_the_trail_to_admins_only(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    assert client.get("/admin/audit").headers["Location"].startswith("/admin/login")
    fill(engine, 3)
    sign_in(client, admin_token)
    page = client.get("/admin/audit")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and 'href="/admin/audit"' in html  # in the navigation
    assert "<td>thing:2</td>" in html and "<code>r2</code>" in html and "<td>sign_in</td>" in html
    only = client.get("/admin/audit?action=run.create").get_data(as_text=True)
    assert "<td>thing:1</td>" in only and "<td>thing:2</td>" not in only
    assert client.get("/admin/audit?actor=token%00").status_code == 200
    bad = client.get("/admin/audit?action=nope")
    assert bad.status_code == 400 and "no audit action" in bad.get_data(as_text=True)


def test_audit_rows_are_not_written_for_reads(
    client: FlaskClient, admin_token: str, engine: Engine
) -> Any:
    client.get("/api/v1/admin/training-runs", headers=bearer(admin_token))
    client.get("/api/v1/admin/audit", headers=bearer(admin_token))
    assert [e.action for e in events(engine)] == ["token.create"]
