"""Liveness files: a worker's watchdog touches one while the worker is healthy
(``worker/watchdog.py``); a probe reads its age (``dq worker-alive``, ``dq serve``'s supervisor,
a Kubernetes exec probe)."""

from __future__ import annotations

import time
from pathlib import Path


def liveness_age(path: str | Path) -> float | None:
    """Seconds since the file was last touched; None when there is none."""
    try:
        return max(0.0, time.time() - Path(path).stat().st_mtime)
    except FileNotFoundError:
        return None
