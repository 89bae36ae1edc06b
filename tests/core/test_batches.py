"""Batch submissions (core/services/batches.py): prompt lists and matrices, derived seeds, all or
nothing, the caps, idempotency, cancel, and the batch's one "completed" webhook; on SQLite and
PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import Job, JobStatus, session_scope
from core.db.models import Batch, WebhookDelivery
from core.runtime.settings import Settings
from core.services.batches import (
    SEED_MODULUS,
    BatchNotFound,
    BatchOverActiveCap,
    PromptMatrix,
    SharedSettings,
    cancel_batch,
    expand_matrix,
    finish_batches,
    get_batch,
    list_batches,
    status_counts,
    submit_batch,
)
from core.services.jobs import IdempotencyConflict, JobRequestError, QueueFull, WebhookTarget

SETTINGS = Settings.from_env(
    {}, max_batch_items=10, max_active_jobs_per_owner=12, max_prompt_chars=100
)
OWNER = "token:1"
SHAPES = PromptMatrix("a {color} {shape}", {"color": ["red", "green"],
                                           "shape": ["circle", "square", "triangle"]})  # fmt: skip


def submit(engine: Engine, owner: str = OWNER, settings: Settings = SETTINGS, **kw: Any) -> Any:
    with session_scope(engine) as s:
        batch, jobs, created = submit_batch(s, owner, settings, **kw)
        return batch, jobs, created


def job_count(engine: Engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def test_a_2x3_matrix_makes_6_jobs_in_order_with_seeds_from_the_base(engine: Engine) -> None:
    batch, jobs, created = submit(
        engine, matrix=SHAPES, shared=SharedSettings(num_images=2), seed=1000
    )
    assert created and batch.size == 6
    assert [j.prompt for j in jobs] == [
        "a red circle", "a red square", "a red triangle",
        "a green circle", "a green square", "a green triangle",
    ]  # fmt: skip
    # Item i starts at base + i * num_images: its two images never share a seed with another's.
    assert [j.seed for j in jobs] == [1000, 1002, 1004, 1006, 1008, 1010]
    assert all(j.batch_id == batch.id and j.status is JobStatus.QUEUED for j in jobs)
    assert batch.request["base_seed"] == 1000 and batch.request["seed"] == 1000


def test_item_seeds_wrap_within_the_range_a_job_takes(engine: Engine) -> None:
    _, jobs, _ = submit(engine, prompts=["a", "b", "c"], seed=SEED_MODULUS - 2)
    assert [j.seed for j in jobs] == [SEED_MODULUS - 2, SEED_MODULUS - 1, 0]


def test_a_prompt_list_makes_one_job_each_with_shared_settings(engine: Engine) -> None:
    shared = SharedSettings(negative_prompt="blurry", steps=5, guidance=2.0, sampler="ddim")
    batch, jobs, _ = submit(engine, prompts=["a red circle", "a blue square"], shared=shared)
    assert [j.prompt for j in jobs] == ["a red circle", "a blue square"]
    assert {(j.negative_prompt, j.steps, j.guidance, j.sampler) for j in jobs} == {
        ("blurry", 5, 2.0, "ddim")
    }
    base = batch.request["base_seed"]
    assert [j.seed for j in jobs] == [base, (base + 1) % SEED_MODULUS]


def test_matrix_text_stays_free_text() -> None:
    matrix = PromptMatrix(
        "{a} {a} {1} {} {{b}} \\1", {"a": ["x\\1", "{b}"], "b": ["B"], "unused": ["u"]}
    )
    # A repeated name takes one value; other braces are text; a value goes in as it is (its
    # "{b}" is not filled in again); names the template does not use make no more prompts.
    assert expand_matrix(matrix, 10, 100) == [
        "x\\1 x\\1 {1} {} {B} \\1",
        "{b} {b} {1} {} {B} \\1",
    ]


@pytest.mark.parametrize(
    ("kw", "field", "message"),
    [
        ({"matrix": PromptMatrix("a {color} {size}", {"color": ["red"]})}, "matrix.values",
         "no values for the placeholder {size}"),
        ({"matrix": PromptMatrix("a {color}", {"color": []})}, "matrix.values.color",
         "at least one value"),
        ({"matrix": PromptMatrix("a {x} {y}", {"x": list("abcd"), "y": list("abc")})}, "matrix",
         "makes 12 jobs; the most one batch may make is 10 jobs (DQ_MAX_BATCH_ITEMS)"),
        ({"matrix": PromptMatrix("a {x}", {"x": list("abcdefghijk")})}, "matrix.values.x",
         "lists 11 values; the most one batch may make is 10 jobs (DQ_MAX_BATCH_ITEMS)"),
        ({"prompts": ["p"] * 11}, "prompts",
         "lists 11 prompts; the most one batch may make is 10 jobs (DQ_MAX_BATCH_ITEMS)"),
        ({"prompts": []}, "prompts", "at least one prompt"),
        ({"prompts": ["ok", "ok", "  "]}, "prompts.2", "must not be empty"),
        ({"prompts": ["ok", "x" * 101]}, "prompts.1", "the limit is 100"),
        ({"matrix": PromptMatrix("{x}", {"x": ["ok", " "]})}, "matrix.template",
         "must not be empty (the prompt ' ')"),
        ({"prompts": ["ok"], "shared": SharedSettings(steps=0)}, "steps", "must be from 1"),
        ({"prompts": ["ok"], "seed": -1}, "seed", "must be from 0"),
        ({"prompts": ["a"], "matrix": SHAPES}, "prompts", "either prompts or matrix"),
        ({}, "prompts", "either prompts or matrix"),
    ],
)  # fmt: skip
def test_a_bad_batch_names_its_field_and_adds_nothing(
    engine: Engine, kw: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(JobRequestError) as info:
        submit(engine, **kw)
    assert info.value.field == field and message in info.value.message
    assert job_count(engine) == 0
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Batch)) == 0


def test_the_per_owner_cap_counts_the_whole_batch(engine: Engine) -> None:
    submit(engine, prompts=["a"] * 10)
    with pytest.raises(BatchOverActiveCap) as info:
        submit(engine, prompts=["b"] * 3)  # 10 + 3 > 12
    assert "DQ_MAX_ACTIVE_JOBS_PER_OWNER" in str(info.value) and "3 jobs" in str(info.value)
    assert job_count(engine) == 10
    _, jobs, _ = submit(engine, prompts=["b"] * 2)  # exactly at the cap
    assert len(jobs) == 2
    submit(engine, owner="token:2", prompts=["c"] * 10)  # another owner has their own


def test_the_queue_cap_counts_the_whole_batch(engine: Engine) -> None:
    settings = Settings.from_env({}, max_queued_jobs=4)
    submit(engine, prompts=["a"] * 3, settings=settings)
    with pytest.raises(QueueFull):
        submit(engine, owner="token:2", prompts=["b"] * 2, settings=settings)
    assert job_count(engine) == 3


def test_an_idempotent_replay_returns_the_batch_and_another_body_conflicts(
    engine: Engine,
) -> None:
    batch, jobs, created = submit(engine, matrix=SHAPES, idempotency_key="k1")
    again, jobs_again, created_again = submit(engine, matrix=SHAPES, idempotency_key="k1")
    assert created and not created_again and again.id == batch.id
    assert [j.id for j in jobs_again] == [j.id for j in jobs]
    assert job_count(engine) == 6
    with pytest.raises(IdempotencyConflict):
        submit(engine, prompts=["a red circle"], idempotency_key="k1")
    # Keys belong to their owner.
    other, _, created_other = submit(engine, owner="token:2", matrix=SHAPES, idempotency_key="k1")
    assert created_other and other.id != batch.id


def test_another_owner_cannot_see_or_cancel_a_batch(engine: Engine) -> None:
    batch, _, _ = submit(engine, prompts=["a"])
    with Session(engine) as s:
        with pytest.raises(BatchNotFound):
            get_batch(s, batch.id, "token:2")
        with pytest.raises(BatchNotFound):
            cancel_batch(s, s.get(Batch, batch.id), "token:2")  # type: ignore[arg-type]
        assert get_batch(s, batch.id, None).id == batch.id  # an admin sees it
        assert list_batches(s, "token:2") == ([], 0)


def test_cancelling_a_batch_cancels_every_job_still_to_end(engine: Engine) -> None:
    batch, jobs, _ = submit(engine, matrix=SHAPES)
    with session_scope(engine) as s:
        s.execute(update(Job).where(Job.id == jobs[0].id).values(status=JobStatus.RUNNING))
        s.execute(update(Job).where(Job.id == jobs[1].id).values(status=JobStatus.SUCCEEDED))
    with session_scope(engine) as s:
        cancel_batch(s, get_batch(s, batch.id, OWNER), OWNER)
    with Session(engine) as s:
        by_id = {j.id: j for j in s.scalars(select(Job))}
        assert by_id[jobs[0].id].status is JobStatus.RUNNING and by_id[jobs[0].id].cancel_requested
        assert by_id[jobs[1].id].status is JobStatus.SUCCEEDED
        assert {by_id[j.id].status for j in jobs[2:]} == {JobStatus.CANCELED}
        counts = status_counts(s, [batch.id])[batch.id]
        assert counts == {"queued": 0, "running": 1, "succeeded": 1, "failed": 0, "canceled": 4}


def deliveries(engine: Engine) -> list[WebhookDelivery]:
    with Session(engine) as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def test_the_batch_completed_webhook_is_added_once_after_every_job_ended(engine: Engine) -> None:
    hook = WebhookTarget("https://example.com/hook", None)
    batch, jobs, _ = submit(engine, matrix=SHAPES, webhook=hook)
    quiet, _, _ = submit(engine, owner="token:2", prompts=["a"])  # no webhook
    with session_scope(engine) as s:
        assert finish_batches(s) == []
        ended = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED]
        for i, job in enumerate(jobs[:-1]):
            s.execute(update(Job).where(Job.id == job.id).values(status=ended[i % 3]))
    with session_scope(engine) as s:
        assert finish_batches(s) == []  # one job still queued
        s.execute(update(Job).where(Job.id == jobs[-1].id).values(status=JobStatus.SUCCEEDED))
        s.execute(update(Job).where(Job.batch_id == quiet.id).values(status=JobStatus.FAILED))
    with session_scope(engine) as s:
        assert set(finish_batches(s)) == {batch.id, quiet.id}
    with session_scope(engine) as s:
        assert finish_batches(s) == []  # once
    (delivery,) = deliveries(engine)  # the jobs had no per-job filter: they sent nothing
    assert delivery.message_id == f"msg_{batch.id.hex}_completed"
    assert (delivery.batch_id, delivery.job_id, delivery.event) == (batch.id, None, "completed")
    assert (delivery.owner, delivery.url, delivery.state) == (OWNER, hook.url, "pending")
    with Session(engine) as s:
        assert s.get(Batch, batch.id).finished_at is not None  # type: ignore[union-attr]


def test_a_per_job_filter_sends_those_events_of_each_job_too(engine: Engine) -> None:
    hook = WebhookTarget("https://example.com/hook", ("failed",))
    batch, jobs, _ = submit(engine, prompts=["a", "b"], webhook=hook)
    assert {(j.webhook_url, tuple(j.webhook_events or ())) for j in jobs} == {
        (hook.url, ("failed",))
    }
    with session_scope(engine) as s:
        s.execute(update(Job).where(Job.id == jobs[0].id).values(status=JobStatus.FAILED))
        s.execute(update(Job).where(Job.id == jobs[1].id).values(status=JobStatus.SUCCEEDED))
    with session_scope(engine) as s:
        finish_batches(s)
    events = {(d.job_id, d.batch_id, d.event) for d in deliveries(engine)}
    assert events == {(jobs[0].id, None, "failed"), (None, batch.id, "completed")}
