"""What one poll costs the web process, in CPU instructions, beside the trivial authenticated
route (GET /api/v1/me): a count that the machine's other load does not move.

    .venv/bin/python bench/bench_poll_cost.py                   # PostgreSQL, and SQLite
    .venv/bin/python bench/bench_poll_cost.py --backends postgresql --requests 300

Each route is asked in-process (Flask's test client, no HTTP server) under valgrind's callgrind,
which counts the instructions the process executes. The process is run twice, once making no
request after a warm-up of 50 and once making N: the difference over N is the cost of one
request, everything of the process's start cancelled out. The view of the queue is kept for the
whole run (DQ_QUEUE_SNAPSHOT_SECONDS is large), so a queued poll pays only for its own row; on a
serving process the view is read again once a second, a few milliseconds shared by every poll.

What this leaves out: the HTTP server and the socket (the same for both routes), and the
database server's CPU (bench/bench_db_cpu.py measures that). bench/bench_web.py measures the
throughput over HTTP, which on a shared machine moves with its load; this does not. Not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_web import add_jobs, make_token, postgres_schema  # noqa: E402

from core.db import JobStatus, migrate  # noqa: E402
from core.runtime.machine import cpu_name  # noqa: E402

WARMUP = 50


def child(url: str, token: str, path: str, count: int) -> None:
    """Inside valgrind: the app, a warm-up, then ``count`` requests."""
    os.environ.update(
        DQ_DATABASE_URL=url,
        # Nothing is sent: a GET never publishes, so the broker is never reached.
        DQ_BROKER_URL=f"sqla+sqlite:///{tempfile.mkdtemp(prefix='dq-bench-')}/broker.sqlite3",
        DQ_STORAGE_URL=f"file://{tempfile.mkdtemp(prefix='dq-bench-')}",
        DQ_SECRET_KEY=secrets.token_hex(32),
        DQ_QUEUE_SNAPSHOT_SECONDS="100000",
    )
    from web import create_app

    client = create_app().test_client()
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(WARMUP):
        response = client.get(path, headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
    for _ in range(count):
        client.get(path, headers=headers)


def instructions(url: str, token: str, path: str, count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/callgrind.out",
                sys.executable,
                __file__,
                "--child",
                url,
                token,
                path,
                str(count),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind failed: {out.stderr[-2000:]}")
    return int(found.group(1))


def per_request(url: str, token: str, path: str, count: int) -> float:
    return (instructions(url, token, path, count) - instructions(url, token, path, 0)) / count


def measure(backend: str, count: int) -> list[tuple[str, float]]:
    with ExitStack() as stack:
        if backend == "postgresql":
            url = stack.enter_context(postgres_schema())
            if url is None:
                print("PostgreSQL does not answer: skipped", file=sys.stderr)
                return []
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            url = f"sqlite:///{tmp}/bench.sqlite3"
        migrate.upgrade(url)
        token, owner = make_token(url)
        add_jobs(url, "someone-else", 200)
        (queued,) = add_jobs(url, owner, 1)
        (running,) = add_jobs(url, owner, 1, status=JobStatus.RUNNING, progress_step=5)
        routes = [
            ("GET /api/v1/me (trivial, authenticated)", "/api/v1/me"),
            ("GET /api/v1/jobs/<id>: queued behind 200", f"/api/v1/jobs/{queued}"),
            ("GET /api/v1/jobs/<id>: running", f"/api/v1/jobs/{running}"),
        ]
        return [(name, per_request(url, token, path, count)) for name, path in routes]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--requests", type=int, default=300, help="N, per route.")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench_poll_cost needs valgrind (apt-get install valgrind)")
    print(f"CPU: {cpu_name()}; in-process (Flask test client) under callgrind, N = {args.requests}")
    print()
    print("| database | route | instructions per request | vs trivial |")
    print("|---|---|---:|---:|")
    for backend in args.backends.split(","):
        rows = measure(backend, args.requests)
        if not rows:
            continue
        trivial = rows[0][1]
        label = "PostgreSQL" if backend == "postgresql" else "SQLite"
        for name, cost in rows:
            print(f"| {label} | {name} | {cost / 1e6:.2f} M | {cost / trivial:.2f}× |")
    print()
    print("Target (issue 25): a poll costs at most 2× the trivial authenticated route.")


if __name__ == "__main__":
    main()
