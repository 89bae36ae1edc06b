"""The schema and the one state-transition function, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import UTC, timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import (
    ApiToken,
    Image,
    InvalidTransition,
    Job,
    JobStatus,
    ModelKind,
    ModelVersion,
    Role,
    TrainingMetric,
    TrainingRun,
    make_engine,
    session_scope,
    transition_job,
    transition_run,
    utcnow,
)
from core.db.transitions import ALLOWED
from tests.services import POSTGRES_URL, postgres_schema


def new_job(**overrides: object) -> Job:
    values: dict[str, object] = dict(
        prompt="a small blue triangle in the bottom right",
        steps=20,
        guidance=4.0,
        sampler="dpmpp-2m",
        seed=1234,
        width=64,
        height=64,
        num_images=2,
        owner="token:1",
    )
    values.update(overrides)
    return Job(**values)


def add(engine: Engine, *rows: object) -> None:
    with session_scope(engine) as s:
        s.add_all(rows)


def test_job_round_trips_with_defaults_and_aware_utc_times(engine: Engine) -> None:
    job = new_job(seed=2**63 - 1 - 1)
    add(engine, job)
    with Session(engine) as s:
        got = s.get(Job, job.id)
        assert got is not None
        assert isinstance(got.id, uuid.UUID)
        assert got.status is JobStatus.QUEUED
        assert (got.progress_step, got.progress_total, got.attempts) == (0, 0, 0)
        assert got.cancel_requested is False
        assert got.negative_prompt == ""
        assert got.seed == 2**63 - 2  # seeds are 63-bit on both backends
        assert got.created_at.tzinfo is UTC
        assert abs(got.created_at - utcnow()) < timedelta(minutes=1)
        assert got.seeds == [2**63 - 2, 2**63 - 1]


def test_naive_datetime_is_refused(engine: Engine) -> None:
    from sqlalchemy.exc import StatementError

    with pytest.raises(StatementError, match="naive datetime"), session_scope(engine) as s:
        s.add(new_job(started_at=utcnow().replace(tzinfo=None)))


def test_claim_moves_queued_to_running_once_and_sets_values(engine: Engine) -> None:
    job = new_job()
    add(engine, job)
    with session_scope(engine) as s:
        assert transition_job(
            s,
            job.id,
            JobStatus.RUNNING,
            worker_host="gpu-1",
            started_at=utcnow(),
            attempts=Job.attempts + 1,
        )
    with session_scope(engine) as s:
        # A second claim (another worker, or a redelivered message) loses.
        assert not transition_job(s, job.id, JobStatus.RUNNING, worker_host="gpu-2")
    with Session(engine) as s:
        got = s.get(Job, job.id)
        assert got is not None
        assert (got.status, got.worker_host, got.attempts) == (JobStatus.RUNNING, "gpu-1", 1)
        assert got.started_at is not None


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED))
def test_every_allowed_move_succeeds(engine: Engine, source: JobStatus, target: JobStatus) -> None:
    job = new_job(status=source)
    add(engine, job)
    with session_scope(engine) as s:
        assert transition_job(s, job.id, target, expected=source)
    with Session(engine) as s:
        assert s.scalar(select(Job.status).where(Job.id == job.id)) is target


def test_terminal_states_have_no_way_out(engine: Engine) -> None:
    ids = {}
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        job = new_job(status=status)
        add(engine, job)
        ids[status] = job.id
    with session_scope(engine) as s:
        for status, job_id in ids.items():
            for target in JobStatus:
                if target is status:
                    continue
                # Without `expected`, the move simply does not happen …
                if any(dst == target for _, dst in ALLOWED):
                    assert not transition_job(s, job_id, target)
                # … and asking for it explicitly is a programming error.
                with pytest.raises(InvalidTransition):
                    transition_job(s, job_id, target, expected=status)
    with Session(engine) as s:
        for status, job_id in ids.items():
            assert s.scalar(select(Job.status).where(Job.id == job_id)) is status


def test_nothing_moves_back_to_queued_except_a_running_retry(engine: Engine) -> None:
    job = new_job(status=JobStatus.RUNNING, attempts=1)
    add(engine, job)
    with session_scope(engine) as s:
        assert transition_job(s, job.id, JobStatus.QUEUED, worker_host=None)
        assert not transition_job(s, job.id, JobStatus.QUEUED)  # already queued
    with pytest.raises(InvalidTransition), Session(engine) as s:
        transition_job(s, job.id, JobStatus.QUEUED, expected=JobStatus.SUCCEEDED)


def test_transition_of_an_unknown_row_returns_false(engine: Engine) -> None:
    with session_scope(engine) as s:
        assert not transition_job(s, uuid.uuid4(), JobStatus.RUNNING)


def test_transition_refreshes_an_object_already_loaded(engine: Engine) -> None:
    job = new_job()
    add(engine, job)
    with session_scope(engine) as s:
        loaded = s.get(Job, job.id)
        assert loaded is not None and loaded.status is JobStatus.QUEUED
        assert transition_job(s, job.id, JobStatus.CANCELED, finished_at=utcnow())
        assert loaded.status is JobStatus.CANCELED


def test_training_runs_use_the_same_state_machine(engine: Engine) -> None:
    run = TrainingRun(kind=ModelKind.DENOISER, config={"train": {"steps": 10}}, created_by="x")
    add(engine, run)
    with session_scope(engine) as s:
        assert transition_run(s, run.id, JobStatus.RUNNING, started_at=utcnow())
        s.add_all(
            TrainingMetric(run_id=run.id, step=i, name="loss", value=1.0 / (i + 1))
            for i in range(5)
        )
        assert transition_run(s, run.id, JobStatus.SUCCEEDED, finished_at=utcnow())
        assert not transition_run(s, run.id, JobStatus.RUNNING)
    with Session(engine) as s:
        got = s.get(TrainingRun, run.id)
        assert got is not None and got.status is JobStatus.SUCCEEDED
        assert got.config == {"train": {"steps": 10}}
        assert [m.value for m in got.metric_rows] == [1.0, 0.5, 1 / 3, 0.25, 0.2]


def test_idempotency_key_is_unique_per_owner_and_nullable(engine: Engine) -> None:
    add(engine, new_job(), new_job())  # many jobs without a key
    add(engine, new_job(idempotency_key="k1"), new_job(idempotency_key="k1", owner="token:2"))
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(new_job(idempotency_key="k1"))
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 4


def test_at_most_one_active_model_version_per_kind(engine: Engine) -> None:
    def version(name: str, kind: ModelKind, active: bool) -> ModelVersion:
        return ModelVersion(name=name, kind=kind, checkpoint_key=f"models/{name}", is_active=active)

    add(
        engine,
        version("d1", ModelKind.DENOISER, True),
        version("d2", ModelKind.DENOISER, False),
        version("d3", ModelKind.DENOISER, False),
        version("a1", ModelKind.AUTOENCODER, True),
    )
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(version("d4", ModelKind.DENOISER, True))
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(version("d1", ModelKind.DENOISER, False))  # names are unique too


def test_images_belong_to_a_job_and_go_with_it(engine: Engine) -> None:
    job = new_job()
    job.images = [
        Image(
            index=i,
            storage_key=f"images/{job.id}/{i}.png",
            width=64,
            height=64,
            seed=job.seed + i,
            sha256="0" * 64,
            bytes=100,
        )
        for i in range(2)
    ]
    add(engine, job)
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(Image(job_id=job.id, index=0, storage_key="x", width=1, height=1, seed=0,
                    sha256="0" * 64, bytes=1))  # fmt: skip
    with session_scope(engine) as s:
        got = s.get(Job, job.id)
        assert got is not None and [im.index for im in got.images] == [0, 1]
        s.delete(got)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 0


def test_api_tokens_store_unique_hashes(engine: Engine) -> None:
    add(engine, ApiToken(token_hash="a" * 64, role=Role.ADMIN, label="ops"))
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(ApiToken(token_hash="a" * 64, role=Role.USER))


def test_status_column_rejects_values_outside_the_enum(engine: Engine) -> None:
    from sqlalchemy import text

    add(engine, job := new_job())
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET status = 'exploded' WHERE id = :id"),
            {"id": job.id.hex if engine.dialect.name == "sqlite" else job.id},
        )


def test_racing_workers_claim_each_job_exactly_once(db_url: str) -> None:
    """8 threads, each with its own connection, race to claim the same 50 queued jobs."""
    engine = make_engine(db_url)
    from core.db import Base

    Base.metadata.create_all(engine)
    jobs = [new_job() for _ in range(50)]
    add(engine, *jobs)
    ids = [j.id for j in jobs]
    claims: dict[int, list[uuid.UUID]] = {w: [] for w in range(8)}
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        order = ids[:]
        random.Random(w).shuffle(order)
        try:
            start.wait()
            for job_id in order:
                with session_scope(engine) as s:
                    if transition_job(
                        s,
                        job_id,
                        JobStatus.RUNNING,
                        expected=JobStatus.QUEUED,
                        worker_host=f"w{w}",
                        attempts=Job.attempts + 1,
                    ):
                        claims[w].append(job_id)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    claimed = [job_id for w in claims.values() for job_id in w]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    with Session(engine) as s:
        rows = s.execute(select(Job.id, Job.worker_host, Job.attempts)).all()
    owner = {job_id: f"w{w}" for w, got in claims.items() for job_id in got}
    assert all(host == owner[job_id] and attempts == 1 for job_id, host, attempts in rows)
    # With real concurrency the work spreads over several threads (not one winning all).
    assert sum(1 for got in claims.values() if got) > 1
    engine.dispose()


# --- pooled connections after PostgreSQL drops them ----------------------------------------------


def _drop_pooled_connection(engine: Engine) -> None:
    """End, from the server's side, the one connection that sits in ``engine``'s pool (as a
    PostgreSQL restart or an idle-session kill does)."""
    from sqlalchemy import create_engine

    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    admin.dispose()


def test_a_connection_idle_in_the_pool_is_pinged_and_replaced_when_dead() -> None:
    """Back in the pool for ALIVE_BYPASS_SECONDS or more: pinged on checkout, and a dead one is
    replaced before the statement runs. Used a moment ago: no ping (no round trip), so a dead
    one fails its statement once, and the pool is renewed for the next."""
    import time

    from sqlalchemy.exc import DBAPIError

    from core.db.session import ALIVE_BYPASS_SECONDS

    with postgres_schema() as url:
        engine = make_engine(url)
        pings: list[int] = []
        ping = engine.dialect.do_ping

        def counted_ping(dbapi_connection: object) -> bool:
            pings.append(1)
            return ping(dbapi_connection)

        engine.dialect.do_ping = counted_ping  # type: ignore[method-assign]
        _drop_pooled_connection(engine)
        time.sleep(ALIVE_BYPASS_SECONDS + 0.1)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        assert len(pings) == 1

        _drop_pooled_connection(engine)  # and at once
        with pytest.raises(DBAPIError) as failed, engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert failed.value.connection_invalidated
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        assert len(pings) == 1  # neither checkout came after an idle spell
        engine.dispose()


def test_the_pool_keeps_what_a_process_uses_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """DQ_DB_POOL_SIZE connections stay open between requests: 8 threads that use 8 at once,
    again and again, open 8 PostgreSQL sessions in all (SQLAlchemy's default pool of 5 closed
    the other 3 after every use and opened them again). Past the pool, as many again open for
    the moment and close after use."""
    from core.db.session import dispose_engines, get_engine
    from core.runtime.settings import Settings

    def backends(url_engine: Engine) -> set[int]:
        seen: set[int] = set()
        lock = threading.Lock()
        start = threading.Barrier(8)

        def use() -> None:
            for _ in range(5):
                with url_engine.connect() as conn:
                    start.wait()  # all 8 checked out at once
                    pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    with lock:
                        seen.add(pid)
                start.wait()  # and all 8 given back

        threads = [threading.Thread(target=use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return seen

    with postgres_schema() as url:
        monkeypatch.setenv("DQ_DATABASE_URL", url)
        monkeypatch.setenv("DQ_DB_POOL_SIZE", "8")
        dispose_engines()
        engine = get_engine(Settings.from_env())
        assert (engine.pool.size(), engine.pool._max_overflow) == (8, 8)  # type: ignore[attr-defined]
        assert len(backends(engine)) == 8
        dispose_engines()

        small = make_engine(url, pool_size=5)
        assert len(backends(small)) > 8  # the 3 past the pool, opened afresh on every use
        assert small.pool.checkedin() == 5
        small.dispose()
