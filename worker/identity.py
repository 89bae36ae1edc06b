"""Who this worker process is: its host name and process id, the name it claims work under (the
``worker_host`` of a job or training run) and marks itself present under (``worker_presence``)."""

from __future__ import annotations

import os
import socket


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
