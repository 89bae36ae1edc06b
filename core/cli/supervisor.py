"""``dq serve``: the whole system on one machine, as child processes of one command.

It migrates the database, then starts and watches

- the web app (``dq web``: gunicorn),
- N generation workers and, unless turned off, a training worker (``dq worker``),
- a webhooks worker (``dq worker --queues webhooks``: signed deliveries; it loads no model),
- the reaper and outbox relay (``dq reaper``).

Each child runs in its own session, so a Ctrl-C in the terminal reaches only this supervisor,
which then stops the children in order (SIGTERM to each process group, SIGKILL after a grace
period). Children also get SIGTERM from the kernel if the supervisor itself dies
(``PR_SET_PDEATHSIG``), so nothing is left orphaned. A worker or reaper that exits is restarted;
if the web app cannot start, everything stops. Their output is shown line by line, prefixed
with the child's name.

Like the rest of ``core.cli``, this module imports neither the web app nor the workers: it starts
them as processes, by command.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from core.runtime.liveness import liveness_age
from core.runtime.settings import Settings

PR_SET_PDEATHSIG = 1
RUN_DIR = Path("var/run")  # liveness files of the workers


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the supervisor's own cleanup still runs
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    restart: bool = True
    grace_s: float = 30.0
    # A worker's watchdog touches this file while the worker is healthy (DQ_WORKER_LIVENESS_FILE);
    # a file older than ``liveness_max_age_s`` means the process is hung: it is killed and
    # started again, as a Kubernetes liveness probe would.
    liveness_file: Path | None = None
    liveness_max_age_s: float = 60.0
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: list[float] = field(default_factory=list)

    def hung_for(self) -> float | None:
        """Seconds the liveness file has been stale past its allowance; None when healthy."""
        if self.liveness_file is None:
            return None
        age = liveness_age(self.liveness_file)
        if age is None:  # not written yet: allow the start-up as long as a stale file
            age = time.monotonic() - self.started_at
        return age if age > self.liveness_max_age_s else None


class Supervisor:
    def __init__(self, children: Sequence[Child], out: IO[str] | None = None):
        self.children = list(children)
        self.out = out or sys.stdout
        self.stopping = threading.Event()
        self._print_lock = threading.Lock()
        self.width = max(len(c.name) for c in self.children)

    def say(self, name: str, line: str) -> None:
        with self._print_lock:
            self.out.write(f"{name:<{self.width}} | {line}\n")
            self.out.flush()

    def _pump(self, child: Child, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.say(child.name, raw.decode(errors="replace").rstrip())
        stream.close()

    def spawn(self, child: Child) -> None:
        env = None
        if child.liveness_file is not None:
            child.liveness_file.parent.mkdir(parents=True, exist_ok=True)
            child.liveness_file.unlink(missing_ok=True)
            env = {**os.environ, "DQ_WORKER_LIVENESS_FILE": str(child.liveness_file)}
        child.started_at = time.monotonic()
        child.proc = subprocess.Popen(
            child.argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert child.proc.stdout is not None
        threading.Thread(target=self._pump, args=(child, child.proc.stdout), daemon=True).start()

    def start(self) -> None:
        for child in self.children:
            self.spawn(child)

    def watch_once(self) -> str | None:
        """Restart exited children that may be restarted; return a reason to stop, or None."""
        for child in self.children:
            assert child.proc is not None
            code = child.proc.poll()
            if self.stopping.is_set():
                continue
            if code is None:
                hung = child.hung_for()
                if hung is None:
                    continue
                self.say(
                    "serve",
                    f"{child.name} has not touched its liveness file for {hung:.0f} s; killing it",
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                code = child.proc.wait(timeout=30)
            if not child.restart:
                return f"{child.name} exited with status {code}"
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            if len(child.restarts) > 5:
                return f"{child.name} keeps exiting (status {code}); giving up"
            self.say("serve", f"{child.name} exited with status {code}; restarting it")
            self.spawn(child)
        return None

    def stop(self) -> None:
        """SIGTERM every child's process group, wait for the grace period, then SIGKILL."""
        self.stopping.set()
        for child in reversed(self.children):  # reaper and workers first, the web app last
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=child.grace_s)
            except subprocess.TimeoutExpired:
                self.say("serve", f"{child.name} did not stop in {child.grace_s:.0f} s; killing it")
            # Also reap anything left in the group (gunicorn or Celery children).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)


def wait_until_up(url: str, supervisor: Supervisor, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not supervisor.stopping.is_set():
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            if supervisor.watch_once() is not None:
                return False
            time.sleep(0.3)
    return False


def has_gpu() -> bool:
    """An NVIDIA GPU is visible (without importing torch)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def default_workers(settings: Settings) -> int:
    """Generation workers for ``dq serve``: on a CPU-only host, one per core (up to 8) with one
    torch thread each; 2 workers × 1 thread made 1.86× the images/s of 1 × 1 on a 2-core host,
    against 1.49× for 1 worker × 2 threads (bench/bench_worker.py). With a GPU, one."""
    wants_gpu = settings.device is not None and settings.device.startswith("cuda")
    if wants_gpu or (settings.device is None and has_gpu()):
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def serve(
    host: str,
    port: int,
    workers: int,
    train_worker: bool,
    web_workers: int,
    threads_per_worker: int | None = None,
) -> int:
    """Run until SIGINT or SIGTERM; returns the exit status."""
    dq = [sys.executable, "-m", "core.cli"]
    children = [
        Child(
            "web",
            [*dq, "web", "--host", host, "--port", str(port), "--workers", str(web_workers)],
            restart=False,
            grace_s=15,
        ),
        *(
            Child(
                f"worker{i + 1}",
                [
                    *dq,
                    "worker",
                    "--queues",
                    "generate",
                    "--name",
                    f"generate{i + 1}@%h",
                    *(["--threads", str(threads_per_worker)] if threads_per_worker else []),
                ],
                grace_s=30,
                liveness_file=RUN_DIR / f"worker{i + 1}.alive",
            )
            for i in range(workers)
        ),
        *(
            [
                Child(
                    "train",
                    [*dq, "worker", "--queues", "train", "--name", "train@%h"],
                    grace_s=30,
                    liveness_file=RUN_DIR / "train.alive",
                )
            ]
            if train_worker
            else []
        ),
        # Two processes, so that one slow receiver (10 s timeout) does not hold up the rest.
        Child(
            "webhooks",
            [*dq, "worker", "--queues", "webhooks", "--concurrency", "2", "--name", "webhooks@%h"],
            grace_s=15,
            liveness_file=RUN_DIR / "webhooks.alive",
        ),
        Child(
            "reaper",
            [*dq, "reaper", "--liveness-file", str(RUN_DIR / "reaper.alive")],
            grace_s=10,
            # Touched after every pass, work done or not: a database outage is not a hang.
            liveness_file=RUN_DIR / "reaper.alive",
            liveness_max_age_s=120.0,
        ),
    ]
    supervisor = Supervisor(children)
    signals_seen = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:  # a second Ctrl-C: no more waiting
            for child in supervisor.children:
                if child.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
        supervisor.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start()
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
    url = f"http://{shown}:{port}"
    status = 0
    if wait_until_up(f"{url}/healthz", supervisor):
        supervisor.say("serve", f"diffusion-queue is serving at {url}  (Ctrl-C stops it)")
        while not supervisor.stopping.wait(0.5):
            reason = supervisor.watch_once()
            if reason is not None:
                supervisor.say("serve", reason)
                status = 1
                break
    elif not supervisor.stopping.is_set():
        supervisor.say("serve", f"the web app did not come up at {url}")
        status = 1
    supervisor.say("serve", "stopping")
    supervisor.stop()
    supervisor.say("serve", "stopped")
    return status
