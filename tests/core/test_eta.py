"""Estimated start and finish: there while a job waits or runs, gone once it ends, and moving
the right way with the work ahead, the measured rate, the live workers and progress. Closed
forms where the arithmetic is simple; accuracy against real runs is bench/bench_eta.py's."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus, session_scope, utcnow
from core.db.models import ThroughputSample, WorkerPresence
from core.db.transitions import Lease
from core.queue.dispatch import QUEUE_GENERATE
from core.queue.eta import (
    DEFAULT_SECONDS_PER_IMAGE_STEP,
    Estimate,
    estimate,
    live_workers,
    mark_present,
    record_throughput,
)

NOW = utcnow()
STEPS = 20


def add_job(
    engine: Engine,
    owner: str = "token:1",
    status: JobStatus = JobStatus.QUEUED,
    *,
    seconds_ago: float = 0,
    **values: Any,
) -> uuid.UUID:
    row: dict[str, Any] = dict(
        id=uuid.uuid4(),
        status=status,
        prompt="a red circle",
        negative_prompt="",
        steps=STEPS,
        guidance=4.0,
        sampler="dpmpp-2m",
        seed=1,
        width=32,
        height=32,
        num_images=1,
        progress_total=STEPS,
        owner=owner,
        created_at=NOW - timedelta(seconds=seconds_ago),
    )
    row.update(values)
    with session_scope(engine) as s:
        s.execute(insert(Job), [row])
    return row["id"]  # type: ignore[no-any-return]


def queue(engine: Engine, n: int, **values: Any) -> list[uuid.UUID]:
    return [add_job(engine, seconds_ago=100 - i, **values) for i in range(n)]


def rate(engine: Engine, seconds_per_image_step: float, batch_size: int = 1) -> None:
    """A measured rate, as if a worker had run one batch of this size at it."""
    with session_scope(engine) as s:
        record_throughput(
            s,
            model_version_id=None,
            sampler="dpmpp-2m",
            steps=STEPS,
            batch_size=batch_size,
            seconds=seconds_per_image_step * batch_size * STEPS,
        )


def estimates(engine: Engine, ids: list[uuid.UUID], cap: int = 16) -> list[Estimate]:
    with Session(engine) as s:
        jobs = list(s.scalars(select(Job).where(Job.id.in_(ids))))
        found = estimate(s, jobs, max_batch_size=cap, now=NOW)
    return [found[i] for i in ids]


def seconds(moment: datetime | None) -> float:
    assert moment is not None
    return round((moment - NOW).total_seconds(), 6)


def test_waiting_jobs_run_in_batches_in_closed_form(engine: Engine) -> None:
    """Five like jobs, batches of two, 0.01 s per image-step, one worker: batches [0 1] [2 3] [4]
    take 0.4, 0.4 and 0.2 s."""
    rate(engine, 0.01)
    got = estimates(engine, queue(engine, 5), cap=2)
    assert [e.queue_position for e in got] == [0, 1, 2, 3, 4]
    assert [seconds(e.start) for e in got] == [0.0, 0.0, 0.4, 0.4, 0.8]
    assert [seconds(e.finish) for e in got] == [0.4, 0.4, 0.8, 0.8, 1.0]


def test_without_measurements_the_default_rate_is_used(engine: Engine) -> None:
    (only,) = estimates(engine, queue(engine, 1))
    assert seconds(only.start) == 0.0
    assert seconds(only.finish) == pytest.approx(STEPS * DEFAULT_SECONDS_PER_IMAGE_STEP)


def test_running_jobs_extrapolate_their_progress(engine: Engine) -> None:
    started = NOW - timedelta(seconds=10)
    quarter, half, fresh = (
        add_job(engine, "a", JobStatus.RUNNING, worker_host="w1", started_at=started,
                progress_step=5),
        add_job(engine, "b", JobStatus.RUNNING, worker_host="w2", started_at=started,
                progress_step=10),
        add_job(engine, "c", JobStatus.RUNNING, worker_host="w3", started_at=NOW,
                progress_step=0),
    )  # fmt: skip
    rate(engine, 0.01)
    got = estimates(engine, [quarter, half, fresh])
    assert all(e.start == started for e in got[:2]) and got[2].start == NOW
    # A step takes 0.01 s by the measured rate and 2 s (or 1 s) by the job's pace so far,
    # weighed 3:1 a quarter of the way through and 1:1 half way.
    assert [seconds(e.finish) for e in got] == [
        pytest.approx(15 * (0.75 * 0.01 + 0.25 * 2)),
        pytest.approx(10 * (0.5 * 0.01 + 0.5 * 1)),
        pytest.approx(0.2),
    ]
    assert all(e.queue_position is None for e in got)


def test_finished_jobs_have_no_estimate(engine: Engine) -> None:
    ended = [
        add_job(engine, status=status, started_at=NOW, finished_at=NOW)
        for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
    ]
    assert estimates(engine, ended) == [Estimate(None, None, None)] * 3


def test_more_work_ahead_means_a_later_start(engine: Engine) -> None:
    rate(engine, 0.01)
    short = queue(engine, 3)
    long = [add_job(engine, "token:2", seconds_ago=50 - i) for i in range(3)]
    before = estimates(engine, [short[-1], long[-1]], cap=1)
    queue(engine, 5, owner="token:3")  # another owner's jobs: in fair order, ahead of the 3rd
    after = estimates(engine, [short[-1], long[-1]], cap=1)
    for b, a in zip(before, after, strict=True):
        assert a.queue_position is not None and b.queue_position is not None
        assert a.queue_position > b.queue_position
        assert a.start is not None and b.start is not None and a.start > b.start


def test_a_faster_measured_rate_means_earlier(engine: Engine) -> None:
    ids = queue(engine, 4)
    rate(engine, 0.05)
    slow = estimates(engine, ids)[-1]
    for _ in range(20):  # the moving average follows the faster batches
        rate(engine, 0.01)
    fast = estimates(engine, ids)[-1]
    assert fast.start == slow.start == NOW  # one batch: it starts now either way
    assert seconds(fast.finish) < seconds(slow.finish)
    assert seconds(fast.finish) == pytest.approx(4 * STEPS * 0.01, rel=0.05)


def test_more_live_workers_mean_an_earlier_start(engine: Engine) -> None:
    rate(engine, 0.01)
    ids = queue(engine, 6)
    one = estimates(engine, ids, cap=1)[-1]
    with session_scope(engine) as s:
        for host in ("w1", "w2", "w3"):
            mark_present(s, host, QUEUE_GENERATE)
        mark_present(s, "trainer", "train")  # not a generation worker
    three = estimates(engine, ids, cap=1)[-1]
    assert seconds(one.start) == pytest.approx(5 * STEPS * 0.01)
    assert seconds(three.start) == pytest.approx(5 * STEPS * 0.01 / 3)


def test_running_work_delays_the_queue_and_progress_brings_it_forward(engine: Engine) -> None:
    rate(engine, 0.01)
    running = add_job(
        engine, "a", JobStatus.RUNNING, worker_host="w1",
        started_at=NOW - timedelta(seconds=10), progress_step=5,
    )  # fmt: skip
    waiting = add_job(engine, "b")
    early_run, early_wait = estimates(engine, [running, waiting])
    with session_scope(engine) as s:
        s.execute(update(Job).where(Job.id == running).values(progress_step=15))
    late_run, late_wait = estimates(engine, [running, waiting])
    assert early_run.start == late_run.start == NOW - timedelta(seconds=10)
    early_left, late_left = 15 * (0.75 * 0.01 + 0.25 * 2), 5 * (0.25 * 0.01 + 0.75 * 10 / 15)
    assert seconds(early_run.finish) == pytest.approx(early_left)
    assert seconds(late_run.finish) == pytest.approx(late_left)
    assert seconds(early_wait.start) == pytest.approx(early_left)
    assert seconds(late_wait.start) == pytest.approx(late_left)
    assert late_wait.start is not None and early_wait.start is not None
    assert late_wait.start < early_wait.start


def test_the_moving_average_starts_as_a_mean_then_weighs_the_newest_by_a_fifth(
    engine: Engine,
) -> None:
    for r in (0.10, 0.20, 0.30, 0.40, 0.50):
        rate(engine, r)
    with Session(engine) as s:
        row = s.scalars(select(ThroughputSample)).one()
        assert (row.model, row.batch_size, row.samples) == ("default", 1, 5)
        assert row.seconds_per_image_step == pytest.approx(0.30)  # the mean of the five
    rate(engine, 1.30)
    with Session(engine) as s:
        row = s.scalars(select(ThroughputSample)).one()
        assert row.seconds_per_image_step == pytest.approx(0.30 + 0.2 * (1.30 - 0.30))


def test_a_worker_is_live_for_a_minute_after_it_last_said_so(engine: Engine) -> None:
    with session_scope(engine) as s:
        mark_present(s, "w1", "generate")
        mark_present(s, "w2", "generate,train")
        mark_present(s, "w3", "generate")
    with session_scope(engine) as s:
        s.execute(
            update(WorkerPresence)
            .where(WorkerPresence.host == "w3")
            .values(last_seen=utcnow() - timedelta(seconds=61))
        )
    with Session(engine) as s:
        assert live_workers(s) == 2


def test_the_reaper_forgets_workers_gone_for_a_day(engine: Engine) -> None:
    from core.upkeep.reaper import fold_status_counts

    with session_scope(engine) as s:
        for host in ("new", "quiet", "gone"):
            mark_present(s, host, "generate")
    ago = {"quiet": timedelta(hours=23), "gone": timedelta(hours=25)}
    with session_scope(engine) as s:
        for host, age in ago.items():
            s.execute(
                update(WorkerPresence)
                .where(WorkerPresence.host == host)
                .values(last_seen=utcnow() - age)
            )
    fold_status_counts(engine)  # a reaper pass's housekeeping
    with Session(engine) as s:
        assert sorted(s.scalars(select(WorkerPresence.host))) == ["new", "quiet"]


def test_the_heartbeat_says_which_queues_a_worker_serves(engine: Engine) -> None:
    from worker.heartbeat import Heartbeat

    heartbeat = Heartbeat(engine, lease_seconds=60)
    heartbeat.hold(Lease(Job, uuid.uuid4(), 1))
    try:
        heartbeat.announce()
    finally:
        heartbeat.stop()
    with Session(engine) as s:
        (row,) = s.scalars(select(WorkerPresence)).all()
        assert row.queues == "generate" and live_workers(s) == 1


def test_the_worker_records_the_rate_of_each_batch_and_the_api_shows_estimates(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    from core.services.jobs import JobRequest, submit_job
    from tests.web.conftest import RecordingPublisher, bearer, make_settings
    from tests.worker.test_generation_inprocess import context
    from web import create_app
    from worker.generation import run_generation

    ctx = context(engine, tmp_path)
    for batch in range(2):
        with session_scope(engine) as s:
            for seed in range(3):
                request = JobRequest(prompt="a red circle", steps=3, seed=seed)
                submit_job(s, request, "session:earlier", ctx.settings)
        assert run_generation(ctx, uuid.uuid4())  # one batch of three
        with Session(engine) as s:
            rows = s.scalars(select(ThroughputSample)).all()
        assert len(rows) == batch  # the first batch of its kind in a process is not counted
    with Session(engine) as s:
        row = s.scalars(select(ThroughputSample)).one()
        assert (row.sampler, row.steps, row.batch_size, row.samples) == ("dpmpp-2m", 3, 3, 1)
        assert 0 < row.seconds_per_image_step < 10

    from core.services.tokens import create_token

    with session_scope(engine) as s:
        token = create_token(s, "user")[1]
        admin = create_token(s, "admin")[1]
        finished = s.scalars(select(Job.id).where(Job.status == JobStatus.SUCCEEDED)).all()
    assert len(finished) == 6
    app = create_app(make_settings(db_url, tmp_path), publisher=RecordingPublisher())
    client = app.test_client()
    r = client.post("/api/v1/jobs", json={"prompt": "a square"}, headers=bearer(token))
    job = r.get_json()
    assert job["status"] == "queued" and job["queue_position"] == 0
    start = datetime.fromisoformat(job["estimated_start"])
    finish = datetime.fromisoformat(job["estimated_finish"])
    assert finish > start
    (listed,) = client.get("/api/v1/jobs", headers=bearer(token)).get_json()["jobs"]
    assert listed["estimated_start"] is not None and listed["estimated_finish"] is not None
    done = client.get(f"/api/v1/jobs/{finished[0]}", headers=bearer(admin)).get_json()
    assert done["status"] == "succeeded"
    assert done["estimated_start"] is None and done["estimated_finish"] is None
