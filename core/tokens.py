"""API bearer tokens: made once, stored as a SHA-256 hash, looked up by that hash, revoked.

A token is ``dq_`` followed by 43 URL-safe characters (32 random bytes). Only its SHA-256 is kept
in ``api_tokens.token_hash``, so a copy of the database does not let anyone call the API; the
plaintext is shown once, when ``dq token create`` makes it. The random part carries 256 bits, so a
plain unsalted hash is enough: there is nothing to guess.

No Flask here: the web app and the ``dq token`` commands both call these functions.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from core.db.models import ApiToken, Role, utcnow

TOKEN_PREFIX = "dq_"
# Longer than any token we make; anything longer is refused before it is hashed.
MAX_TOKEN_CHARS = 128
MAX_LABEL_CHARS = 200


# Built once: every API request runs it, and building a statement costs more than running it.
_LIVE_TOKEN = select(ApiToken).where(
    ApiToken.token_hash == bindparam("token_hash"), ApiToken.revoked_at.is_(None)
)


class TokenNotFound(LookupError):
    """No token with that id (or that value)."""


def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_token(session: Session, role: Role | str, label: str = "") -> tuple[ApiToken, str]:
    """Add a token with ``role``; returns the row and the plaintext, which is not kept anywhere."""
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
    return token, plaintext


def authenticate(session: Session, plaintext: str) -> ApiToken | None:
    """The live (not revoked) token whose plaintext this is, or None."""
    if not plaintext.startswith(TOKEN_PREFIX) or len(plaintext) > MAX_TOKEN_CHARS:
        return None
    token: ApiToken | None = session.scalar(_LIVE_TOKEN, {"token_hash": hash_token(plaintext)})
    return token


def revoke_token(session: Session, token: int | str) -> ApiToken:
    """Revoke a token given by its id (as ``dq token list`` shows it) or by its plaintext.

    Revoking a revoked token is not an error; its first revocation time is kept.
    """
    if isinstance(token, int) or token.isdigit():
        row = session.get(ApiToken, int(token))
        missing = f"no token has id {token}"
    else:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
        missing = "no token has that value"  # never echo what may be a secret
    if row is None:
        raise TokenNotFound(missing)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))
