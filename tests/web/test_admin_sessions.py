"""Browser sign-ins are server-side state: sign-out and token revocation end them at once, a
forged or replayed cookie gets nothing, signing in rotates the session, and with
DQ_FORM_REQUIRES_LOGIN only a signed-in browser may queue and see jobs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from core.db import ApiToken, session_scope, utcnow
from core.db.models import AdminSession
from core.services.tokens import SIGN_IN_LIFETIME, create_token, hash_token
from tests.web.conftest import RecordingPublisher, add_job, bearer, csrf_token, make_settings
from tests.web.test_pages import FORM, field_errors

COOKIE = "session"


def sign_in(client: FlaskClient, token: str, path: str = "/admin/login") -> Any:
    return client.post(path, data={"token": token, "csrf_token": csrf_token(client, path)})


def sign_out(client: FlaskClient) -> Any:
    return client.post("/logout", data={"csrf_token": csrf_token(client, "/login")})


def cookie_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None
    return cookie.value


def with_cookie(app: Any, value: str) -> FlaskClient:
    """A second browser that replays a saved cookie."""
    other: FlaskClient = app.test_client()
    other.set_cookie(COOKIE, value)
    return other


def session_data(app: Any, client: FlaskClient) -> dict[str, Any]:
    data: dict[str, Any] = app.session_interface.get_signing_serializer(app).loads(
        cookie_of(client)
    )
    return data


def token_id(engine: Engine, plaintext: str) -> int:
    with session_scope(engine) as session:
        found = session.scalar(
            select(ApiToken.id).where(ApiToken.token_hash == hash_token(plaintext))
        )
    assert found is not None
    return found


def sign_ins(engine: Engine) -> list[AdminSession]:
    with session_scope(engine) as session:
        return list(session.scalars(select(AdminSession).order_by(AdminSession.created_at)))


def is_admin(client: FlaskClient) -> bool:
    return client.get("/admin/runs").status_code == 200


def test_a_signed_out_cookie_no_longer_grants_admin(
    app: Any, client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    assert sign_in(client, admin_token).status_code == 303
    saved = cookie_of(client)
    assert is_admin(client) and is_admin(with_cookie(app, saved))
    assert sign_out(client).status_code == 303
    assert not is_admin(client)
    replay = with_cookie(app, saved)  # the cookie as it was before signing out
    assert replay.get("/admin/runs").headers["Location"].startswith("/admin/login")
    (row,) = sign_ins(engine)
    assert row.ended_at is not None and row.token_id == token_id(engine, admin_token)


def test_revoking_the_token_through_the_api_signs_its_browsers_out_at_once(
    client: FlaskClient, admin_token: str, user_token: str, engine: Engine
) -> None:
    with session_scope(engine) as session:
        _, other_admin = create_token(session, "admin", "second admin")
    sign_in(client, admin_token)
    assert is_admin(client)
    revoked = token_id(engine, admin_token)
    r = client.post(f"/api/v1/admin/tokens/{revoked}/revoke", headers=bearer(other_admin))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["id"] == revoked and r.get_json()["revoked_at"]
    assert not is_admin(client)  # the very next request: no cache to wait out
    assert all(row.ended_at is not None for row in sign_ins(engine))
    # The API forgets the token at once too, in this process.
    assert client.get("/api/v1/admin/training-runs", headers=bearer(admin_token)).status_code == 401


def test_the_api_will_not_revoke_the_calling_token_or_one_that_does_not_exist(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    own = token_id(engine, admin_token)
    r = client.post(f"/api/v1/admin/tokens/{own}/revoke", headers=bearer(admin_token))
    assert r.status_code == 409 and "calling with" in r.get_json()["detail"]
    assert client.get("/api/v1/admin/training-runs", headers=bearer(admin_token)).status_code == 200
    for missing in (999999, 2**31, 2**70):  # beyond 2**31 - 1, no integer column holds it
        r = client.post(f"/api/v1/admin/tokens/{missing}/revoke", headers=bearer(admin_token))
        assert r.status_code == 404 and r.mimetype == "application/problem+json"
        assert f"no token {missing}" in r.get_json()["detail"]


def test_a_forged_or_unknown_sign_in_secret_gets_nothing(
    app: Any, client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    sign_in(client, admin_token)
    (row,) = sign_ins(engine)
    serializer = app.session_interface.get_signing_serializer(app)
    for secret in ["made-up", row.id, "x" * 500, 7]:  # row.id: a copy of the database's hash
        forged = with_cookie(app, serializer.dumps({"sign_in": secret}))
        assert not is_admin(forged), secret
        assert "Sign out" not in forged.get("/").get_data(as_text=True)
    unsigned = with_cookie(app, "eyJzaWduX2luIjoieCJ9.bad.signature")
    assert not is_admin(unsigned)


def test_signing_in_rotates_the_session(
    app: Any, client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    client.get("/jobs")  # an anonymous visit: the cookie gets an owner id
    planted = cookie_of(client)  # what an attacker could have planted in this browser
    assert "owner" in session_data(app, client)
    sign_in(client, admin_token)
    first = session_data(app, client)
    assert set(first) == {"sign_in", "_permanent"}  # nothing from before the sign-in survives
    sign_in(client, admin_token)
    second = session_data(app, client)
    assert second["sign_in"] != first["sign_in"]
    old, new = sign_ins(engine)
    assert old.ended_at is not None and new.ended_at is None  # the earlier sign-in was ended
    assert not is_admin(with_cookie(app, planted))
    assert is_admin(client)


def test_a_sign_in_ends_after_its_lifetime_and_last_seen_moves_once_a_minute(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    sign_in(client, admin_token)
    two_minutes_ago = utcnow() - timedelta(minutes=2)
    with session_scope(engine) as session:
        session.execute(update(AdminSession).values(last_seen_at=two_minutes_ago))
    assert is_admin(client)
    (seen,) = sign_ins(engine)
    assert seen.last_seen_at > two_minutes_ago + timedelta(seconds=60)
    assert is_admin(client)
    (again,) = sign_ins(engine)
    assert again.last_seen_at == seen.last_seen_at  # not on every request
    with session_scope(engine) as session:
        born = utcnow() - SIGN_IN_LIFETIME - timedelta(seconds=1)
        session.execute(update(AdminSession).values(created_at=born))
    assert not is_admin(client)


def test_a_user_token_signs_in_on_the_sign_in_page_but_not_as_an_admin(
    client: FlaskClient, user_token: str, engine: Engine
) -> None:
    r = sign_in(client, user_token, "/admin/login")
    assert r.status_code == 401
    r = sign_in(client, user_token, "/login")
    assert r.status_code == 303 and r.headers["Location"] == "/"
    assert "Sign out" in client.get("/").get_data(as_text=True)
    assert client.get("/admin/runs").headers["Location"].startswith("/admin/login")
    r = sign_in(client, "dq_not-a-token", "/login")
    assert r.status_code == 401
    assert field_errors(r.get_data(as_text=True), "token") == ["This is not a live token."]


# --- DQ_FORM_REQUIRES_LOGIN -----------------------------------------------------------------


@pytest.fixture
def locked_app(db_url: str, tmp_path: Path, engine: Engine) -> Any:
    from web import create_app

    settings = make_settings(db_url, tmp_path, form_requires_login=True)
    return create_app(settings, publisher=RecordingPublisher())


def test_with_login_required_anonymous_visitors_are_asked_to_sign_in(
    locked_app: Any, jobs_of: Any, engine: Engine
) -> None:
    client = locked_app.test_client()
    page = client.get("/")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "Sign in with your token" in html
    assert 'name="prompt"' not in html
    csrf = csrf_token(client, "/login")
    r = client.post("/", data={**FORM, "csrf_token": csrf})
    assert r.status_code == 401 and "Sign in with your token first" in r.get_data(as_text=True)
    assert jobs_of() == []
    assert client.get("/jobs").headers["Location"] == "/login?next=/jobs"
    job_id = add_job(engine, "session:someone")
    assert client.get(f"/jobs/{job_id}").status_code == 302
    assert client.get(f"/jobs/{job_id}.json").status_code == 401


def test_with_login_required_a_user_token_submits_and_sees_its_job_as_through_the_api(
    locked_app: Any, user_token: str, engine: Engine
) -> None:
    client = locked_app.test_client()
    r = sign_in(client, user_token, "/login?next=/")
    assert r.status_code == 303 and r.headers["Location"] == "/"
    assert 'name="prompt"' in client.get("/").get_data(as_text=True)
    r = client.post("/", data={**FORM, "csrf_token": csrf_token(client, "/")})
    assert r.status_code == 303
    job_page = client.get(r.headers["Location"])
    assert job_page.status_code == 200
    listed = client.get("/api/v1/jobs", headers=bearer(user_token)).get_json()["jobs"]
    assert [job["id"] for job in listed] == [r.headers["Location"].rsplit("/", 1)[1]]
    sign_out(client)
    assert client.get(r.headers["Location"]).status_code == 302


def test_without_login_required_anonymous_visitors_use_the_form(
    client: FlaskClient, jobs_of: Any
) -> None:
    assert 'name="prompt"' in client.get("/").get_data(as_text=True)
    r = client.post("/", data={**FORM, "csrf_token": csrf_token(client)})
    assert r.status_code == 303
    (job,) = jobs_of()
    assert job.owner.startswith("session:")
