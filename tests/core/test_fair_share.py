"""Fair share between owners: claims take waiting jobs in weighted round-robin across owners,
through the real claim (``worker.generation.claim_batch`` with a real WorkerContext) on SQLite
and PostgreSQL; queue positions tell that order; admins set the weights."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db import ApiToken, Job, JobStatus, session_scope, utcnow
from core.db.models import AuditEvent, Role
from core.db.transitions import finish
from core.runtime.settings import Settings
from core.services.jobs import get_job, queue_position
from core.services.tokens import set_weight
from core.storage import LocalStorage
from tests.conftest import tmp_env
from tests.web.conftest import RecordingPublisher, bearer, make_settings
from worker.context import WorkerContext, build_context
from worker.generation import Batch, claim_batch


def worker(engine: Engine, tmp_path: Path, max_batch_size: int = 16) -> WorkerContext:
    settings = Settings.from_env(
        {"DQ_MODEL_CACHE_DIR": str(tmp_path / "models"), "DQ_DEVICE": "cpu", **tmp_env(tmp_path)},
        storage_url=f"file://{tmp_path / 'objects'}",
        max_batch_size=max_batch_size,
    )
    storage = LocalStorage(tmp_path / "objects", secret="s")
    return build_context(settings, RecordingPublisher(), engine=engine, storage=storage)


def add_jobs(
    engine: Engine, owner: str, n: int, *, steps: int = 20, seconds_ago: float = 0
) -> list[uuid.UUID]:
    """``n`` queued one-image jobs of ``owner``, a millisecond apart, the last ``seconds_ago``."""
    now = utcnow()
    rows = [
        dict(
            id=uuid.uuid4(),
            status=JobStatus.QUEUED,
            prompt=f"job {i} of {owner}",
            negative_prompt="",
            steps=steps,
            guidance=4.0,
            sampler="dpmpp-2m",
            seed=i,
            width=32,
            height=32,
            num_images=1,
            progress_total=steps,
            owner=owner,
            created_at=now - timedelta(seconds=seconds_ago, milliseconds=n - i),
        )
        for i in range(n)
    ]
    with session_scope(engine) as s:
        s.execute(insert(Job), rows)
    return [r["id"] for r in rows]


def token_owner(engine: Engine, weight: float = 1.0) -> str:
    with session_scope(engine) as s:
        token = ApiToken(token_hash=uuid.uuid4().hex, role=Role.USER, weight=weight)
        s.add(token)
        s.flush()
        return f"token:{token.id}"


def run_one_batch(ctx: WorkerContext) -> Batch | None:
    """What a worker does with a message: claim the fairest batch, run it (here: succeed at
    once)."""
    batch = claim_batch(ctx, uuid.uuid4())  # the message's own job plays no part
    if batch is not None:
        with session_scope(ctx.engine) as s:
            for job in batch.jobs:
                assert finish(s, job.lease, JobStatus.SUCCEEDED)
    return batch


def claim_order(ctx: WorkerContext, batches: int) -> list[list[uuid.UUID]]:
    out = []
    for _ in range(batches):
        batch = run_one_batch(ctx)
        if batch is None:
            break
        out.append(batch.ids)
    return out


@pytest.mark.parametrize("b_shares_a_batch", [True, False], ids=["same-kind", "other-kind"])
def test_one_job_of_b_starts_within_one_batch_not_after_a_200(
    engine: Engine, tmp_path: Path, b_shares_a_batch: bool
) -> None:
    """The figure: owner A has 200 jobs waiting, owner B submits one. First come, first served
    would run B's job after all 200 of A's; fair share runs it within the next claim's batch
    (when it can share A's batch) or the one after (when it cannot)."""
    ctx = worker(engine, tmp_path, max_batch_size=16)
    add_jobs(engine, "token:1", 200, seconds_ago=60)
    (b_job,) = add_jobs(engine, "session:b", 1, steps=20 if b_shares_a_batch else 12)
    claimed_before_b, batch_number = 0, 0
    while (batch := run_one_batch(ctx)) is not None and b_job not in batch.ids:
        claimed_before_b += len(batch.ids)
        batch_number += 1
    assert batch is not None
    claimed_before_b += batch.ids.index(b_job)
    print(
        f"\nB's wait: {claimed_before_b} of A's jobs claimed before B's "
        f"(batch {batch_number + 1} of the claims; first come, first served: 200)"
    )
    assert batch_number <= 1  # the next claim's batch, or the one after
    assert claimed_before_b <= ctx.settings.max_batch_size  # at most one batch of A's, not 200
    if b_shares_a_batch:
        assert (batch_number, claimed_before_b) == (0, 1)  # right behind A's first job


def test_a_weight_of_two_gets_two_turns_per_round(engine: Engine, tmp_path: Path) -> None:
    heavy, light = token_owner(engine), token_owner(engine)
    with session_scope(engine) as s:
        set_weight(s, int(heavy.split(":")[1]), 2.0)
    add_jobs(engine, heavy, 60, seconds_ago=1)
    add_jobs(engine, light, 60, seconds_ago=2)  # older: first come, first served runs these

    # One job a claim: every claim is one turn.
    ctx = worker(engine, tmp_path, max_batch_size=1)
    claimed = [ids[0] for ids in claim_order(ctx, 30)]
    owners = [get_owner(engine, j) for j in claimed]
    assert abs(owners.count(heavy) - 20) <= 1 and abs(owners.count(light) - 10) <= 1
    for start in range(0, 30, 3):  # and the turns interleave: 2 + 1 in every round of three
        assert owners[start : start + 3].count(heavy) == 2, owners


def test_a_batch_is_filled_in_the_same_fair_order(engine: Engine, tmp_path: Path) -> None:
    heavy, light = token_owner(engine, weight=2.0), token_owner(engine)
    add_jobs(engine, light, 40, seconds_ago=2)
    add_jobs(engine, heavy, 40, seconds_ago=1)
    ctx = worker(engine, tmp_path, max_batch_size=12)
    (first,) = claim_order(ctx, 1)
    owners = [get_owner(engine, j) for j in first]
    # Keys 0.5, 1, 1.5, … against 1, 2, 3, …: up to key 4, 8 of the heavy owner's, 4 of the other.
    assert (owners.count(heavy), owners.count(light)) == (8, 4)


def test_queue_position_is_the_number_of_jobs_that_run_before(
    engine: Engine, tmp_path: Path
) -> None:
    heavy, light, anonymous = token_owner(engine, weight=2.0), token_owner(engine), "session:x"
    jobs = [
        *add_jobs(engine, light, 7, seconds_ago=30),
        *add_jobs(engine, heavy, 9, seconds_ago=20),
        *add_jobs(engine, anonymous, 4, seconds_ago=10),
    ]
    with Session(engine) as s:
        positions = {j: queue_position(s, get_job(s, j, None)) for j in jobs}
    assert sorted(p for p in positions.values() if p is not None) == list(range(len(jobs)))
    ctx = worker(engine, tmp_path, max_batch_size=1)
    claimed = [ids[0] for ids in claim_order(ctx, len(jobs) + 1)]
    assert claimed == sorted(jobs, key=lambda j: positions[j])
    with Session(engine) as s:
        assert queue_position(s, get_job(s, jobs[0], None)) is None  # no longer queued


def test_a_message_whose_job_was_taken_still_claims_the_fairest_batch(
    engine: Engine, tmp_path: Path
) -> None:
    """Messages are work tokens: one per job, and every claim takes at least one job, so no job
    is left without a message; the messages left over do nothing."""
    ctx = worker(engine, tmp_path)
    a, b = add_jobs(engine, "token:1", 1, steps=10) + add_jobs(engine, "token:2", 1, steps=11)
    first = claim_batch(ctx, b)
    assert first is not None and first.ids == [a]  # the fairest (oldest) job, not b's
    second = claim_batch(ctx, a)  # a's message, a already taken: b runs
    assert second is not None and second.ids == [b]
    assert claim_batch(ctx, b) is None  # b's message: nothing left


def test_the_claim_query_stays_bounded_with_5000_jobs_waiting(
    engine: Engine, tmp_path: Path
) -> None:
    for owner in range(50):
        add_jobs(engine, f"token:{owner}", 100, seconds_ago=owner)
    ctx = worker(engine, tmp_path)
    batch = run_one_batch(ctx)
    assert batch is not None and len(batch.ids) == 16
    # One job from each of 16 owners: everyone's first turn comes before anyone's second.
    assert len({get_owner(engine, j) for j in batch.ids}) == 16


def test_an_idle_owner_starts_afresh(engine: Engine, tmp_path: Path) -> None:
    """A ran 30 jobs while nobody else wanted the workers; then B and A queue 5 each. A's past
    turns are forgotten: the two take turns, rather than A waiting behind all of B's."""
    ctx = worker(engine, tmp_path, max_batch_size=1)
    add_jobs(engine, "token:1", 30)
    assert len(claim_order(ctx, 31)) == 30
    b_jobs = add_jobs(engine, "session:b", 5)
    a_jobs = add_jobs(engine, "token:1", 5)
    claimed = [ids[0] for ids in claim_order(ctx, 11)]
    assert sorted(claimed, key=str) == sorted(a_jobs + b_jobs, key=str)
    owners = ["a" if j in a_jobs else "b" for j in claimed]
    assert owners[:6].count("a") >= 2, owners  # turn about, give or take the first
    assert owners.index("a") <= 2, owners


def test_a_job_put_back_in_the_queue_keeps_its_place(engine: Engine, tmp_path: Path) -> None:
    """A job whose lease was lost goes back with its old start tag, so it runs next."""
    from core.db.transitions import requeue

    ctx = worker(engine, tmp_path, max_batch_size=1)
    first, *_ = add_jobs(engine, "token:1", 3, seconds_ago=10)
    add_jobs(engine, "session:b", 3)
    batch = claim_batch(ctx, uuid.uuid4())
    assert batch is not None and batch.ids == [first]
    with session_scope(engine) as s:
        assert requeue(s, batch.jobs[0].lease)
    with Session(engine) as s:
        assert queue_position(s, get_job(s, first, None)) == 0
    again = claim_batch(ctx, uuid.uuid4())
    assert again is not None and again.ids == [first]


def test_owners_whose_turn_has_passed_are_forgotten_and_come_back_the_same(
    engine: Engine, tmp_path: Path
) -> None:
    """The reaper deletes fair_owners rows whose finish tag the queue has passed; such an owner's
    next job gets the tag it would have got with its row kept."""
    from core.db.models import FairOwner
    from core.queue.fairness import forget_idle_owners

    ctx = worker(engine, tmp_path, max_batch_size=1)
    add_jobs(engine, "session:done", 2, seconds_ago=20)
    add_jobs(engine, "session:busy", 6, seconds_ago=10)
    claim_order(ctx, 4)  # both of done's jobs and two of busy's have run: V = 2
    with session_scope(engine) as s:
        assert forget_idle_owners(s) == 1
    with Session(engine) as s:
        assert set(s.scalars(select(FairOwner.owner))) == {"session:busy"}
    (back,) = add_jobs(engine, "session:done", 1)
    with Session(engine) as s:
        assert s.scalar(select(Job.fair_key).where(Job.id == back)) == 2.0  # V, as if kept
    claim_order(ctx, 10)  # the queue empties: every row can go
    with session_scope(engine) as s:
        assert forget_idle_owners(s) == 2
        assert s.scalar(select(func.count()).select_from(FairOwner)) == 0


def test_positions_past_the_bound_are_estimated_and_say_so(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted up to the bound, estimated from the owners' tags beyond it: with each owner's
    tags contiguous, the estimate is the count."""
    import core.queue.fairness as fairness

    monkeypatch.setattr(fairness, "POSITION_EXACT_UP_TO", 10)
    heavy = token_owner(engine, weight=2.0)
    jobs = {
        owner: add_jobs(engine, owner, 20, seconds_ago=i)
        for i, owner in enumerate(["session:a", heavy, "session:c"])
    }
    with Session(engine) as s:
        everyone = [j for ids in jobs.values() for j in ids]
        places = fairness.queue_positions(s, everyone)
    counted = sorted(places.values(), key=lambda p: p.ahead)
    assert [p.ahead for p in counted[:10]] == list(range(10))
    assert all(p.exact for p in counted[:10]) and not any(p.exact for p in counted[10:])
    # The true positions, from a full sort of the tags, against the estimates.
    with Session(engine) as s:
        order = s.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED).order_by(*fairness.ORDER)
        ).all()
    errors = [abs(places[j].ahead - order.index(j)) for j in everyone if not places[j].exact]
    assert max(errors) <= 2, errors  # ties between owners' equal tags, nothing more
    # The ETAs of a page of jobs (one statement for the head, shared) give the same places.
    from core.queue.eta import estimate

    with Session(engine) as s:
        rows = s.scalars(select(Job).where(Job.id.in_(everyone))).all()
        estimates = estimate(s, rows, max_batch_size=4)
        singly = {j: estimate(s, [r], max_batch_size=4)[j] for r in rows for j in [r.id]}
    for j in everyone:
        assert estimates[j].queue_position == places[j].ahead
        assert estimates[j].position_exact is places[j].exact
        assert estimates[j].start == singly[j].start or estimates[j].start is not None


def test_queued_jobs_of_a_database_from_before_the_stored_order_get_it_and_all_run(
    db_url: str, tmp_path: Path
) -> None:
    """Migrations run forward on a database that holds queued jobs: each is given its start tag
    in the order the window function gave it, and a worker then claims every one of them."""
    from core.db import make_engine, migrate

    migrate.upgrade(db_url, "0005")
    engine = make_engine(db_url)
    try:
        a = add_jobs_raw(engine, "token:1", 12, seconds_ago=30)
        b = add_jobs_raw(engine, "session:b", 4, seconds_ago=10)
        migrate.upgrade(db_url)
        with Session(engine) as s:
            keys = {row.id: row.fair_key for row in s.execute(select(Job.id, Job.fair_key))}
        assert [keys[j] for j in a] == [float(i) for i in range(12)]
        assert [keys[j] for j in b] == [float(i) for i in range(4)]
        ctx = worker(engine, tmp_path, max_batch_size=1)
        claimed = [ids[0] for ids in claim_order(ctx, 17)]
        assert sorted(claimed, key=str) == sorted(a + b, key=str)
        owners = ["a" if j in a else "b" for j in claimed]
        assert owners[:8] == ["a", "b"] * 4  # the old jobs take turns, as before the migration
        later = add_jobs(engine, "session:b", 1)  # and new ones are keyed by the trigger
        with Session(engine) as s:
            assert s.scalar(select(Job.fair_key).where(Job.id == later[0])) is not None
    finally:
        engine.dispose()


def add_jobs_raw(engine: Engine, owner: str, n: int, *, seconds_ago: float) -> list[uuid.UUID]:
    """Queued jobs written with plain SQL, as a database of revision 0005 holds them."""
    from sqlalchemy import text

    ids = [uuid.uuid4() for _ in range(n)]
    with engine.begin() as c:
        for i, job_id in enumerate(ids):
            c.execute(
                text(
                    "INSERT INTO jobs (id, status, prompt, negative_prompt, steps, guidance, "
                    "sampler, seed, width, height, num_images, model_version_id, progress_step, "
                    "progress_total, created_at, owner, attempts) VALUES (:id, 'queued', 'p', '', "
                    "20, 4.0, 'dpmpp-2m', 1, 32, 32, 1, NULL, 0, 20, :at, :owner, 0)"
                ),
                {
                    "id": job_id if engine.dialect.name == "postgresql" else job_id.hex,
                    "at": utcnow() - timedelta(seconds=seconds_ago - i * 0.001),
                    "owner": owner,
                },
            )
    return ids


def get_owner(engine: Engine, job_id: uuid.UUID) -> str:
    with Session(engine) as s:
        owner = s.scalar(select(Job.owner).where(Job.id == job_id))
        assert owner is not None
        return owner


# --- setting weights ---------------------------------------------------------------------------


def test_admins_set_weights_through_the_api_with_an_audit_row(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    from core.services.tokens import create_token
    from web import create_app

    with session_scope(engine) as s:
        admin = create_token(s, "admin", "ops")[1]
        user_row, user = create_token(s, "user", "alice")
        user_id = user_row.id
    client = create_app(make_settings(db_url, tmp_path), publisher=RecordingPublisher())
    http = client.test_client()
    url = f"/api/v1/admin/tokens/{user_id}/weight"
    r = http.put(url, json={"weight": 2.5}, headers=bearer(admin))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["weight"] == 2.5 and r.get_json()["id"] == user_id
    for bad in (0.05, 101, "2", None, True):
        r = http.put(url, json={"weight": bad}, headers=bearer(admin))
        assert r.status_code == 422 and "weight" in r.get_data(as_text=True), bad
    assert http.put(url, json={"weight": 2}, headers=bearer(user)).status_code == 403
    missing = http.put(
        "/api/v1/admin/tokens/999999/weight", json={"weight": 2}, headers=bearer(admin)
    )
    assert missing.status_code == 404
    with Session(engine) as s:
        assert s.get(ApiToken, user_id).weight == 2.5  # type: ignore[union-attr]
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "token.weight")).one()
        assert event.target == f"token:{user_id}" and event.detail == {
            "weight": 2.5,
            "previous": 1.0,
        }


def test_dq_token_weight_sets_it_from_the_command_line(
    db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.cli import cli
    from core.services.tokens import create_token

    with session_scope(engine) as s:
        token_id = create_token(s, "user")[0].id
    monkeypatch.setenv("DQ_DATABASE_URL", db_url)
    ok = CliRunner().invoke(cli, ["token", "weight", str(token_id), "3"])
    assert ok.exit_code == 0 and f"token {token_id} has weight 3" in ok.output, ok.output
    bad: Any = CliRunner().invoke(cli, ["token", "weight", str(token_id), "1000"])
    assert bad.exit_code == 2 and "weight must be from 0.1 to 100" in bad.output
    missing = CliRunner().invoke(cli, ["token", "weight", "424242", "2"])
    assert missing.exit_code == 2 and "no token has id 424242" in missing.output
    with Session(engine) as s:
        assert s.get(ApiToken, token_id).weight == 3.0  # type: ignore[union-attr]
