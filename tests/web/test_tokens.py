"""API tokens: made once, stored as a hash, revoked; and the ``dq token`` commands."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.db import ApiToken, Role, session_scope
from core.services.tokens import (
    TokenNotFound,
    authenticate,
    create_token,
    list_tokens,
    revoke_token,
)
from tests.web.conftest import bearer

REPO = Path(__file__).resolve().parents[2]


def test_only_the_hash_of_a_token_is_stored(engine: Engine) -> None:
    with session_scope(engine) as session:
        _row, plaintext = create_token(session, "admin", "ci")
    assert plaintext.startswith("dq_") and len(plaintext) == 3 + 43
    with session_scope(engine) as session:
        stored = session.scalar(select(ApiToken))
        assert stored is not None
        assert stored.token_hash == hashlib.sha256(plaintext.encode()).hexdigest()
        assert plaintext not in (stored.token_hash, stored.label)
        assert stored.role is Role.ADMIN and stored.label == "ci"


def test_authenticate_finds_live_tokens_only(engine: Engine) -> None:
    with session_scope(engine) as session:
        row, plaintext = create_token(session, Role.USER)
        token_id = row.id
    with session_scope(engine) as session:
        found = authenticate(session, plaintext)
        assert found is not None and found.id == token_id
        assert authenticate(session, plaintext + "x") is None
        assert authenticate(session, "not-even-prefixed") is None
        assert authenticate(session, "dq_" + "a" * 500) is None
        revoke_token(session, token_id)
    with session_scope(engine) as session:
        assert authenticate(session, plaintext) is None


def test_revoke_by_id_or_by_value_and_unknown_tokens(engine: Engine) -> None:
    with session_scope(engine) as session:
        a, _ = create_token(session, "user")
        b, b_plain = create_token(session, "user")
        a_id, b_id = a.id, b.id
    with session_scope(engine) as session:
        first = revoke_token(session, str(a_id)).revoked_at
        assert revoke_token(session, b_plain).id == b_id
        assert revoke_token(session, a_id).revoked_at == first  # revoking again changes nothing
        with pytest.raises(TokenNotFound, match="no token has id 999"):
            revoke_token(session, "999")
        with pytest.raises(TokenNotFound, match="that value"):
            revoke_token(session, "dq_unknown")
        assert [t.id for t in list_tokens(session)] == [a_id, b_id]


def test_bad_role_and_long_label_are_refused(engine: Engine) -> None:
    with session_scope(engine) as session:
        with pytest.raises(ValueError, match="role must be user or admin"):
            create_token(session, "root")
        with pytest.raises(ValueError, match="label is 201 characters"):
            create_token(session, "user", "x" * 201)


# --- dq token -------------------------------------------------------------------------------


def dq(*args: str, db_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env["DQ_DATABASE_URL"] = db_url
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_dq_token_create_list_revoke(db_url: str) -> None:
    assert dq("db", "upgrade", db_url=db_url).returncode == 0
    made = dq("token", "create", "--role", "admin", "--label", "deploy bot", db_url=db_url)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dq_")  # the token alone, on stdout
    assert "shown once" in made.stderr
    listing = dq("token", "list", db_url=db_url)
    assert listing.returncode == 0 and lines[0] not in listing.stdout
    token_id, role, _created, revoked, label = listing.stdout.strip().split("\t")
    assert (role, revoked, label) == ("admin", "-", "deploy bot")
    gone = dq("token", "revoke", token_id, db_url=db_url)
    assert gone.returncode == 0 and gone.stdout.strip() == f"token {token_id} is revoked"
    assert dq("token", "list", db_url=db_url).stdout.split("\t")[3] != "-"
    from core.db import make_engine

    engine = make_engine(db_url)
    try:
        with session_scope(engine) as session:
            assert authenticate(session, lines[0]) is None
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "create", "--role", "root"], "Invalid value for '--role'"),
        (["token", "revoke", "42"], "dq: error: no token has id 42"),
    ],
)
def test_dq_token_errors_are_one_line(db_url: str, args: list[str], message: str) -> None:
    assert dq("db", "upgrade", db_url=db_url).returncode == 0
    r = dq(*args, db_url=db_url)
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr


def test_dq_token_before_the_migrations_says_to_run_them(db_url: str) -> None:
    r = dq("token", "create", "--role", "user", db_url=db_url)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (
        "dq: error: the database has no api_tokens table; run `dq db upgrade` first"
    )


def test_me_says_who_a_token_acts_for_and_its_limits(
    client: FlaskClient, engine: Engine, user_token: str, admin_token: str
) -> None:
    """GET /api/v1/me: the owner string its jobs carry, the role, and the submission limits;
    401 without a valid token."""
    from core.services.tokens import hash_token

    me = client.get("/api/v1/me", headers=bearer(user_token))
    assert me.status_code == 200
    with session_scope(engine) as session:
        row = session.scalars(
            select(ApiToken).where(ApiToken.token_hash == hash_token(user_token))
        ).one()
        assert me.json["owner"] == f"token:{row.id}"
    assert me.json["role"] == "user"
    settings = client.application.extensions["dq"].settings
    assert me.json["limits"] == {
        "max_steps": settings.max_steps,
        "max_images_per_job": settings.max_images_per_job,
        "max_prompt_chars": settings.max_prompt_chars,
        "max_active_jobs": settings.max_active_jobs_per_owner,
        "rate_limit": settings.rate_limit,
    }
    assert client.get("/api/v1/me", headers=bearer(admin_token)).json["role"] == "admin"
    for headers in ({}, bearer("dq_not-a-token")):
        refused = client.get("/api/v1/me", headers=headers)
        assert refused.status_code == 401 and refused.json["status"] == 401
