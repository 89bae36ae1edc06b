"""The worker package's shape: importing it builds no Celery app, and it has no import cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys, celery._state as state
import worker.context, worker.generation, worker.training, worker.tasks, worker.heartbeat
import worker.watchdog, worker.models
assert "worker.app" not in sys.modules, "worker.context and the task bodies pull in worker.app"
import worker.app
assert not list(state._apps), f"importing built {list(state._apps)}"
app = worker.app.app  # what `celery -A worker.app` asks for
assert {"dq.generate", "dq.train"} <= set(app.tasks), sorted(app.tasks)
# Celery's own hard limit (prefork only) lies past the watchdog's limit and grace.
assert app.tasks["dq.generate"].time_limit == 9 + 30 + 60, app.tasks["dq.generate"].time_limit
print("ok")
"""


def test_importing_the_worker_builds_no_app_and_the_app_has_both_tasks() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DQ_JOB_TIME_LIMIT_SECONDS": "9"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
