"""Honest ETAs: when a job will start and finish, from measured throughput and live workers.

Workers measure themselves. After each batch whose jobs all succeeded, the worker folds the
batch's seconds per image per denoising step into an exponential moving average kept per model,
sampler, steps and batch size (:func:`record_throughput`, table ``throughput_samples``); the
batch's wall time counts everything from the claim's start to its last stored image. Every
generation worker says it is alive every few seconds (:func:`mark_present`, table
``worker_presence``); one seen within :data:`LIVE_SECONDS` is live.

:func:`estimate` then works out, for a queued job, with the queue as it stands:

- the jobs ahead of it in fair order (``core.queue.fairness``), by kind of batch, in one aggregate
  query. Jobs of its own kind ahead of it run in batches of DQ_MAX_BATCH_SIZE images, and the
  last, partial one is the job's own batch: those images cost it nothing extra;
- the work still left in the running batches, from their progress;
- start = now + (work ahead + work left running) / live workers (at least one), where work is
  images × steps × seconds per image per step at the batch size it will run at;
- finish = start + its own batch (its images, the partial batch ahead, compatible jobs behind it,
  up to the cap) × steps × the rate at that batch size.

For a running job, start is when it was claimed, and finish is now + the steps left × the time
a step takes: the measured rate's at first, its own pace so far more and more as it progresses.

What it cannot know: jobs that other owners submit later may come before a waiting job (their
rank is lower), and a worker that joins or leaves changes every wait. Accuracy is measured by
``bench/bench_eta.py``, not promised. No Flask, no Celery here.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db.models import Job, JobStatus, ThroughputSample, WorkerPresence, utcnow
from core.db.transitions import db_now
from core.queue import fairness
from core.queue.dispatch import QUEUE_GENERATE
from core.queue.fairness import (
    KIND_COLUMNS,
    ORDER,
    QUEUED,
    OwnerTags,
    Place,
    ahead_of,
    head_boundary,
    same_kind,
)

# Used until a worker has measured anything: the shipped model on two CPU cores is about this
# fast at batch 1 (bench/bench_eta.py prints what this machine measures).
DEFAULT_SECONDS_PER_IMAGE_STEP = 0.05
# Weight of the newest batch in the moving average. The first few samples are plain means, so
# that the first measurement replaces the default at once.
EMA_WEIGHT = 0.2
LIVE_SECONDS = 60.0
# Running jobs read per estimate: workers × the jobs of one batch, far below this.
MAX_RUNNING = 2000


def model_key(model_version_id: uuid.UUID | None) -> str:
    """How ``throughput_samples.model`` names a model version (the shipped one: "default")."""
    return "default" if model_version_id is None else str(model_version_id)


# --- what workers record ---------------------------------------------------------------------


def _upsert(session: Session, table: Any) -> Any:
    """INSERT … ON CONFLICT for this session's backend (both spell it the same way)."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def record_throughput(
    session: Session,
    *,
    model_version_id: uuid.UUID | None,
    sampler: str,
    steps: int,
    batch_size: int,
    seconds: float,
) -> None:
    """Fold one batch's wall time into the moving average of its kind of batch."""
    if batch_size < 1 or steps < 1 or seconds <= 0:
        return
    rate = seconds / (batch_size * steps)
    t = ThroughputSample.__table__
    insert = _upsert(session, t).values(
        model=model_key(model_version_id),
        sampler=sampler,
        steps=steps,
        batch_size=batch_size,
        seconds_per_image_step=rate,
        samples=1,
        updated_at=db_now(),
    )
    old = t.c.seconds_per_image_step
    # A plain mean of the first 1/EMA_WEIGHT samples, then an exponential moving average.
    weight = case((t.c.samples < round(1 / EMA_WEIGHT), 1.0 / (t.c.samples + 1)), else_=EMA_WEIGHT)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=[t.c.model, t.c.sampler, t.c.steps, t.c.batch_size],
            set_={
                "seconds_per_image_step": old
                + (insert.excluded.seconds_per_image_step - old) * weight,
                "samples": t.c.samples + 1,
                "updated_at": insert.excluded.updated_at,
            },
        )
    )


def mark_present(session: Session, host: str, queues: str) -> None:
    """This worker is alive now (by the database's clock) and takes work from ``queues``."""
    t = WorkerPresence.__table__
    insert = _upsert(session, t).values(host=host, queues=queues[:100], last_seen=db_now())
    session.execute(
        insert.on_conflict_do_update(
            index_elements=[t.c.host],
            set_={"queues": insert.excluded.queues, "last_seen": insert.excluded.last_seen},
        )
    )


def live_workers(session: Session) -> int:
    """Generation workers seen within :data:`LIVE_SECONDS`."""
    t = WorkerPresence.__table__
    found = session.scalar(
        select(func.count())
        .select_from(t)
        .where(
            t.c.last_seen >= db_now(-LIVE_SECONDS),
            t.c.queues.contains(QUEUE_GENERATE, autoescape=True),
        )
    )
    return int(found or 0)


# --- rates ------------------------------------------------------------------------------------


class Rates:
    """Measured seconds per image per step, looked up by kind of batch. A kind never measured
    borrows from the nearest one measured: the same model and sampler at other steps, then the
    same model, then any, then :data:`DEFAULT_SECONDS_PER_IMAGE_STEP`; always at the batch
    size nearest the one asked for."""

    def __init__(self, samples: Iterable[tuple[str, str, int, int, float]]):
        self._exact: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
        self._sampler: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self._model: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._any: dict[int, list[float]] = defaultdict(list)
        for model, sampler, steps, batch, rate in samples:
            self._exact[(model, sampler, steps)][batch] = rate
            self._sampler[(model, sampler)][batch].append(rate)
            self._model[model][batch].append(rate)
            self._any[batch].append(rate)

    @classmethod
    def load(cls, session: Session) -> Rates:
        t = ThroughputSample.__table__
        rows = session.execute(
            select(t.c.model, t.c.sampler, t.c.steps, t.c.batch_size, t.c.seconds_per_image_step)
            .order_by(t.c.updated_at.desc())
            .limit(5000)
        ).all()
        return cls((r[0], r[1], r[2], r[3], r[4]) for r in rows)

    @staticmethod
    def _nearest(by_batch: dict[int, Any], batch: int) -> int:
        return min(by_batch, key=lambda b: (abs(b - batch), -b))

    def largest_batch(self, model: str, sampler: str, steps: int) -> int | None:
        sizes = self._exact.get((model, sampler, steps))
        return max(sizes) if sizes else None

    def seconds_per_image_step(self, model: str, sampler: str, steps: int, batch: int) -> float:
        exact = self._exact.get((model, sampler, steps))
        if exact:
            return exact[self._nearest(exact, batch)]
        for pooled in (self._sampler.get((model, sampler)), self._model.get(model), self._any):
            if pooled:
                rates = pooled[self._nearest(pooled, batch)]
                return sorted(rates)[len(rates) // 2]
        return DEFAULT_SECONDS_PER_IMAGE_STEP

    def batch_seconds(
        self, model_version_id: uuid.UUID | None, sampler: str, steps: int, images: int
    ) -> float:
        """Wall time of one batch of ``images`` images of this kind."""
        if images <= 0:
            return 0.0
        rate = self.seconds_per_image_step(model_key(model_version_id), sampler, steps, images)
        return images * steps * rate


# --- estimates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    queue_position: int | None  # jobs ahead in fair order; None once it is no longer queued
    start: datetime | None
    finish: datetime | None
    # Whether queue_position was counted (up to POSITION_EXACT_UP_TO) or estimated beyond.
    position_exact: bool = True


UNKNOWN = Estimate(None, None, None)


@dataclass(frozen=True)
class _Running:
    id: uuid.UUID
    host: str | None
    model_version_id: uuid.UUID | None
    sampler: str
    steps: int
    num_images: int
    progress_step: int
    started_at: datetime | None


def _running_finishes(
    running: Sequence[_Running], rates: Rates, now: datetime
) -> dict[uuid.UUID, datetime]:
    """When each running job will finish. A worker runs its claimed jobs as one batch, so a
    job's batch is the running jobs of its worker. The time a step takes is the measured rate's,
    blended with the batch's own pace so far as it progresses: at the start the pace is mostly
    set-up (its first progress write comes after text encoding, and progress is written at
    most four times a second), near the end it is the best guide."""
    batch_images: dict[str | None, int] = defaultdict(int)
    for job in running:
        batch_images[job.host] += job.num_images
    out = {}
    for job in running:
        steps = max(job.steps, 1)
        left = max(job.steps - job.progress_step, 0)
        images = batch_images[job.host]
        step_time = rates.batch_seconds(job.model_version_id, job.sampler, steps, images) / steps
        elapsed = (now - job.started_at).total_seconds() if job.started_at else 0.0
        if job.progress_step > 0 and elapsed > 0:
            done = min(job.progress_step / steps, 1.0)
            step_time = (1 - done) * step_time + done * elapsed / job.progress_step
        out[job.id] = now + timedelta(seconds=left * step_time)
    return out


def estimate(
    session: Session,
    jobs: Sequence[Any],
    *,
    max_batch_size: int,
    now: datetime | None = None,
) -> dict[uuid.UUID, Estimate]:
    """Queue position, estimated start and finish of each of ``jobs`` (rows or ``Job``s with
    ``id``, ``status`` and ``started_at``). Finished jobs get :data:`UNKNOWN`, with no query.
    A few bounded queries whatever the number of jobs: one aggregate over the queue for all
    the queued ones, the running jobs, the rates and the count of live workers."""
    now = now or utcnow()
    out = {job.id: UNKNOWN for job in jobs}
    waiting = [job.id for job in jobs if job.status is JobStatus.QUEUED]
    if not any(job.status in (JobStatus.QUEUED, JobStatus.RUNNING) for job in jobs):
        return out
    rates = Rates.load(session)
    r = Job.__table__
    running = [
        _Running(*row)
        for row in session.execute(
            select(
                r.c.id,
                r.c.worker_host,
                r.c.model_version_id,
                r.c.sampler,
                r.c.steps,
                r.c.num_images,
                r.c.progress_step,
                r.c.started_at,
            )
            .where(r.c.status == JobStatus.RUNNING)
            .limit(MAX_RUNNING)
        )
    ]
    finishes = _running_finishes(running, rates, now)
    for job in jobs:
        if job.status is JobStatus.RUNNING:
            out[job.id] = Estimate(None, job.started_at or now, finishes.get(job.id, now))
    if not waiting:
        return out

    # Seconds each worker's batch has left; a worker whose jobs are all finishing counts 0.
    left_by_host: dict[str | None, float] = defaultdict(float)
    for job in running:
        left = (finishes[job.id] - now).total_seconds()
        left_by_host[job.host] = max(left_by_host[job.host], left)
    running_left = sum(left_by_host.values())
    workers = max(live_workers(session), len(left_by_host), 1)

    for job_id, (place, ahead_work, own_batch) in _queued_work(
        session, waiting, rates, max_batch_size
    ).items():
        start = now + timedelta(seconds=(ahead_work + running_left) / workers)
        out[job_id] = Estimate(
            place.ahead, start, start + timedelta(seconds=own_batch), place.exact
        )
    return out


def _queued_work(
    session: Session, job_ids: list[uuid.UUID], rates: Rates, cap: int
) -> dict[uuid.UUID, tuple[Place, float, float]]:
    """For each queued job: (its place, seconds of work ahead for one worker, seconds of its
    own batch). Bounded statements: for a job within the counted head, the jobs ahead of it by
    kind, counted through the index up to POSITION_EXACT_UP_TO; for jobs past it, the head's
    work (one statement for them all), scaled to the place estimated from the owners' tags;
    and for each, its own kind behind it, up to one batch."""
    j = Job.__table__
    kind = tuple(j.c[name] for name in KIND_COLUMNS)
    mine = session.execute(
        select(j.c.id, j.c.fair_key, j.c.created_at, j.c.num_images, *kind).where(
            j.c.id.in_(job_ids), QUEUED
        )
    ).all()
    # The deepest first: the first past the bound counts the head, the rest reuse it.
    mine = sorted(
        (m for m in mine if m.fair_key is not None),
        key=lambda m: (m.fair_key, m.created_at, str(m.id)),
        reverse=True,
    )
    boundary = head_boundary(session) if len(mine) > 1 else None
    head: list[Any] | None = None  # the counted head's groups, shared by every job past it
    tags: OwnerTags | None = None
    out: dict[uuid.UUID, tuple[Place, float, float]] = {}
    for me in mine:
        position = (me.fair_key, me.created_at, me.id)
        if head is not None and boundary is not None and position > boundary:
            groups = head
        else:
            groups = _kinds_ahead(session, position)
        counted = sum(int(g.jobs) for g in groups)
        if counted >= fairness.POSITION_EXACT_UP_TO:
            head = groups
        behind = session.scalars(
            select(j.c.num_images)
            .where(QUEUED, *same_kind(me), tuple_(*ORDER) > tuple_(*position))
            .order_by(*ORDER)
            .limit(cap)
        ).all()
        own_kind = tuple(getattr(me, name) for name in KIND_COLUMNS)
        work = 0.0
        same_ahead = 0
        for g in groups:
            images = int(g.images or 0)
            batch_kind = (g.model_version_id, g.sampler, g.steps)
            if tuple(getattr(g, name) for name in KIND_COLUMNS) == own_kind:
                same_ahead = images
                continue
            # Other kinds ahead run in batches of up to `cap` images.
            full, rest = divmod(images, cap)
            work += full * rates.batch_seconds(*batch_kind, cap)
            work += rates.batch_seconds(*batch_kind, rest)
        # Full batches of its own kind ahead run first; the partial one joins its batch, with
        # compatible jobs behind it, up to the cap.
        full, rest = divmod(same_ahead, cap)
        work += full * rates.batch_seconds(me.model_version_id, me.sampler, me.steps, cap)
        batch = min(cap, rest + int(me.num_images) + sum(int(n) for n in behind))
        own = rates.batch_seconds(
            me.model_version_id, me.sampler, me.steps, max(batch, int(me.num_images))
        )
        if counted < fairness.POSITION_EXACT_UP_TO:
            place = Place(counted, True)
        else:
            tags = tags or OwnerTags.load(session)
            place = Place(max(tags.ahead(me.fair_key), counted), False)
            work *= place.ahead / counted  # the counted head's work per job, for every job ahead
        out[me.id] = (place, work, own)
    return out


def _kinds_ahead(session: Session, position: tuple[Any, ...]) -> list[Any]:
    """The jobs ahead of a job at ``position`` (tag, age, id), up to POSITION_EXACT_UP_TO of
    them, counted with their images by kind of batch."""
    j = Job.__table__
    ahead = (
        select(j.c.num_images, *(j.c[name] for name in KIND_COLUMNS))
        .where(ahead_of(*position))
        .order_by(*ORDER)
        .limit(fairness.POSITION_EXACT_UP_TO)
        .subquery()
    )
    return list(
        session.execute(
            select(
                *(ahead.c[name] for name in KIND_COLUMNS),
                func.count().label("jobs"),
                func.sum(ahead.c.num_images).label("images"),
            ).group_by(*(ahead.c[name] for name in KIND_COLUMNS))
        ).all()
    )
