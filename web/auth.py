"""Who is calling: an API token (``Authorization: Bearer …``), a browser signed in with a
token (its sign-in checked against server-side state on every request), or an anonymous form
user known by a random id in their session cookie.

Each becomes a :class:`web.caller.Caller`. A browser signed in with a token acts as that token:
the same owner, the same jobs.
"""

from __future__ import annotations

import logging
import secrets
from urllib.parse import urlsplit

from flask import g, request, session
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db.models import AdminSession, ApiToken, Role
from core.services.tokens import (
    authenticate,
    end_sign_in,
    hash_token,
    signed_in,
    start_sign_in,
    touch_sign_in,
)
from web.audit import audited_session
from web.caller import Caller
from web.db import READ_METHODS, get_session
from web.problems import Problem
from web.services import services

log = logging.getLogger(__name__)

SESSION_OWNER_KEY = "owner"


def _unauthorized(detail: str, error: str | None = None) -> Problem:
    challenge = 'Bearer realm="diffusion-queue"'
    if error:
        challenge += f', error="{error}"'
    return Problem(401, detail, headers={"WWW-Authenticate": challenge})


def bearer_caller() -> Caller:
    """The API caller of this request, or 401. Cached on ``g`` for the request."""
    cached: Caller | None = g.get("caller")
    if cached is not None:
        return cached
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise _unauthorized(
            "This endpoint needs an API token: send 'Authorization: Bearer <token>' "
            "(an operator makes one with `dq token create`)."
        )
    cache = services().token_cache
    token_hash = hash_token(value)
    caller = cache.get(token_hash)
    if caller is None:
        token = authenticate(get_session(), value)
        if token is None:
            raise _unauthorized("The API token is not valid or has been revoked.", "invalid_token")
        caller = Caller(owner=f"token:{token.id}", is_admin=token.role is Role.ADMIN)
        cache.put(token_hash, caller)
    g.caller = caller
    return caller


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise Problem(403, "This endpoint is for admins; your token has the user role.")


# --- the HTML pages -------------------------------------------------------------------------

# The cookie (Flask's signed session) holds the random secret of the browser's sign-in; the
# server keeps only its hash (core.services.tokens.start_sign_in) and checks it on every request.
SIGN_IN_KEY = "sign_in"


def session_owner() -> str:
    """The owner string of an anonymous browser, made on first use."""
    sid = session.get(SESSION_OWNER_KEY)
    if not isinstance(sid, str) or not sid:
        sid = secrets.token_hex(16)
        session[SESSION_OWNER_KEY] = sid
        session.permanent = True
    return f"session:{sid}"


def _touch(row: AdminSession) -> None:
    """last_seen_at, at most once a minute. A write request's own transaction carries it; a
    read request's session cannot write, so a short transaction of its own does, and a failure
    there only leaves last_seen_at a little stale."""
    if request.method not in READ_METHODS:
        touch_sign_in(get_session(), row)
        return
    try:
        with Session(services().engine) as db, db.begin():
            touch_sign_in(db, row)
    except SQLAlchemyError as e:
        log.debug("last_seen_at of a sign-in not updated: %s", e)


def signed_in_token() -> ApiToken | None:
    """The live token this browser signed in with (any role), checked against the server's
    sign-in row on every request; None, and the cookie forgets its secret, once that sign-in
    has ended, grown too old or lost its token."""
    if "sign_in_token" in g:
        cached: ApiToken | None = g.sign_in_token
        return cached
    token = None
    secret = session.get(SIGN_IN_KEY)
    if secret is not None:
        found = signed_in(get_session(), secret) if isinstance(secret, str) else None
        if found is None:
            session.pop(SIGN_IN_KEY, None)
        else:
            row, token = found
            _touch(row)
    g.sign_in_token = token
    return token


def logged_in_admin() -> ApiToken | None:
    """The admin token this browser signed in with, while its sign-in is live."""
    token = signed_in_token()
    return token if token is not None and token.role is Role.ADMIN else None


def page_caller() -> Caller:
    """A browser: the token it signed in with (so it sees what that token sees through the
    API, everything for an admin), or else its anonymous session owner."""
    cached: Caller | None = g.get("page_caller")
    if cached is not None:
        return cached
    token = signed_in_token()
    if token is None:
        caller = Caller(owner=session_owner())
    else:
        is_admin = token.role is Role.ADMIN
        caller = Caller(owner=f"token:{token.id}", is_admin=is_admin, signed_in=True)
    g.page_caller = caller
    return caller


def sign_in(token_plaintext: str, *, admin_only: bool) -> ApiToken | None:
    """Sign this browser in with a live token (an admin token only, with ``admin_only``);
    None, and nothing changes, when it is not one.

    The session is rotated: the cookie is cleared before it gets the new secret, so nothing
    planted in it beforehand (an anonymous owner id, another sign-in) carries over, and a
    sign-in it held is ended.
    """
    db = audited_session()
    token = authenticate(db, token_plaintext.strip())
    if token is None or (admin_only and token.role is not Role.ADMIN):
        return None
    previous = session.get(SIGN_IN_KEY)
    if isinstance(previous, str):
        end_sign_in(db, previous)
    _row, secret = start_sign_in(
        db, token, client=request.remote_addr, user_agent=request.user_agent.string
    )
    db.commit()
    session.clear()
    session[SIGN_IN_KEY] = secret
    session.permanent = True
    g.pop("page_caller", None)
    g.sign_in_token = token
    return token


def sign_out() -> None:
    """End this browser's sign-in on the server, and start it afresh as anonymous."""
    secret = session.get(SIGN_IN_KEY)
    if isinstance(secret, str):
        db = audited_session()
        end_sign_in(db, secret)
        db.commit()
    session.clear()
    g.pop("page_caller", None)
    g.sign_in_token = None


# Browsers drop tabs and newlines from a URL and read a backslash as a slash, so
# "/\t/evil.example" and "/\\evil.example" both mean //evil.example: another site.
_CONTROL = dict.fromkeys([*range(0x20), 0x7F])


def safe_next(target: str | None, fallback: str) -> str:
    """Only a path on this site, never //elsewhere or a full URL: no open redirect."""
    cleaned = (target or "").translate(_CONTROL).strip()
    parts = urlsplit(cleaned)
    if (
        cleaned.startswith("/")
        and not cleaned.startswith("//")
        and "\\" not in cleaned
        and not parts.scheme
        and not parts.netloc
    ):
        return cleaned
    return fallback
