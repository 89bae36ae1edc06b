"""Standard Webhooks signing: each API token's secret, its rotation, and the headers of a try.

A secret is ``whsec_`` and the base64 of 32 random bytes, made on first use; after a rotation the
previous one keeps signing for a day, so receivers can switch keys without losing a delivery.
Signatures are made by the ``standardwebhooks`` package.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import WebhookSecret, utcnow

ROTATION_OVERLAP = timedelta(hours=24)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    """A Standard Webhooks key: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def get_or_create_secret(session: Session, token_id: int) -> WebhookSecret:
    """The token's signing key, made on first use (two racing callers get the same one)."""
    found = session.get(WebhookSecret, token_id)
    if found is not None:
        return found
    row = WebhookSecret(token_id=token_id, key=new_secret(), created_at=utcnow())
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = session.get(WebhookSecret, token_id, populate_existing=True)
        if found is None:
            raise
        return found
    return row


def rotate_secret(
    session: Session, token_id: int, overlap: timedelta = ROTATION_OVERLAP
) -> WebhookSecret:
    """A new key for the token; the one it replaces keeps signing for ``overlap`` (a second
    rotation ends that at once: only the latest previous key signs)."""
    row = get_or_create_secret(session, token_id)
    now = utcnow()
    row.previous_key = row.key
    row.previous_until = now + overlap
    row.key = new_secret()
    row.rotated_at = now
    session.flush()
    return row


def signing_keys(row: WebhookSecret | None, now: datetime) -> list[str]:
    """The keys that sign now: the current one, and the previous one during a rotation."""
    if row is None:
        return []
    keys = [row.key]
    if row.previous_key and row.previous_until is not None and row.previous_until > now:
        keys.append(row.previous_key)
    return keys


def sign(message_id: str, at: datetime, body: str, keys: Sequence[str]) -> dict[str, str]:
    """The Standard Webhooks headers of one try: ``webhook-signature`` holds one
    ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` per key, separated by spaces."""
    from standardwebhooks import Webhook

    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(key).sign(message_id, at, body) for key in keys),
    }


def owner_token_id(owner: str) -> int | None:
    """The API token of an owner string ``token:<id>``; None for anonymous form users."""
    kind, _, rest = owner.partition(":")
    return int(rest) if kind == "token" and rest.isdigit() else None
