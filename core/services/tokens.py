"""API bearer tokens: made once, stored as a SHA-256 hash, looked up by that hash, revoked.

A token is ``dq_`` followed by 43 URL-safe characters (32 random bytes). Only its SHA-256 is kept
in ``api_tokens.token_hash``, so a copy of the database does not let anyone call the API; the
plaintext is shown once, when ``dq token create`` makes it. The random part carries 256 bits, so a
plain unsalted hash is enough: there is nothing to guess.

Browser sign-ins live here too. A browser that signs in with a token gets a row in
``admin_sessions`` (for any role; the name is historical) whose id is the SHA-256 of a random
secret, and its cookie holds only that secret. Every request checks the row: it must not be
ended, nor older than :data:`SIGN_IN_LIFETIME`, and its token must be live. Signing out ends the
row; revoking the token ends all its rows in the same transaction, so neither waits for a
cookie to expire.

Each token has a fair-share weight (:func:`set_weight`, ``core.queue.fairness``).

Creating and revoking tokens, setting weights, signing in and out are recorded in the audit trail
(:mod:`core.services.audit`) in the same transaction.

No Flask here: the web app and the ``dq token`` commands both call these functions.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from core.db.models import AdminSession, ApiToken, Role, utcnow
from core.services.audit import record

TOKEN_PREFIX = "dq_"
# Longer than any token we make; anything longer is refused before it is hashed.
MAX_TOKEN_CHARS = 128
MAX_LABEL_CHARS = 200
MAX_TOKEN_ID = 2**31 - 1
# A browser sign-in ends this long after it began, however active: a stolen cookie is worth
# at most a working day.
SIGN_IN_LIFETIME = timedelta(hours=12)
# last_seen_at is written at most this often per sign-in, not on every request.
LAST_SEEN_RESOLUTION = timedelta(minutes=1)
# Fair-share weights an admin may set (turns per round of the queue; the default is 1).
MIN_WEIGHT = 0.1
MAX_WEIGHT = 100.0
# Who acts when a caller names no one: the `dq token` commands.
CLI_ACTOR = "cli"


# Built once: every API request runs it, and building a statement costs more than running it.
_LIVE_TOKEN = select(ApiToken).where(
    ApiToken.token_hash == bindparam("token_hash"), ApiToken.revoked_at.is_(None)
)


_LIVE_SIGN_IN = (
    select(AdminSession, ApiToken)
    .join(ApiToken, ApiToken.id == AdminSession.token_id)
    .where(
        AdminSession.id == bindparam("session_id"),
        AdminSession.ended_at.is_(None),
        AdminSession.created_at > bindparam("born_after"),
        ApiToken.revoked_at.is_(None),
    )
)


class TokenNotFound(LookupError):
    """No token with that id (or that value)."""


def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_token(
    session: Session, role: Role | str, label: str = "", *, actor: str = CLI_ACTOR
) -> tuple[ApiToken, str]:
    """Add a token with ``role``; returns the row and the plaintext, which is not kept anywhere.
    ``actor`` is who made it, for the audit trail."""
    try:
        role = Role(role)
    except ValueError:
        raise ValueError(f"role must be user or admin, not {role!r}") from None
    if len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"label is {len(label)} characters; the limit is {MAX_LABEL_CHARS}")
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(token_hash=hash_token(plaintext), role=role, label=label, created_at=utcnow())
    session.add(token)
    session.flush()
    record(
        session,
        actor,
        "token.create",
        f"token:{token.id}",
        detail={"role": role.value, "label": label},
    )
    return token, plaintext


def authenticate(session: Session, plaintext: str) -> ApiToken | None:
    """The live (not revoked) token whose plaintext this is, or None."""
    if not plaintext.startswith(TOKEN_PREFIX) or len(plaintext) > MAX_TOKEN_CHARS:
        return None
    token: ApiToken | None = session.scalar(_LIVE_TOKEN, {"token_hash": hash_token(plaintext)})
    return token


def revoke_token(session: Session, token: int | str, *, actor: str = CLI_ACTOR) -> ApiToken:
    """Revoke a token given by its id (as ``dq token list`` shows it) or by its plaintext, and
    end every browser sign-in made with it. ``actor`` is who revoked it, for the audit trail.

    Revoking a revoked token is not an error; its first revocation time is kept.
    """
    if isinstance(token, int) or token.isdigit():
        missing = f"no token has id {token}"
        # api_tokens.id is a 32-bit integer: a larger number names no token (and PostgreSQL
        # would refuse to compare it).
        row = session.get(ApiToken, int(token)) if 0 < int(token) <= MAX_TOKEN_ID else None
    else:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
        missing = "no token has that value"  # never echo what may be a secret
    if row is None:
        raise TokenNotFound(missing)
    if row.revoked_at is None:
        now = utcnow()
        row.revoked_at = now
        ended = session.execute(
            update(AdminSession)
            .where(AdminSession.token_id == row.id, AdminSession.ended_at.is_(None))
            .values(ended_at=now)
        )
        sessions_ended = ended.rowcount  # type: ignore[attr-defined]
        record(
            session,
            actor,
            "token.revoke",
            f"token:{row.id}",
            detail={"role": row.role.value, "sessions_ended": sessions_ended},
        )
        session.flush()
    return row


def set_weight(
    session: Session, token_id: int, weight: float, *, actor: str = CLI_ACTOR
) -> ApiToken:
    """Give token ``token_id`` this fair-share weight (``core.queue.fairness``): its jobs get
    ``weight`` turns per round of the queue. ``actor`` is who set it, for the audit trail.
    ValueError names the bounds; TokenNotFound when no token has that id."""
    if isinstance(weight, bool) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}")
    row = session.get(ApiToken, token_id) if 0 < token_id <= MAX_TOKEN_ID else None
    if row is None:
        raise TokenNotFound(f"no token has id {token_id}")
    previous = row.weight
    row.weight = float(weight)
    record(
        session,
        actor,
        "token.weight",
        f"token:{row.id}",
        detail={"weight": row.weight, "previous": previous},
    )
    session.flush()
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


# --- browser sign-ins -----------------------------------------------------------------------


def _sign_in_id(secret: str) -> str:
    return hash_token(secret)


def start_sign_in(
    session: Session, token: ApiToken, *, client: str | None = None, user_agent: str = ""
) -> tuple[AdminSession, str]:
    """A new sign-in of a browser with ``token``; returns the row and the secret for its
    cookie, which is not kept anywhere."""
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    row = AdminSession(
        id=_sign_in_id(secret),
        token_id=token.id,
        created_at=now,
        last_seen_at=now,
        client=client[:64] if client else None,
        user_agent=user_agent[:200],
    )
    session.add(row)
    record(
        session,
        f"token:{token.id}",
        "sign_in",
        f"session:{row.id[:16]}",
        detail={"role": token.role.value},
        client=client,
    )
    session.flush()
    return row, secret


def signed_in(
    session: Session, secret: str, now: datetime | None = None
) -> tuple[AdminSession, ApiToken] | None:
    """The live sign-in whose cookie holds ``secret``, with its token; None when there is
    none: unknown, ended, too old, or its token revoked."""
    if not secret or len(secret) > MAX_TOKEN_CHARS:
        return None
    now = now or utcnow()
    found = session.execute(
        _LIVE_SIGN_IN,
        {"session_id": _sign_in_id(secret), "born_after": now - SIGN_IN_LIFETIME},
    ).first()
    return None if found is None else (found[0], found[1])


def touch_sign_in(session: Session, sign_in: AdminSession, now: datetime | None = None) -> bool:
    """Move ``last_seen_at`` to now, at most once per :data:`LAST_SEEN_RESOLUTION`; True when
    it wrote. The caller commits."""
    now = now or utcnow()
    if sign_in.last_seen_at > now - LAST_SEEN_RESOLUTION:
        return False
    result = session.execute(
        update(AdminSession)
        .where(
            AdminSession.id == sign_in.id,
            AdminSession.last_seen_at <= now - LAST_SEEN_RESOLUTION,
        )
        .values(last_seen_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def end_sign_in(session: Session, secret: str) -> AdminSession | None:
    """Sign a browser out: end the sign-in whose cookie holds ``secret``. None when it had
    already ended (or never existed), and then nothing is recorded."""
    if not secret or len(secret) > MAX_TOKEN_CHARS:
        return None
    row = session.get(AdminSession, _sign_in_id(secret))
    if row is None or row.ended_at is not None:
        return None
    row.ended_at = utcnow()
    record(session, f"token:{row.token_id}", "sign_out", f"session:{row.id[:16]}")
    session.flush()
    return row
