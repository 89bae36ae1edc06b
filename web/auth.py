"""Who is calling: an API token (``Authorization: Bearer …``), an admin logged in to the pages,
or an anonymous form user known by a random id in their session cookie.

Every job has an owner string: ``token:<ApiToken.id>`` or ``session:<random hex>``. A caller sees
the jobs it owns; an admin sees every job (``Caller.scope`` is then None).
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from time import monotonic

from flask import g, request, session

from core.db.models import ApiToken, Role
from core.tokens import authenticate, hash_token
from web.db import get_session
from web.problems import Problem
from web.services import services

SESSION_OWNER_KEY = "owner"
SESSION_ADMIN_KEY = "admin_token_id"


@dataclass(frozen=True)
class Caller:
    owner: str
    is_admin: bool = False

    @property
    def scope(self) -> str | None:
        """The owner to filter jobs by: None for an admin, who sees every job."""
        return None if self.is_admin else self.owner


class TokenCache:
    """API callers that authenticated in the last ``ttl`` seconds, by token hash.

    A client polling its job twice a second would otherwise cost a token lookup per poll, as
    much as the poll itself. The price: a revoked token keeps working in a process that saw it
    for at most ``ttl`` seconds more. Only successes are kept, at most ``size`` of them.
    """

    def __init__(self, ttl: float = 5.0, size: int = 10_000):
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[str, tuple[float, Caller]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> Caller | None:
        with self._lock:
            entry = self._entries.get(token_hash)
            if entry is None:
                return None
            if entry[0] <= monotonic():
                del self._entries[token_hash]
                return None
            return entry[1]

    def put(self, token_hash: str, caller: Caller) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._entries[token_hash] = (monotonic() + self.ttl, caller)
            self._entries.move_to_end(token_hash)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


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


def session_owner() -> str:
    """The owner string of the browser's session, made on first use."""
    sid = session.get(SESSION_OWNER_KEY)
    if not isinstance(sid, str) or not sid:
        sid = secrets.token_hex(16)
        session[SESSION_OWNER_KEY] = sid
        session.permanent = True
    return f"session:{sid}"


def logged_in_admin() -> ApiToken | None:
    """The admin token this browser logged in with, while it is still live."""
    token_id = session.get(SESSION_ADMIN_KEY)
    if not isinstance(token_id, int):
        return None
    token = get_session().get(ApiToken, token_id)
    if token is None or token.revoked_at is not None or token.role is not Role.ADMIN:
        session.pop(SESSION_ADMIN_KEY, None)
        return None
    return token


def page_caller() -> Caller:
    """A browser: its session owner, with admin rights while an admin is logged in."""
    cached: Caller | None = g.get("page_caller")
    if cached is not None:
        return cached
    caller = Caller(owner=session_owner(), is_admin=logged_in_admin() is not None)
    g.page_caller = caller
    return caller


def log_in(token_plaintext: str) -> ApiToken | None:
    """Log this browser in with an admin token; None when it is not a live admin token."""
    token = authenticate(get_session(), token_plaintext.strip())
    if token is None or token.role is not Role.ADMIN:
        return None
    session[SESSION_ADMIN_KEY] = token.id
    return token


def log_out() -> None:
    session.pop(SESSION_ADMIN_KEY, None)
