"""``dq token``: API bearer tokens: create (shown once), list, revoke, and the fair-share weight."""

from __future__ import annotations

from typing import Any

import click

from core.cli._common import database_error, fail, load_settings


@click.group()
def token() -> None:
    """API bearer tokens: create (shown once), list, revoke, weight (fair share)."""


def _token_engine() -> Any:
    """The engine of DQ_DATABASE_URL, once it is known to hold the api_tokens table."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    from core.db import get_engine

    settings = load_settings()
    engine = get_engine(settings)
    try:
        migrated = inspect(engine).has_table("api_tokens")
    except OperationalError as e:
        raise database_error(settings.database_url, e) from None
    if not migrated:
        raise fail("the database has no api_tokens table; run `dq db upgrade` first")
    return engine


@token.command("create")
@click.option(
    "--role", required=True, type=click.Choice(["user", "admin"]), help="What the token may do."
)
@click.option("--label", default="", help="A note to tell tokens apart, e.g. who holds it.")
def token_create(role: str, label: str) -> None:
    """Make a token and print it on stdout, once: only its hash is stored."""
    from core.db import session_scope
    from core.services.tokens import create_token

    with session_scope(_token_engine()) as session:
        row, plaintext = create_token(session, role, label)
        token_id = row.id
    click.echo(f"dq: created {role} token {token_id}; it is shown once, below", err=True)
    click.echo(plaintext)


@token.command("list")
def token_list() -> None:
    """List tokens: id, role, created, revoked, label (never the tokens themselves)."""
    from core.db import session_scope
    from core.services.tokens import list_tokens

    with session_scope(_token_engine()) as session:
        for row in list_tokens(session):
            created = row.created_at.isoformat(timespec="seconds")
            revoked = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "-"
            click.echo(f"{row.id}\t{row.role.value}\t{created}\t{revoked}\t{row.label}")


@token.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke token TOKEN_ID (an id from `dq token list`, or the token itself)."""
    from core.db import session_scope
    from core.services.tokens import TokenNotFound, revoke_token

    try:
        with session_scope(_token_engine()) as session:
            row_id = revoke_token(session, token_id).id
    except TokenNotFound as e:
        raise fail(str(e)) from None
    click.echo(f"token {row_id} is revoked")


@token.command("weight")
@click.argument("token_id", type=click.IntRange(min=1))
@click.argument("weight", type=float)
def token_weight(token_id: int, weight: float) -> None:
    """Set token TOKEN_ID's fair-share WEIGHT (0.1 to 100; default 1): its waiting jobs get
    WEIGHT turns per round of the queue, against 1 for every other owner."""
    from core.db import session_scope
    from core.services.tokens import TokenNotFound, set_weight

    try:
        with session_scope(_token_engine()) as session:
            row = set_weight(session, token_id, weight)
            row_id, new = row.id, row.weight
    except (TokenNotFound, ValueError) as e:
        raise fail(str(e)) from None
    click.echo(f"token {row_id} has weight {new:g}")
