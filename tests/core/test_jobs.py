"""Submitting, finding and canceling jobs (core/services/jobs.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import JobStatus, session_scope, transition_job
from core.runtime.settings import Settings
from core.services.jobs import (
    SAMPLER_NAMES,
    IdempotencyConflict,
    JobNotFound,
    JobRequest,
    JobRequestError,
    cancel_job,
    get_job,
    list_jobs,
    queue_position,
    submit_job,
)

SETTINGS = Settings.from_env({}, max_steps=50, max_images_per_job=4, max_prompt_chars=100)


def submit(engine: Engine, owner: str = "token:1", key: str | None = None, **kw: object):  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        job, created = submit_job(s, JobRequest(**{"prompt": "a red circle", **kw}), owner,
                                  SETTINGS, key)  # fmt: skip
        return job, created


def test_sampler_names_match_the_samplers() -> None:
    from core.diffusion.samplers import SAMPLERS

    assert set(SAMPLER_NAMES) == set(SAMPLERS)


def test_defaults_come_from_the_serving_model_and_the_seed_is_random(engine: Engine) -> None:
    job, created = submit(engine)
    assert created and job.status is JobStatus.QUEUED
    # The shipped default model declares these (core/diffusion/default_model/model.json).
    assert (job.steps, job.guidance, job.sampler, job.width, job.num_images) == (
        10, 4.0, "dpmpp-3m", 64, 1,
    )  # fmt: skip
    assert job.guidance_interval == [0.3, 1.0]
    assert job.model_version_id is None and job.progress_total == 10
    other, _ = submit(engine)
    assert job.seed != other.seed and 0 <= job.seed < 2**63


@pytest.mark.parametrize(
    ("request_kw", "field", "message"),
    [
        ({"prompt": "  "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 101}, "prompt", "is 101 characters; the limit is 100"),
        ({"negative_prompt": "y" * 101}, "negative_prompt", "the limit is 100"),
        ({"steps": 0}, "steps", "must be from 1 to 50"),
        ({"steps": 51}, "steps", "must be from 1 to 50"),
        ({"steps": 2.5}, "steps", "must be an integer"),
        ({"guidance": -1}, "guidance", "must be from 0 to 30"),
        ({"guidance": float("nan")}, "guidance", "must be from 0 to 30"),
        ({"sampler": "euler"}, "sampler", "must be one of ddpm, ddim, dpmpp-2m"),
        ({"num_images": 5}, "num_images", "must be from 1 to 4"),
        ({"seed": -1}, "seed", "must be from 0"),
        ({"seed": 2**62 + 1, "num_images": 2}, "seed", "must be from 0"),
        ({"size": 72}, "size", "must be a multiple of 16"),
        ({"size": 256}, "size", "must be from 16 to 128"),
        ({"steps": True}, "steps", "must be an integer"),
    ],
)
def test_a_bad_request_names_its_field_and_writes_nothing(
    engine: Engine, request_kw: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(JobRequestError) as info:
        submit(engine, **request_kw)
    assert info.value.field == field and message in info.value.message
    with Session(engine) as s:
        assert list_jobs(s, None)[1] == 0


def test_idempotency_key_replays_the_same_request_and_refuses_another(engine: Engine) -> None:
    first, created = submit(engine, key="k-1", seed=5)
    again, created_again = submit(engine, key="k-1", seed=5)
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        submit(engine, key="k-1", seed=6)
    other_owner, created = submit(engine, owner="token:2", key="k-1", seed=6)
    assert created and other_owner.id != first.id
    with Session(engine) as s:
        assert list_jobs(s, None)[1] == 2


def test_jobs_are_visible_to_their_owner_and_admins_only(engine: Engine) -> None:
    job, _ = submit(engine, owner="session:abc")
    with Session(engine) as s:
        assert get_job(s, job.id, "session:abc").id == job.id
        assert get_job(s, str(job.id), None).id == job.id  # an admin
        for owner, job_id in (("token:1", job.id), ("session:abc", uuid.uuid4()),
                              ("session:abc", "not-a-uuid")):  # fmt: skip
            with pytest.raises(JobNotFound):
                get_job(s, job_id, owner)


def test_listing_pages_newest_first_with_a_status_filter(engine: Engine) -> None:
    ids = [submit(engine, owner="token:7")[0].id for _ in range(5)]
    submit(engine, owner="token:8")
    with session_scope(engine) as s:
        transition_job(s, ids[0], JobStatus.CANCELED)
    with Session(engine) as s:
        page, total = list_jobs(s, "token:7", limit=2, offset=0)
        assert total == 5 and [j.id for j in page] == [ids[4], ids[3]]
        page, _ = list_jobs(s, "token:7", limit=2, offset=4)
        assert [j.id for j in page] == [ids[0]]
        canceled, total = list_jobs(s, "token:7", status=JobStatus.CANCELED)
        assert total == 1 and canceled[0].id == ids[0]


def test_queue_position_counts_the_queued_jobs_ahead(engine: Engine) -> None:
    jobs = [submit(engine)[0] for _ in range(3)]
    with session_scope(engine) as s:
        assert transition_job(s, jobs[0].id, JobStatus.RUNNING)
    with Session(engine) as s:
        positions = [queue_position(s, get_job(s, j.id, None)) for j in jobs]
    assert positions == [None, 0, 1]


def test_cancel_ends_a_queued_job_and_flags_a_running_one(engine: Engine) -> None:
    queued, _ = submit(engine)
    running, _ = submit(engine)
    done, _ = submit(engine)
    with session_scope(engine) as s:
        transition_job(s, running.id, JobStatus.RUNNING)
        transition_job(s, done.id, JobStatus.RUNNING)
        transition_job(s, done.id, JobStatus.SUCCEEDED)
    with session_scope(engine) as s:
        q = cancel_job(s, get_job(s, queued.id, None))
        r = cancel_job(s, get_job(s, running.id, None))
        d = cancel_job(s, get_job(s, done.id, None))
        assert (q.status, q.finished_at is not None) == (JobStatus.CANCELED, True)
        assert (r.status, r.cancel_requested) == (JobStatus.RUNNING, True)
        assert (d.status, d.cancel_requested) == (JobStatus.SUCCEEDED, False)
