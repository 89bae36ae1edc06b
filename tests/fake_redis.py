"""fakeredis, served over TCP on a free local port: the fast tests of the Redis paths.

Every Redis path takes a ``redis://`` URL: the rate limiter's store (DQ_RATE_LIMIT_STORAGE_URL),
and the broker (DQ_BROKER_URL), whose lists the relay reads the depth of and which carries the
job-event notifications. So the fast tests reach fakeredis the way production reaches Redis,
through the same clients over a socket, and the code under test needs no seam for a fake client.
The data lives in this process (:attr:`FakeRedis.client` reads and writes it directly), so these
tests need no Redis, and run without one in CI too. Each names its twin against the real Redis
(:func:`tests.services.require_redis`), which CI requires.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FakeRedis:
    url: str  # redis://127.0.0.1:<port>/0, for the code under test
    client: Any  # a fakeredis.FakeRedis on the same data, for the test


@contextmanager
def serve_fake_redis() -> Iterator[FakeRedis]:
    """fakeredis on 127.0.0.1 and a free port, until the block ends."""
    import fakeredis

    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    # Each reply goes out at once. With Nagle's algorithm the second reply of a pipeline waits
    # for the client's delayed ACK (~40 ms), and kombu reads a queue's depth with a pipeline.
    server.RequestHandlerClass = type(
        "NoDelayHandler", (server.RequestHandlerClass,), {"disable_nagle_algorithm": True}
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakeredis", daemon=True
    )
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield FakeRedis(f"redis://{host}:{port}/0", fakeredis.FakeRedis(server=server.fake_server))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
