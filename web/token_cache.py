"""API callers a process has recently authenticated, so a polling client does not cost a token
lookup per request. One cache per app (:class:`web.services.Services`), read by
:func:`web.auth.bearer_caller`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from time import monotonic

from web.caller import Caller


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

    def discard(self, token_hash: str) -> None:
        """Forget a token at once, e.g. when this process revokes it."""
        with self._lock:
            self._entries.pop(token_hash, None)
