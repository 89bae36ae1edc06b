"""Liveness files: a worker's watchdog touches one while the worker is healthy
(``worker/watchdog.py``), the reaper at every pass (``dq reaper --liveness-file``); a probe reads
its age (``dq worker-alive``, ``dq serve``'s supervisor,
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


def touch(path: str | Path) -> None:
    """Mark the process alive now (creating the file and its directory if need be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
