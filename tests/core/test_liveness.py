"""Liveness: ``dq worker-alive`` as a Kubernetes exec probe runs it, and ``dq serve``'s
supervisor killing and restarting a child whose liveness file went stale."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

from core.cli.supervisor import Child, Supervisor

ROOT = Path(__file__).resolve().parents[2]


def dq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_worker_alive_tells_a_fresh_file_from_a_stale_or_missing_one(tmp_path: Path) -> None:
    alive = tmp_path / "worker.alive"
    missing = dq("worker-alive", str(alive))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    alive.touch()
    fresh = dq("worker-alive", str(alive), "--max-age", "30")
    assert fresh.returncode == 0 and fresh.stdout.startswith("alive:")
    old = time.time() - 120
    os.utime(alive, (old, old))
    stale = dq("worker-alive", str(alive), "--max-age", "60")
    assert stale.returncode == 1 and "last touched 120 s ago" in stale.stderr
    # DQ_WORKER_LIVENESS_FILE names the file when the argument is left out.
    alive.touch()
    assert dq("worker-alive", env={"DQ_WORKER_LIVENESS_FILE": str(alive)}).returncode == 0
    unset = dq("worker-alive", env={"DQ_WORKER_LIVENESS_FILE": ""})
    assert unset.returncode == 2 and "Traceback" not in unset.stderr


def test_the_supervisor_restarts_a_child_whose_liveness_file_goes_stale(tmp_path: Path) -> None:
    # A child that touches its file once, then hangs (like a worker stuck with the GIL held).
    script = (
        "import os, pathlib, time; pathlib.Path(os.environ['DQ_WORKER_LIVENESS_FILE']).touch(); "
        "print('started', flush=True); time.sleep(600)"
    )
    child = Child(
        "worker1",
        [sys.executable, "-c", script],
        liveness_file=tmp_path / "run" / "worker1.alive",
        liveness_max_age_s=1.0,
    )
    out = io.StringIO()
    supervisor = Supervisor([child], out=out)
    supervisor.start()
    try:
        first = child.proc
        assert first is not None
        deadline = time.monotonic() + 30
        while child.proc is first and time.monotonic() < deadline:
            assert supervisor.watch_once() is None
            time.sleep(0.2)
        assert child.proc is not first  # killed and started again
        assert first.poll() is not None
        assert "has not touched its liveness file" in out.getvalue()
        assert len(child.restarts) == 1
    finally:
        supervisor.stop()


def test_a_healthy_child_is_left_alone(tmp_path: Path) -> None:
    script = (
        "import os, pathlib, time\n"
        "p = pathlib.Path(os.environ['DQ_WORKER_LIVENESS_FILE'])\n"
        "for _ in range(600):\n    p.touch(); time.sleep(0.2)\n"
    )
    child = Child("worker1", [sys.executable, "-c", script],
                  liveness_file=tmp_path / "w.alive", liveness_max_age_s=1.0)  # fmt: skip
    supervisor = Supervisor([child], out=io.StringIO())
    supervisor.start()
    try:
        first = child.proc
        end = time.monotonic() + 3
        while time.monotonic() < end:
            assert supervisor.watch_once() is None
            time.sleep(0.2)
        assert child.proc is first and first is not None and first.poll() is None
    finally:
        supervisor.stop()


def test_a_stopped_reaper_goes_stale_and_a_resumed_one_fresh_again(tmp_path: Path) -> None:
    """`dq reaper --liveness-file`, as the k8s and Compose probes run it: SIGSTOP the real
    process and the probe fails; SIGCONT and it passes again."""
    import signal

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DQ_DATABASE_URL": f"sqlite:///{tmp_path / 'dq.sqlite3'}",
        "DQ_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
        "DQ_STORAGE_URL": f"file://{tmp_path / 'objects'}",
        "DQ_LOG_FORMAT": "json",
    }
    assert (
        subprocess.run(
            [sys.executable, "-m", "core.cli", "db", "upgrade"], env=env, cwd=tmp_path, timeout=120
        ).returncode
        == 0
    )
    alive = tmp_path / "run" / "reaper.alive"
    reaper = subprocess.Popen(
        [
            sys.executable,
            *("-m", "core.cli", "reaper", "--interval", "0.2"),
            "--liveness-file",
            str(alive),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not alive.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dq("worker-alive", str(alive), "--max-age", "2").returncode == 0
        reaper.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        stale = dq("worker-alive", str(alive), "--max-age", "2")
        assert stale.returncode == 1 and "last touched" in stale.stderr
        reaper.send_signal(signal.SIGCONT)
        time.sleep(1.0)
        assert dq("worker-alive", str(alive), "--max-age", "2").returncode == 0
    finally:
        reaper.terminate()
        _, err = reaper.communicate(timeout=30)
    # DQ_LOG_FORMAT=json: the reaper's own lines are JSON objects.
    lines = [line for line in err.splitlines() if line.startswith("{")]
    assert any('"message": "reaper started' in line for line in lines), err[-2000:]


def test_dq_serve_runs_one_single_threaded_worker_per_core_without_a_gpu() -> None:
    from core.cli.supervisor import default_workers
    from core.runtime.settings import Settings

    cores = os.cpu_count() or 1
    assert default_workers(Settings.from_env({"DQ_DEVICE": "cpu"})) == max(1, min(8, cores))
    assert default_workers(Settings.from_env({"DQ_DEVICE": "cuda"})) == 1
    assert default_workers(Settings.from_env({"DQ_DEVICE": "cuda:1"})) == 1
