"""The production topology on one machine: the real PostgreSQL and Redis, moto's S3 server,
two worker processes and the web app under gunicorn. Twenty jobs through the REST API."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import Job, Role
from core.db.session import session_scope
from core.services.tokens import create_token
from tests.e2e.test_embedded import free_port
from tests.worker.conftest import Stack


def call(url: str, token: str, method: str = "GET", body: Any = None) -> Any:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_twenty_jobs_through_gunicorn_two_workers_postgres_redis_and_s3(
    production_stack: Stack,
) -> None:
    stack = production_stack
    # Started together: each process spends seconds on its imports.
    reaper = stack.start_reaper(wait=False)
    workers = [
        stack.start_worker(extra_env={"DQ_MAX_BATCH_SIZE": "4"}, wait=False) for _ in range(2)
    ]
    base = stack.start_web(free_port())
    stack.wait_for_log(reaper, "reaper started", timeout=60)
    for worker in workers:
        stack.wait_for_log(worker, "ready.", timeout=90)
    with session_scope(stack.engine) as s:
        _, token = create_token(s, Role.USER, "e2e")

    def submit(i: int) -> str:
        body = {"prompt": f"a small red circle in the center {i}", "seed": i, "steps": 40}
        return str(call(base + "/api/v1/jobs", token, "POST", body)["id"])

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(submit, range(20)))
    assert len(set(ids)) == 20

    def finished() -> bool:
        page = call(base + "/api/v1/jobs?limit=50", token)
        return all(j["status"] in ("succeeded", "failed", "canceled") for j in page["jobs"])

    stack.wait_until(finished, 240, "20 jobs to finish")
    for job_id in ids:
        job = call(f"{base}/api/v1/jobs/{job_id}", token)
        assert job["status"] == "succeeded", job["error"]
        (image,) = job["images"]
        assert image["url"].startswith(stack.env["DQ_S3_ENDPOINT_URL"])  # presigned, on S3
        with urllib.request.urlopen(image["url"], timeout=30) as response:
            assert response.read().startswith(b"\x89PNG")
    with Session(stack.engine) as s:
        hosts = set(s.scalars(select(Job.worker_host)))
    assert len(hosts) == 2, hosts  # both workers served jobs
