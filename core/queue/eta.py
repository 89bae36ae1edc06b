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

import threading
import time
import uuid
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
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
)

# What the queue is read through: a Session, or a bare Connection (a poll opens no Session).
Reader = Session | Connection

# Used until a worker has measured anything: the shipped model on two CPU cores is about this
# fast at batch 1 (bench/bench_eta.py prints what this machine measures).
DEFAULT_SECONDS_PER_IMAGE_STEP = 0.05
# Weight of the newest batch in the moving average. The first few samples are plain means, so
# that the first measurement replaces the default at once.
EMA_WEIGHT = 0.2
LIVE_SECONDS = 60.0
# Places past the head a snapshot remembers (each an int), so that polls of a job within a second
# sum over the owners once.
MAX_ESTIMATES_KEPT = 100_000
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


def mark_present(
    session: Session,
    host: str,
    queues: str,
    *,
    models: list[str | None] | None = None,
    precision: str | None = None,
) -> None:
    """This worker is alive now (by the database's clock) and takes work from ``queues``; with
    ``models``, it holds those model versions (ids as strings, None for the shipped default,
    most recently used last); with ``precision``, its models run in it (fp32, bf16 or fp16)."""
    t = WorkerPresence.__table__
    values: dict[str, Any] = {"host": host, "queues": queues[:100], "last_seen": db_now()}
    if models is not None:
        values["models"] = models
    if precision is not None:
        values["precision"] = precision
    insert = _upsert(session, t).values(**values)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=[t.c.host],
            set_={name: insert.excluded[name] for name in values if name != "host"},
        )
    )


def live_workers(session: Reader) -> int:
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


# Presence rows of workers not seen for this long are deleted by the reaper: each worker process
# writes its own row (host:pid), so without this the table would keep every process that ever ran.
GONE_AFTER_SECONDS = 24 * 3600.0


def forget_gone_workers(session: Session, after: float = GONE_AFTER_SECONDS) -> int:
    """Delete the presence rows of workers not seen for ``after`` seconds; how many went."""
    gone = session.execute(delete(WorkerPresence).where(WorkerPresence.last_seen < db_now(-after)))
    return int(gone.rowcount or 0)  # type: ignore[attr-defined]


def models_held_elsewhere(session: Reader, host: str) -> frozenset[uuid.UUID | None]:
    """The model versions held by the generation workers other than ``host`` seen within
    :data:`LIVE_SECONDS` (None: the shipped default), from their presence rows: one row per
    worker process, never the queue."""
    t = WorkerPresence.__table__
    rows = session.scalars(
        select(t.c.models).where(
            t.c.last_seen >= db_now(-LIVE_SECONDS),
            t.c.host != host,
            t.c.queues.contains(QUEUE_GENERATE, autoescape=True),
        )
    )
    held: set[uuid.UUID | None] = set()
    for models in rows:
        for model in models if isinstance(models, list) else ():
            try:
                held.add(None if model is None else uuid.UUID(str(model)))
            except ValueError:  # written by a newer or older worker; not a version id
                continue
    return frozenset(held)


def live_workers_by_precision(session: Session) -> dict[str, int]:
    """Generation workers seen within :data:`LIVE_SECONDS`, counted by the precision their
    models run in (fp32, bf16, fp16; "unknown" before a worker has loaded a model)."""
    t = WorkerPresence.__table__
    rows = session.execute(
        select(t.c.precision, func.count())
        .where(
            t.c.last_seen >= db_now(-LIVE_SECONDS),
            t.c.queues.contains(QUEUE_GENERATE, autoescape=True),
        )
        .group_by(t.c.precision)
    ).all()
    out: dict[str, int] = {}
    for precision, n in rows:
        key = precision or "unknown"
        out[key] = out.get(key, 0) + int(n)
    return out


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
    def load(cls, session: Reader) -> Rates:
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
    running: Sequence[_Running],
    rates: Rates,
    now: datetime,
    batch_images: dict[str | None, int],
) -> dict[uuid.UUID, datetime]:
    """When each running job will finish. A worker runs its claimed jobs as one batch, so a
    job's batch is the running jobs of its worker. The time a step takes is the measured rate's,
    blended with the batch's own pace so far as it progresses: at the start the pace is mostly
    set-up (its first progress write comes after text encoding, and progress is written at
    most four times a second), near the end it is the best guide. ``batch_images``: the images
    of each worker's batch."""
    out = {}
    for job in running:
        steps = max(job.steps, 1)
        left = max(job.steps - job.progress_step, 0)
        images = batch_images.get(job.host, job.num_images)
        step_time = rates.batch_seconds(job.model_version_id, job.sampler, steps, images) / steps
        elapsed = (now - job.started_at).total_seconds() if job.started_at else 0.0
        if job.progress_step > 0 and elapsed > 0:
            done = min(job.progress_step / steps, 1.0)
            step_time = (1 - done) * step_time + done * elapsed / job.progress_step
        out[job.id] = now + timedelta(seconds=left * step_time)
    return out


@dataclass(frozen=True)
class _Queued:
    """One job of the counted head: its place in fair order, its kind of batch, its images."""

    position: tuple[Any, ...]  # (fair_key, created_at, id)
    kind: tuple[Any, ...]  # KIND_COLUMNS
    num_images: int


@dataclass(frozen=True)
class QueueSnapshot:
    """What every estimate shares, read in a few bounded statements whatever the queue's depth:
    the measured rates, the running jobs, the live workers, and the counted head of the queue
    (its first POSITION_EXACT_UP_TO jobs in fair order, with their kinds and images), plus the
    owners' tags when the queue is deeper than that.

    A web process keeps one for up to DQ_QUEUE_SNAPSHOT_SECONDS (:class:`SnapshotCache`), so
    that a poll reads its job's row and nothing of the queue: positions and ETAs are then as
    the queue stood at most that long ago (docs/QUEUE.md)."""

    taken_at: datetime
    rates: Rates
    running: tuple[_Running, ...]
    finishes: dict[uuid.UUID, datetime]  # of the running jobs, as of taken_at
    left_by_host: dict[str | None, float]  # seconds each worker's batch had left at taken_at
    batch_images: dict[str | None, int]  # images in each worker's batch
    workers: int  # live generation workers
    head: tuple[_Queued, ...]
    complete: bool  # the head is the whole queue
    tags: OwnerTags | None  # read only when the head is not the whole queue
    # By kind of batch: images in head[:i] (index i), and the indexes in the head of its jobs.
    prefix_images: dict[tuple[Any, ...], list[int]] = field(default_factory=dict)
    members: dict[tuple[Any, ...], list[int]] = field(default_factory=dict)
    # Places past the head already estimated from the owners' tags, by start tag.
    estimated_ahead: dict[float, int] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Reader, now: datetime | None = None) -> QueueSnapshot:
        now = now or utcnow()
        rates = Rates.load(session)
        j = Job.__table__
        running = tuple(
            _Running(*row)
            for row in session.execute(
                select(
                    j.c.id,
                    j.c.worker_host,
                    j.c.model_version_id,
                    j.c.sampler,
                    j.c.steps,
                    j.c.num_images,
                    j.c.progress_step,
                    j.c.started_at,
                )
                .where(j.c.status == JobStatus.RUNNING)
                .limit(MAX_RUNNING)
            )
        )
        batch_images: dict[str | None, int] = defaultdict(int)
        for job in running:
            batch_images[job.host] += job.num_images
        finishes = _running_finishes(running, rates, now, batch_images)
        # Seconds each worker's batch has left; a worker whose jobs are all finishing counts 0.
        left_by_host: dict[str | None, float] = defaultdict(float)
        for job in running:
            left = (finishes[job.id] - now).total_seconds()
            left_by_host[job.host] = max(left_by_host[job.host], left)
        bound = fairness.POSITION_EXACT_UP_TO
        head = tuple(
            _Queued(tuple(row[:3]), tuple(row[3:-1]), int(row[-1]))
            for row in session.execute(
                select(*ORDER, *(j.c[name] for name in KIND_COLUMNS), j.c.num_images)
                .where(QUEUED, j.c.fair_key.is_not(None))
                .order_by(*ORDER)
                .limit(bound)
            )
        )
        complete = len(head) < bound
        prefix_images: dict[tuple[Any, ...], list[int]] = {}
        members: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, queued in enumerate(head):
            members[queued.kind].append(i)
        for kind in members:
            sums = [0]
            for queued in head:
                sums.append(sums[-1] + (queued.num_images if queued.kind == kind else 0))
            prefix_images[kind] = sums
        return cls(
            taken_at=now,
            rates=rates,
            running=running,
            finishes=finishes,
            left_by_host=dict(left_by_host),
            batch_images=dict(batch_images),
            workers=max(live_workers(session), len(left_by_host), 1),
            head=head,
            complete=complete,
            tags=None if complete else OwnerTags.load(session),
            prefix_images=prefix_images,
            members=dict(members),
        )

    def running_left(self, now: datetime) -> float:
        """Seconds of work left in the running batches at ``now``, all workers together."""
        passed = max((now - self.taken_at).total_seconds(), 0.0)
        return sum(max(left - passed, 0.0) for left in self.left_by_host.values())

    def place(self, job: Any) -> tuple[Place, int] | None:
        """The job's :class:`Place` (``job`` has ``id``, ``fair_key`` and ``created_at``), and
        how many of the head run before it; None for a job without a tag. Counted in the head
        while the job is in it or the head is the whole queue; estimated from the owners' tags
        past it, as :func:`core.queue.fairness.places` does."""
        if job.fair_key is None:
            return None
        mine = (job.fair_key, job.created_at, job.id)
        before = bisect_left(self.head, mine, key=lambda q: q.position)
        if self.complete or before < len(self.head):
            return Place(before, True), before
        ahead = self.estimated_ahead.get(job.fair_key)
        if ahead is None:  # a sum over the owners with work queued: once per tag and snapshot
            ahead = self.tags.ahead(job.fair_key) if self.tags is not None else 0
            if len(self.estimated_ahead) < MAX_ESTIMATES_KEPT:
                self.estimated_ahead[job.fair_key] = ahead
        return Place(max(ahead, before), False), before


class SnapshotCache:
    """A process's :class:`QueueSnapshot`, read again once older than ``seconds`` (0: for every
    request) or after :meth:`clear` (this process queued or canceled a job). Thread-safe; one
    thread reads a stale snapshot again while the others wait for it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._snapshot: QueueSnapshot | None = None
        self._read_at = 0.0
        self._moved = 0

    def get(self, session: Reader) -> QueueSnapshot:
        if self.seconds <= 0:
            return QueueSnapshot.load(session)
        with self._lock:
            if self._snapshot is None or time.monotonic() - self._read_at >= self.seconds:
                self._snapshot = QueueSnapshot.load(session)
                self._read_at = time.monotonic()
            return self._snapshot

    def clear(self) -> None:
        with self._lock:
            self._snapshot = None

    def moved(self, version: int) -> None:
        """The queue has moved: a count of its moves (the event hub's ``queue_version``) has
        reached ``version``. The next :meth:`get` reads it again, once per new count however
        many callers report it."""
        with self._lock:
            if version > self._moved:
                self._moved = version
                self._snapshot = None


def view_of(
    session: Reader, snapshot: QueueSnapshot | SnapshotCache | None, now: datetime | None = None
) -> QueueSnapshot:
    """The snapshot given, the cache's, or a fresh one when neither is."""
    if isinstance(snapshot, SnapshotCache):
        return snapshot.get(session)
    return snapshot if snapshot is not None else QueueSnapshot.load(session, now)


def estimate(
    session: Reader,
    jobs: Sequence[Any],
    *,
    max_batch_size: int,
    now: datetime | None = None,
    snapshot: QueueSnapshot | SnapshotCache | None = None,
) -> dict[uuid.UUID, Estimate]:
    """Queue position, estimated start and finish of each of ``jobs`` (rows or ``Job``s with
    the job's columns). Finished jobs get :data:`UNKNOWN`, with no query. The queue is read
    through ``snapshot`` (a cache of it, or one already read), else in a fresh
    :class:`QueueSnapshot`: a few bounded statements whatever the number of jobs."""
    now = now or utcnow()
    out = {job.id: UNKNOWN for job in jobs}
    if not any(job.status in (JobStatus.QUEUED, JobStatus.RUNNING) for job in jobs):
        return out
    snapshot = view_of(session, snapshot, now)
    running_left = snapshot.running_left(now)
    for job in jobs:
        if job.status is JobStatus.RUNNING:
            out[job.id] = Estimate(None, job.started_at or now, _finish(snapshot, job, now))
        elif job.status is JobStatus.QUEUED:
            found = _queued(snapshot, job, max_batch_size)
            if found is not None:
                place, ahead_work, own_batch = found
                start = now + timedelta(seconds=(ahead_work + running_left) / snapshot.workers)
                out[job.id] = Estimate(
                    place.ahead, start, start + timedelta(seconds=own_batch), place.exact
                )
    return out


def _finish(snapshot: QueueSnapshot, job: Any, now: datetime) -> datetime:
    """When a running job will finish: from its own row where it has the columns (its progress
    is newer than the snapshot's), else from the snapshot."""
    try:
        mine = _Running(
            job.id,
            job.worker_host,
            job.model_version_id,
            job.sampler,
            job.steps,
            job.num_images,
            job.progress_step,
            job.started_at,
        )
    except AttributeError:
        return snapshot.finishes.get(job.id, now)
    batch = dict(snapshot.batch_images)
    batch[mine.host] = max(batch.get(mine.host, 0), mine.num_images)
    return _running_finishes([mine], snapshot.rates, now, batch)[job.id]


def _queued(snapshot: QueueSnapshot, job: Any, cap: int) -> tuple[Place, float, float] | None:
    """For a queued job: (its place, seconds of work ahead for one worker, seconds of its own
    batch). Within the counted head: the jobs ahead of it by kind, and its own kind behind it up
    to one batch. Past it: the head's work, scaled to the place estimated from the owners' tags,
    and its batch as its kind's partial batch ahead and its own images (what follows it is not
    read)."""
    found = snapshot.place(job)
    if found is None:
        return None
    place, before = found
    own_kind = tuple(getattr(job, name) for name in KIND_COLUMNS)
    images_by_kind = {
        kind: sums[before] for kind, sums in snapshot.prefix_images.items() if sums[before]
    }
    rates = snapshot.rates
    work = 0.0
    for kind, images in images_by_kind.items():
        if kind == own_kind:
            continue
        # Other kinds ahead run in batches of up to `cap` images.
        full, rest = divmod(images, cap)
        work += full * rates.batch_seconds(kind[0], kind[1], kind[2], cap)
        work += rates.batch_seconds(kind[0], kind[1], kind[2], rest)
    # Full batches of its own kind ahead run first; the partial one joins its batch, with
    # compatible jobs behind it, up to the cap.
    full, rest = divmod(images_by_kind.get(own_kind, 0), cap)
    work += full * rates.batch_seconds(job.model_version_id, job.sampler, job.steps, cap)
    own = int(job.num_images)
    behind = 0
    if place.exact:
        # Up to `cap` jobs of its kind behind it in the head.
        mine = snapshot.members.get(own_kind, [])
        followers = [
            snapshot.head[i]
            for i in mine[bisect_left(mine, before) :][: cap + 1]
            if snapshot.head[i].position[2] != job.id
        ]
        behind = sum(queued.num_images for queued in followers[:cap])
    else:
        work *= place.ahead / max(before, 1)  # the head's work per job, for every job ahead
    batch = min(cap, rest + own + behind)
    return (
        place,
        work,
        rates.batch_seconds(job.model_version_id, job.sampler, job.steps, max(batch, own)),
    )
