"""Warm models: a worker keeps several model versions loaded within its memory budget, says which
in its presence row, and its claims prefer queued jobs for those versions, within the bounds of
``core.queue.fairness`` (the lookahead in places, DQ_MODEL_AFFINITY_WAIT_SECONDS in time). The
claims go through the real ``worker.generation.claim_batch`` on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine

from core.db import Job, JobStatus, ModelKind, ModelVersion, session_scope, utcnow
from core.db.models import ApiToken, Role, WorkerPresence
from core.db.transitions import finish
from core.queue.fairness import AFFINITY_ROUNDS, Affinity
from core.runtime.settings import Settings
from core.storage import LocalStorage, Storage
from tests.conftest import make_tiny_pipeline, tmp_env
from tests.web.conftest import RecordingPublisher
from worker.context import WorkerContext, build_context
from worker.generation import Batch, claim_batch
from worker.identity import worker_identity
from worker.models import ModelCache, model_bytes


@functools.cache
def tiny_files(seed: int) -> dict[str, bytes]:
    """A tiny pipeline's checkpoint, one per seed: versions that differ in every weight."""
    with tempfile.TemporaryDirectory() as d:
        make_tiny_pipeline(seed).save(Path(d))
        return {f: (Path(d) / f).read_bytes() for f in ("model.json", "model.safetensors")}


@functools.cache
def tiny_bytes() -> int:
    return model_bytes(make_tiny_pipeline())


def add_versions(engine: Engine, storage: Storage, n: int) -> list[uuid.UUID]:
    """``n`` servable (inactive) denoiser versions, tiny pipelines of seeds 0 … n-1."""
    import json

    ids = []
    with session_scope(engine) as s:
        for seed in range(n):
            files = tiny_files(seed)
            for name, data in files.items():
                storage.put(f"models/tiny-{seed}/{name}", data)
            version = ModelVersion(
                id=uuid.uuid4(),
                name=f"tiny-{seed}-{uuid.uuid4().hex[:6]}",
                kind=ModelKind.DENOISER,
                checkpoint_key=f"models/tiny-{seed}",
                config=json.loads(files["model.json"]),
            )
            s.add(version)
            ids.append(version.id)
    return ids


def worker(
    engine: Engine,
    tmp_path: Path,
    *,
    wait: float,
    max_batch_size: int = 16,
    memory_mb: int = 64,
    presence: bool = True,
) -> WorkerContext:
    settings = Settings.from_env(
        {
            "DQ_MODEL_CACHE_DIR": str(tmp_path / "models"),
            "DQ_DEVICE": "cpu",
            **tmp_env(tmp_path),  # the engine is passed in
        },
        storage_url=f"file://{tmp_path / 'objects'}",
        max_batch_size=max_batch_size,
        model_affinity_wait_seconds=wait,
        worker_model_memory_mb=memory_mb,
        model_affinity_presence=presence,
    )
    storage = LocalStorage(tmp_path / "objects", secret="s")
    return build_context(settings, RecordingPublisher(), engine=engine, storage=storage)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def add_jobs(
    engine: Engine, owner: str, models: list[uuid.UUID | None], *, seconds_ago: float = 0
) -> list[uuid.UUID]:
    """Queued one-image jobs of ``owner``, one per entry of ``models`` (the version each runs
    on), a millisecond apart, the last ``seconds_ago``."""
    now, n = utcnow(), len(models)
    rows = [
        dict(
            id=uuid.uuid4(),
            status=JobStatus.QUEUED,
            prompt=f"job {i} of {owner}",
            negative_prompt="",
            steps=20,
            guidance=4.0,
            sampler="dpmpp-2m",
            seed=i,
            width=32,
            height=32,
            num_images=1,
            progress_total=20,
            owner=owner,
            model_version_id=model,
            created_at=now - timedelta(seconds=seconds_ago, milliseconds=n - i),
        )
        for i, model in enumerate(models)
    ]
    with session_scope(engine) as s:
        s.execute(insert(Job), rows)
    return [r["id"] for r in rows]


def claim_one(ctx: WorkerContext) -> Batch:
    """A claim as a worker makes it, its jobs then succeeding at once (nothing is generated)."""
    batch = claim_batch(ctx, uuid.uuid4())
    assert batch is not None
    with session_scope(ctx.engine) as s:
        for job in batch.jobs:
            assert finish(s, job.lease, JobStatus.SUCCEEDED)
    return batch


def fair_order(engine: Engine) -> list[uuid.UUID]:
    """The queued jobs in the stored fair order (start tag, age, id): what fair share runs."""
    with session_scope(engine) as s:
        return list(
            s.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.QUEUED)
                .order_by(Job.fair_key, Job.created_at, Job.id)
            )
        )


# --- the cache --------------------------------------------------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Any:
    from core.db import Base, make_engine

    eng = make_engine(f"sqlite:///{tmp_path / 'cache.sqlite3'}")
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


def test_a_model_costs_the_bytes_of_its_weights() -> None:
    model = make_tiny_pipeline()
    # The closed form: every parameter and buffer at 4 bytes a float32 element.
    elements = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    assert model_bytes(model) == 4 * elements
    half = make_tiny_pipeline().half()
    assert model_bytes(half) == 2 * elements


def test_the_cache_keeps_versions_least_recently_used_out_first_within_its_budget(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "objects", secret="s")
    v0, v1, v2 = add_versions(sqlite_engine, storage, 3)
    size = tiny_bytes()
    cache = ModelCache(sqlite_engine, storage, tmp_path / "models", "cpu", int(2.5 * size))

    first = cache.get(v0)
    cache.get(v1)
    assert cache.get(v0) is first  # a hit: no load, and v0 is now the most recent
    assert (cache.held(), cache.loads) == ([v1, v0], 2)
    cache.get(v2)  # a third does not fit: v1, the least recently used, goes
    assert (cache.held(), cache.loads) == ([v0, v2], 3)
    assert cache.held_bytes() == 2 * size <= cache.memory_bytes
    cache.get(v1)  # and back, in place of v0
    assert (cache.held(), cache.loads) == ([v2, v1], 4)


def test_a_model_larger_than_the_budget_is_still_kept_alone(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "objects", secret="s")
    v0, v1 = add_versions(sqlite_engine, storage, 2)
    cache = ModelCache(sqlite_engine, storage, tmp_path / "models", "cpu", tiny_bytes() // 2)
    cache.get(v0)
    assert cache.held() == [v0]
    cache.get(v1)
    assert cache.held() == [v1]


def test_the_presence_row_says_which_versions_the_worker_holds(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    ctx = worker(sqlite_engine, tmp_path, wait=10)
    v0, v1 = add_versions(sqlite_engine, ctx.storage, 2)
    ctx.heartbeat.announce()  # before any load: it holds nothing
    ctx.models.get(v1)
    ctx.models.get(None)  # the shipped default
    ctx.models.get(v0)
    ctx.models.get(v1)
    ctx.heartbeat.announce()
    with session_scope(sqlite_engine) as s:
        row = s.get(WorkerPresence, worker_identity())
        assert row is not None
        # Ids as strings, null for the default, most recently used last.
        assert row.models == [None, str(v0), str(v1)]


# --- the claim --------------------------------------------------------------------------------


def test_a_claim_takes_a_warm_job_over_a_colder_slightly_older_one(
    engine: Engine, tmp_path: Path
) -> None:
    ctx = worker(engine, tmp_path, wait=60)
    cold, warm = add_versions(engine, ctx.storage, 2)
    ctx.models.get(warm)
    (cold_job,) = add_jobs(engine, "session:a", [cold], seconds_ago=2)
    (warm_job,) = add_jobs(engine, "session:b", [warm], seconds_ago=1)
    assert fair_order(engine) == [cold_job, warm_job]  # same start tag; the cold one is older

    assert claim_one(ctx).ids == [warm_job]
    assert ctx.affinity.passed_over_for(cold_job) == pytest.approx(0, abs=1)
    assert claim_one(ctx).ids == [cold_job]  # nothing warm left: the head, whatever its model


def test_without_a_wait_the_claim_keeps_the_fair_order(engine: Engine, tmp_path: Path) -> None:
    ctx = worker(engine, tmp_path, wait=0)
    cold, warm = add_versions(engine, ctx.storage, 2)
    ctx.models.get(warm)
    (cold_job,) = add_jobs(engine, "session:a", [cold], seconds_ago=2)
    add_jobs(engine, "session:b", [warm], seconds_ago=1)
    assert claim_one(ctx).ids == [cold_job]


def test_a_cold_job_passed_over_for_the_wait_is_claimed_before_warm_ones(
    engine: Engine, tmp_path: Path
) -> None:
    ctx = worker(engine, tmp_path, wait=30, max_batch_size=1)
    clock = FakeClock()
    ctx.affinity = Affinity(30, clock=clock)
    cold, warm = add_versions(engine, ctx.storage, 2)
    ctx.models.get(warm)
    (cold_job,) = add_jobs(engine, "session:a", [cold], seconds_ago=5)
    # Six owners' warm jobs of the same round (start tag 0), younger than the cold one.
    warm_jobs = [
        add_jobs(engine, f"session:w{i}", [warm], seconds_ago=4 - i / 2)[0] for i in range(6)
    ]
    assert fair_order(engine) == [cold_job, *warm_jobs]

    assert claim_one(ctx).ids == [warm_jobs[0]]  # passes the cold job over, at t = 0
    clock.now += 29.0
    assert claim_one(ctx).ids == [warm_jobs[1]]  # still within the wait
    clock.now += 1.0
    assert claim_one(ctx).ids == [cold_job]  # passed over for 30 s: taken before warm jobs
    assert claim_one(ctx).ids == [warm_jobs[2]]


def test_a_worker_that_holds_nothing_claims_in_fair_order(engine: Engine, tmp_path: Path) -> None:
    ctx = worker(engine, tmp_path, wait=3600, max_batch_size=1)
    v0, v1, v2 = add_versions(engine, ctx.storage, 3)
    add_jobs(engine, "session:a", [v0, v1, v2, v0], seconds_ago=2)
    add_jobs(engine, "session:b", [v2, v1, v0, v2], seconds_ago=1)
    expected = fair_order(engine)
    assert [claim_one(ctx).ids[0] for _ in expected] == expected


def test_fair_share_holds_when_every_job_is_warm(engine: Engine, tmp_path: Path) -> None:
    """The figure of tests/core/test_fair_share.py with affinity on and a worker holding both
    versions: owner A has 200 jobs waiting, B submits one; B's runs right after A's first batch."""
    ctx = worker(engine, tmp_path, wait=3600)
    va, vb = add_versions(engine, ctx.storage, 2)
    ctx.models.get(va)
    ctx.models.get(vb)
    add_jobs(engine, "session:a", [va] * 200, seconds_ago=60)
    (b_job,) = add_jobs(engine, "session:b", [vb])
    first = claim_one(ctx)  # A's first 16: a batch of one version
    assert b_job not in first.ids and len(first.ids) == 16
    assert claim_one(ctx).ids == [b_job]  # the next claim, ahead of A's 17th


def test_warm_owners_pass_a_cold_job_by_their_next_rounds_turns_and_no_more(
    engine: Engine, tmp_path: Path
) -> None:
    """B's one job needs a version the worker does not hold; A and C have 200 jobs each on the
    one it holds. With a wait of an hour, B's job is passed by A's and C's turns of the next
    AFFINITY_ROUNDS rounds (start tags below B's + AFFINITY_ROUNDS) and then claimed, ahead of
    their later turns: affinity reorders a few rounds of the fair order and moves no owner's
    share. With a weight of 2 for A, A's turns count twice."""
    for weight in (1.0, 2.0):
        ctx = worker(engine, tmp_path, wait=3600, max_batch_size=1)
        cold, warm = add_versions(engine, ctx.storage, 2)
        ctx.models.get(warm)
        a = token_owner(engine, weight)
        (b_job,) = add_jobs(engine, f"session:b{weight}", [cold], seconds_ago=70)
        add_jobs(engine, a, [warm] * 200, seconds_ago=60)
        add_jobs(engine, f"session:c{weight}", [warm] * 200, seconds_ago=50)
        assert fair_order(engine)[0] == b_job
        owners = []
        while b_job not in (batch := claim_one(ctx)).ids:
            owners.append(job_owner(engine, batch.ids[0]))
        turns = int(AFFINITY_ROUNDS)
        expected = [a] * int(turns * weight) + [f"session:c{weight}"] * turns
        assert sorted(owners) == sorted(expected)
        with session_scope(engine) as s:  # the next weight starts from an empty queue
            s.execute(delete(Job))


def token_owner(engine: Engine, weight: float) -> str:
    with session_scope(engine) as s:
        token = ApiToken(token_hash=uuid.uuid4().hex, role=Role.USER, weight=weight)
        s.add(token)
        s.flush()
        return f"token:{token.id}"


def job_owner(engine: Engine, job_id: uuid.UUID) -> str:
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.owner


# --- what the other workers hold --------------------------------------------------------------


def another_worker_holds(
    engine: Engine,
    models: list[uuid.UUID | None],
    *,
    host: str = "other:1",
    queues: str = "generate",
) -> None:
    from core.queue.eta import mark_present

    with session_scope(engine) as s:
        mark_present(s, host, queues, models=[None if m is None else str(m) for m in models])


def test_models_held_elsewhere_reads_other_live_generation_workers(
    engine: Engine, tmp_path: Path
) -> None:
    from sqlalchemy import update

    from core.queue.eta import models_held_elsewhere

    ctx = worker(engine, tmp_path, wait=10)
    v0, v1, v2, v3 = add_versions(engine, ctx.storage, 4)
    another_worker_holds(engine, [None, v0], host="other:1")
    another_worker_holds(engine, [v1], host="gone:2")
    another_worker_holds(engine, [v2], host="trainer:3", queues="train")
    another_worker_holds(engine, [v3], host=ctx.host)  # this worker itself
    with session_scope(engine) as s:  # gone:2 was last seen two minutes ago
        s.execute(
            update(WorkerPresence)
            .where(WorkerPresence.host == "gone:2")
            .values(last_seen=utcnow() - timedelta(minutes=2))
        )
        s.execute(
            update(WorkerPresence)
            .where(WorkerPresence.host == "other:1")
            .values(models=[None, str(v0), "not-a-version-id"])
        )
    with session_scope(engine) as s:
        assert models_held_elsewhere(s, ctx.host) == {None, v0}


def test_a_load_tells_the_other_workers_at_once(engine: Engine, tmp_path: Path) -> None:
    from core.queue.eta import models_held_elsewhere

    ctx = worker(engine, tmp_path, wait=10)
    (v0,) = add_versions(engine, ctx.storage, 1)
    add_jobs(engine, "session:a", [v0])
    batch = claim_batch(ctx, uuid.uuid4())
    assert batch is not None
    ctx.heartbeat.hold(*(j.lease for j in batch.jobs))  # as run_generation does, before loading
    try:
        # The heartbeat's thread says at once that it holds nothing, then not for 10 s.
        deadline = time.monotonic() + 10
        while presence(engine, ctx.host) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert presence(engine, ctx.host) == []
        ctx.models.get(v0)  # the load itself writes the presence row
        with session_scope(engine) as s:
            assert models_held_elsewhere(s, "someone else") == {v0}
    finally:
        ctx.heartbeat.release(*batch.ids)
        ctx.heartbeat.stop()


def presence(engine: Engine, host: str) -> list[str | None] | None:
    with session_scope(engine) as s:
        row = s.get(WorkerPresence, host)
        return None if row is None else row.models


def test_a_claim_leaves_the_head_to_the_worker_that_holds_its_model(
    engine: Engine, tmp_path: Path
) -> None:
    """The head's version is held by another live worker, and this one holds another: rather
    than load a second copy of the head's version, it takes the next job whose version no
    other worker holds; the head waits at most the affinity wait, as any passed-over job."""
    ctx = worker(engine, tmp_path, wait=30, max_batch_size=1)
    clock = FakeClock()
    ctx.affinity = Affinity(30, clock=clock)
    mine, theirs, nobodys = add_versions(engine, ctx.storage, 3)
    ctx.models.get(mine)
    another_worker_holds(engine, [theirs])
    (head,) = add_jobs(engine, "session:a", [theirs], seconds_ago=3)
    unheld = [
        add_jobs(engine, f"session:u{i}", [nobodys], seconds_ago=2 - i / 2)[0] for i in range(2)
    ]
    assert fair_order(engine) == [head, *unheld]

    assert claim_one(ctx).ids == [unheld[0]]  # some worker has to load this one
    assert ctx.affinity.passed_over_for(head) == pytest.approx(0, abs=1)
    clock.now += 30.0
    assert claim_one(ctx).ids == [head]  # passed over for the wait: its turn now
    assert claim_one(ctx).ids == [unheld[1]]


def test_a_worker_that_holds_nothing_also_leaves_the_head_to_its_holder(
    engine: Engine, tmp_path: Path
) -> None:
    ctx = worker(engine, tmp_path, wait=30, max_batch_size=1)
    theirs, nobodys = add_versions(engine, ctx.storage, 2)
    another_worker_holds(engine, [theirs])
    add_jobs(engine, "session:a", [theirs], seconds_ago=2)  # the head
    (unheld,) = add_jobs(engine, "session:b", [nobodys], seconds_ago=1)
    assert claim_one(ctx).ids == [unheld]


def test_the_head_is_taken_when_nothing_else_is_unheld_or_presence_is_off(
    engine: Engine, tmp_path: Path
) -> None:
    ctx = worker(engine, tmp_path, wait=30, max_batch_size=1)
    mine, theirs, also_theirs = add_versions(engine, ctx.storage, 3)
    ctx.models.get(mine)
    another_worker_holds(engine, [theirs, also_theirs])
    (head,) = add_jobs(engine, "session:a", [theirs], seconds_ago=3)
    (second,) = add_jobs(engine, "session:b", [also_theirs], seconds_ago=2)
    # Every job is held elsewhere: an idle worker does not wait, it takes the head.
    assert claim_one(ctx).ids == [head]

    off = worker(engine, tmp_path, wait=30, max_batch_size=1, presence=False)
    off.models.get(mine)
    (unheld_version,) = add_versions(engine, off.storage, 1)
    add_jobs(engine, "session:c", [unheld_version], seconds_ago=1)
    assert fair_order(engine)[0] == second
    assert claim_one(off).ids == [second]  # DQ_MODEL_AFFINITY_PRESENCE=false: the fair order


def test_a_job_far_behind_the_head_is_not_taken_for_being_unheld(
    engine: Engine, tmp_path: Path
) -> None:
    """The rounds bound holds for unheld jobs as for warm ones: an owner with the head's
    version held elsewhere keeps its place against jobs past the head's next rounds."""
    ctx = worker(engine, tmp_path, wait=3600, max_batch_size=1)
    theirs, nobodys = add_versions(engine, ctx.storage, 2)
    another_worker_holds(engine, [theirs])
    # One owner: its 10 jobs have start tags 0..9; the unheld one is its 6th (tag 5 ≥ 0 + 4).
    jobs = add_jobs(engine, "session:a", [theirs] * 5 + [nobodys] + [theirs] * 4, seconds_ago=1)
    assert fair_order(engine) == jobs
    assert claim_one(ctx).ids == [jobs[0]]
