"""What one request costs PostgreSQL: CPU time of its server processes per request, at depth.

    .venv/bin/python bench/bench_db_cpu.py                     # 1,000 and 1,000,000 queued
    .venv/bin/python bench/bench_db_cpu.py --depths 1000,10000

For each depth, a fresh PostgreSQL schema is migrated and filled by ``bench_scale.fill`` (N
queued jobs of 500 owners, by SQL). Requests go through the Flask app in this process (no
gunicorn: the web process's own CPU is not what is measured here), with the app's defaults
(DQ_QUEUE_SNAPSHOT_SECONDS=1). Around each batch of requests, the user and system CPU time of
every process named ``postgres`` is summed from ``/proc`` (so PostgreSQL must run on this
machine); the figure is that sum over the number of requests. The claim query runs on its own
connection, in transactions that are rolled back.

This is the input of docs/DEPLOY.md's sizing formula. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_scale import database, fill, first_and_last  # noqa: E402
from bench_web import cpu_seconds  # noqa: E402

from core.runtime.machine import cpu_name  # noqa: E402


def postgres_cpu_seconds() -> float:
    """User + system CPU of every ``postgres`` process on this machine, in seconds."""
    return cpu_seconds()["PostgreSQL"]


def per_request_ms(call: Callable[[], object], n: int) -> float:
    for _ in range(min(20, n)):
        call()
    time.sleep(0.2)  # let the statistics collector and the like settle
    before = postgres_cpu_seconds()
    for _ in range(n):
        call()
    return (postgres_cpu_seconds() - before) / n * 1000


def measure(depth: int, n: int) -> dict[str, float]:
    from sqlalchemy import text

    from core.db import dispose_engines, get_engine, migrate, session_scope
    from core.queue.fairness import next_in_line
    from core.services.tokens import create_token

    with database("postgresql") as url, tempfile.TemporaryDirectory() as tmp:
        migrate.upgrade(url)
        with session_scope(get_engine(url=url)) as session:
            row, token = create_token(session, "user", "bench")
        owner = f"token:{row.id}"
        print(f"filling {depth:,} …", file=sys.stderr)
        fill(url, depth, owner)
        head, deep = first_and_last(url, owner)
        os.environ.update(
            DQ_DATABASE_URL=url,
            DQ_BROKER_URL=f"sqla+sqlite:///{tmp}/broker.sqlite3",
            DQ_STORAGE_URL=f"file://{tmp}/objects",
            DQ_SECRET_KEY=secrets.token_hex(32),
            DQ_RATE_LIMIT="100000000/minute",
            DQ_GLOBAL_RATE_LIMIT="100000000/minute",
            DQ_MAX_ACTIVE_JOBS_PER_OWNER="100000000",
            DQ_MAX_QUEUED_JOBS="100000000",
        )
        from web import create_app

        client = create_app().test_client()
        auth = {"Authorization": f"Bearer {token}"}
        etag = client.get(f"/api/v1/jobs/{deep}", headers=auth).headers["ETag"]

        def get(path: str, **headers: str) -> Callable[[], object]:
            def call() -> object:
                answer = client.get(path, headers={**auth, **headers})
                assert answer.status_code in (200, 304), answer.get_data()[:300]
                return answer

            return call

        def submit() -> object:
            answer = client.post("/api/v1/jobs", json={"prompt": "a red circle"}, headers=auth)
            assert answer.status_code == 202, answer.get_json()
            return answer

        engine = get_engine(url=url)

        def claim() -> object:
            with engine.connect() as conn:
                from sqlalchemy.orm import Session

                with Session(bind=conn) as session:
                    next_in_line(session, 16)
                    session.rollback()
            return None

        out = {
            "claim query (next_in_line, 16 jobs)": per_request_ms(claim, n),
            "poll, deep in the queue": per_request_ms(get(f"/api/v1/jobs/{deep}"), n),
            "poll near the head": per_request_ms(get(f"/api/v1/jobs/{head}"), n),
            "poll answered 304 (If-None-Match)": per_request_ms(
                get(f"/api/v1/jobs/{deep}", **{"If-None-Match": etag}), n
            ),
            "GET /api/v1/me (trivial, authenticated)": per_request_ms(get("/api/v1/me"), n),
            "list, 20 jobs": per_request_ms(get("/api/v1/jobs?limit=20"), n // 4),
            "submit": per_request_ms(submit, n // 4),
        }
        with engine.begin() as conn:  # leave nothing queued by the submits behind
            conn.execute(
                text("DELETE FROM jobs WHERE owner = :o AND prompt = 'a red circle'"), {"o": owner}
            )
        dispose_engines()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1000,1000000")
    parser.add_argument("--requests", type=int, default=1000, help="Per request kind and depth.")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    results = {depth: measure(depth, args.requests) for depth in depths}
    print(f"CPU: {cpu_name()}; Python {platform.python_version()}")
    print(
        f"PostgreSQL CPU per request (ms; {args.requests} requests per kind, a quarter as many "
        "lists and submits), through the Flask app in one process:\n"
    )
    print("| request | " + " | ".join(f"{d:,} queued" for d in depths) + " |")
    print("|---|" + "---:|" * len(depths))
    for name in results[depths[0]]:
        print(f"| {name} | " + " | ".join(f"{results[d][name]:.2f}" for d in depths) + " |")


if __name__ == "__main__":
    main()
