"""Fair share between owners: the order in which queued jobs run.

Start-time fair queuing (Goyal, Vin and Cheng, "Start-time Fair Queuing: A Scheduling Algorithm
for Integrated Services Packet Switching Networks", SIGCOMM 1996), with whole jobs as the
packets, each of cost 1. Every job gets a *start tag* once, as it is queued, and jobs run in
(start tag, created_at, id) order:

    V            = the virtual time: the smallest start tag of the jobs queued or running (the
                   job in service, or the head of the queue)
    start        = max(V, the owner's finish tag)           (jobs.fair_key)
    finish tag   = start + 1 / weight                       (fair_owners.next_start)

An owner is ``token:<id>`` (weight from ``api_tokens.weight``, admin-set, default 1) or
``session:…`` (weight 1). The database gives the tags, in a trigger on ``jobs``
(``core.db.fair_keys``), so that every path that queues a job keys it the same way.

What it guarantees (``tests/core/test_fair_share.py``):

- Every owner's next job comes before anyone's second turn. Owner A queues 200 jobs (tags 0,
  1, …, 199); owner B queues one while A's first 16 run: V = 0 (A's first is in service), B's
  tag is 0, and B's job is claimed in the next claim, ahead of A's 17th.
- A weight of 2 gives two turns per round (tags 0, 0.5, 1, …), 0.5 one every other round.
- An idle owner starts afresh: its finish tag falls behind V while it has nothing queued, and
  max(V, …) forgets it. An owner that queued far ahead keeps its later tags: it has had its
  share of the rounds to come.

The tags are stored, so nothing ranks the queue at claim time: the head, a claim and a batch fill
are range scans of partial indexes on the queued rows (``ix_jobs_queued_fair`` in tag order,
``ix_jobs_queued_kind`` by kind of batch, then tag), whatever the queue's depth.

Where it differs from re-ranking the whole queue at every claim (the window function this module
used before): a weight changed by an admin applies to jobs queued after the change; a job put
back in the queue (a lost lease, a transient error) keeps its old tag and so runs next, as it
should; and a claim that fills its batch with compatible jobs from further down the order runs
them early, so their owners' later jobs keep their tags (they are ahead by that batch).

Queue positions: the jobs ahead of a job are counted through the index up to
:data:`POSITION_EXACT_UP_TO` (exact, in at most that many index entries). Beyond it the count is
estimated from ``fair_owners`` alone: an owner whose finish tag is ahead of V has queued jobs at
tags V, V + 1/w, … up to its last start, so the jobs ahead of a tag k are, summed over owners,
those of its tags that fall below k. The estimate is exact while each owner's queued tags are
contiguous; batch fills and requeues make gaps (docs/QUEUE.md measures the error). A position
says which one it is (:class:`Place`).

Model affinity (issue 27): a worker keeps a few model versions loaded (``worker.models``), and
loading another costs seconds. When the head of the queue needs a version that the claiming
worker does not hold (it is *cold* for that worker), the claim reads the next
:data:`AFFINITY_LOOKAHEAD` jobs in fair order and takes, in fair order, the first it may run now
(:class:`Affinity`):

- a job for a version it holds (*warm*) **within the head's next rounds**: a start tag below the
  head's plus :data:`AFFINITY_ROUNDS` (4: each owner's next 4 turns, 4w for weight w), or
- a cold job that this worker has already passed over for at least
  DQ_MODEL_AFFINITY_WAIT_SECONDS (W).

When the head's version is held by another live worker and not by this one, it next takes, in
fair order and within the same rounds, a job whose version no other live worker holds: some
worker has to load that one, while the head has a worker that holds its version already, and
loading it here too would hold it twice. Who holds what is ``worker_presence.models``, which a
worker's heartbeat writes every 10 s and right after each load (:func:`~core.queue.eta.
models_held_elsewhere`); DQ_MODEL_AFFINITY_PRESENCE=false leaves this step out.

With none of these it takes the head, as without affinity: an idle worker does not wait for
another to take a job. The cold jobs ahead of what it took are *passed over*; the worker
remembers when it first passed each. A worker that holds nothing yet keeps the plain fair order
unless the head's version is held elsewhere; W = 0 keeps it always.
What bounds it:

- **Fair share, in rounds**: while a cold job waits at the head, V (the head's tag) stands still,
  so the jobs taken ahead of it all have tags below V + 4: each owner gets at most its next
  4 turns (4w for weight w) ahead of it, never more, and the owner of the cold job keeps its
  place in every round after. Affinity reorders the next 4 rounds of the fair order; it moves
  no owner's long-run share, and it adds at most 4 rounds to SFQ's bound on how far one owner's
  service may lag another's. When every job is warm, the claims are exactly those of the fair order
  (``tests/core/test_fair_share.py``, ``tests/worker/test_model_affinity.py``). Why 4:
  ``bench/bench_models.py`` (two workers holding one of three versions each, eight owners)
  measured 15, 11.5 and 6.2 model loads per 100 jobs at 1, 2 and 4 rounds, against 19.8 without
  affinity (docs/QUEUE.md).
- **In time**: a cold job that a worker has passed over for W is that worker's first choice at
  its next claim, ahead of any warm job, so a job for a model nobody holds waits at most W (plus
  the batch that worker is running) longer than the fair order would make it wait before some
  worker loads its model; sooner when those rounds run out of warm jobs, or when a worker that
  holds its model claims.

It costs one more bounded index range scan (:data:`AFFINITY_LOOKAHEAD` entries of
``ix_jobs_queued_fair``), and only when the head is cold for the claiming worker: still nothing
in the queue's depth. The clocks are the worker process's own, like its cache; a restarted
worker holds nothing and so starts from the plain fair order.

No Flask, no Celery here.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from core.db.models import FairOwner, Job, JobStatus

_jobs = Job.__table__
_owners = FairOwner.__table__

# The columns a claim needs to judge whether a job fits a batch.
BATCH_COLUMNS = ("model_version_id", "sampler", "steps", "width", "height", "num_images")
KIND_COLUMNS = ("model_version_id", "sampler", "steps", "width", "height")
# Queue positions are counted exactly up to this many jobs ahead, and estimated beyond.
POSITION_EXACT_UP_TO = 1000

QUEUED: ColumnElement[bool] = _jobs.c.status == JobStatus.QUEUED
ORDER = (_jobs.c.fair_key, _jobs.c.created_at, _jobs.c.id)


def ahead_of(key: float, created_at: Any, job_id: uuid.UUID) -> ColumnElement[bool]:
    """Queued rows of ``jobs`` that run before the job with this tag, age and id."""
    return QUEUED & (tuple_(*ORDER) < tuple_(key, created_at, job_id))


def same_kind(like: Any) -> list[ColumnElement[bool]]:
    """Rows of ``jobs`` of the same kind of batch as ``like`` (anything with the kind columns),
    spelled so that ``ix_jobs_queued_kind`` serves them (no IS NOT DISTINCT FROM)."""
    model = _jobs.c.model_version_id
    return [
        model.is_(None) if like.model_version_id is None else model == like.model_version_id,
        _jobs.c.sampler == like.sampler,
        _jobs.c.steps == like.steps,
        _jobs.c.width == like.width,
        _jobs.c.height == like.height,
    ]


def next_in_line(
    session: Session, limit: int, *, like: Any = None, max_images: int | None = None
) -> list[Any]:
    """The first ``limit`` queued jobs in fair order (id, :data:`BATCH_COLUMNS` and
    ``fair_key``). With ``like`` (anything with the kind columns), only jobs that can share its
    batch, and with ``max_images`` only those that fit in what is left of it."""
    query = select(_jobs.c.id, *(_jobs.c[name] for name in BATCH_COLUMNS), _jobs.c.fair_key).where(
        QUEUED
    )
    if like is not None:
        query = query.where(*same_kind(like))
    if max_images is not None:
        query = query.where(_jobs.c.num_images <= max_images)
    return list(session.execute(query.order_by(*ORDER).limit(limit)).all())


# --- model affinity ---------------------------------------------------------------------------

# The jobs next in line that a worker holding some model versions chooses from, and how far past
# the head's start tag a warm job may be taken ahead of it (4 rounds: each owner's next 4 turns).
AFFINITY_LOOKAHEAD = 32
AFFINITY_ROUNDS = 4.0


class Affinity:
    """One worker process's model affinity: which of the jobs next in line it claims first,
    and when it first passed over each cold job it has skipped (its own monotonic clock)."""

    def __init__(self, wait_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.wait_seconds = wait_seconds
        self.clock = clock
        self._passed: dict[uuid.UUID, tuple[float, float]] = {}  # first passed over, last seen

    def order(
        self,
        rows: Sequence[Any],
        warm: Collection[uuid.UUID | None],
        elsewhere: Collection[uuid.UUID | None] = (),
    ) -> list[Any]:
        """``rows`` (the jobs next in line, in fair order, with ``id``, ``model_version_id`` and
        ``fair_key``) in the order a worker holding the versions ``warm`` tries to claim them:

        1. in fair order, those it may run now: warm and within the head's next
           :data:`AFFINITY_ROUNDS` rounds, or cold and passed over for ``wait_seconds``;
        2. when the head's version is held by another live worker (``elsewhere``) and not by
           this one: in fair order, the jobs within those rounds whose version no other live
           worker holds. Some worker has to load those; the head has a worker that holds its
           version, and loading that version here too would only hold it twice;
        3. the others in fair order.

        The cold jobs ahead of the first of 1 and 2 are marked passed over."""
        if self.wait_seconds <= 0 or not rows or rows[0].fair_key is None:
            return list(rows)
        head_model = rows[0].model_version_id
        head_elsewhere = head_model in elsewhere and head_model not in warm
        if not warm and not head_elsewhere:
            return list(rows)
        now = self.clock()
        self._forget(now)
        round_ends = rows[0].fair_key + AFFINITY_ROUNDS
        ready: list[Any] = []
        unheld: list[Any] = []
        rest: list[Any] = []
        for row in rows:
            if self._may_run(row, warm, round_ends, now):
                ready.append(row)
            elif (
                head_elsewhere
                and row.fair_key < round_ends
                and row.model_version_id not in elsewhere
            ):
                unheld.append(row)
            else:
                rest.append(row)
        # The cold jobs ahead of the first it may take are passed over now; every clock of a job
        # still in line is kept.
        first = (ready or unheld or [None])[0]
        ahead = next((i for i, row in enumerate(rows) if row is first), 0)
        for i, row in enumerate(rows):
            known = self._passed.get(row.id)
            if i < ahead or known is not None:
                self._passed[row.id] = (now if known is None else known[0], now)
        return ready + unheld + rest

    def passed_over_for(self, job_id: uuid.UUID) -> float | None:
        """Seconds since this worker first passed over the job; None if it has not."""
        passed = self._passed.get(job_id)
        return None if passed is None else self.clock() - passed[0]

    def _may_run(
        self, row: Any, warm: Collection[uuid.UUID | None], round_ends: float, now: float
    ) -> bool:
        if row.model_version_id in warm:
            return bool(row.fair_key < round_ends)
        passed = self._passed.get(row.id)
        return passed is not None and now - passed[0] >= self.wait_seconds

    def _forget(self, now: float) -> None:
        """Drop the clocks of jobs not seen in line for a while (claimed by others, canceled):
        the map holds the jobs of the recent lookaheads, not the queue."""
        horizon = now - (self.wait_seconds + 60.0)
        for job_id in [j for j, (_, seen) in self._passed.items() if seen < horizon]:
            del self._passed[job_id]


# Idle owners' rows the reaper deletes in one pass, at most.
FORGET_BATCH = 1000


def forget_idle_owners(session: Session, limit: int = FORGET_BATCH) -> int:
    """Delete up to ``limit`` rows of ``fair_owners`` whose finish tag V has passed: the trigger
    would give such an owner V, as it gives an owner it has never seen, so the row says nothing.
    Keeps the table (and :class:`OwnerTags`' read of it) to the owners with work ahead.
    Returns how many went."""
    # V as the trigger reads it: the smaller of the head's tag (the partial index) and the
    # running jobs' smallest (a few rows), each an index read, never a scan of the queue.
    tags = [
        virtual_time(session),
        session.scalar(
            select(func.min(_jobs.c.fair_key)).where(_jobs.c.status == JobStatus.RUNNING)
        ),
    ]
    known = [t for t in tags if t is not None]
    in_service = min(known) if known else None
    idle = select(_owners.c.owner).limit(limit)
    if in_service is not None:
        idle = idle.where(_owners.c.last_start <= in_service, _owners.c.next_start <= in_service)
    gone = session.execute(delete(FairOwner).where(FairOwner.owner.in_(idle.scalar_subquery())))
    return int(gone.rowcount or 0)  # type: ignore[attr-defined]


def virtual_time(session: Session | Connection) -> float | None:
    """The start tag at the head of the queue; None when nothing is queued."""
    return session.scalar(select(func.min(_jobs.c.fair_key)).where(QUEUED))


@dataclass(frozen=True)
class Place:
    """How many queued jobs run before a job: counted when ``exact``, else estimated."""

    ahead: int
    exact: bool


def count_ahead(session: Session, key: float, created_at: Any, job_id: uuid.UUID) -> int:
    """Queued jobs before this one, counted through the index up to
    :data:`POSITION_EXACT_UP_TO` (that value means "at least")."""
    head = (
        select(_jobs.c.id)
        .where(ahead_of(key, created_at, job_id))
        .order_by(*ORDER)
        .limit(POSITION_EXACT_UP_TO)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(head)) or 0)


@dataclass(frozen=True)
class OwnerTags:
    """The head's start tag and each owner's (last start, weight) with jobs queued: one read of
    ``fair_owners``, none per job, from which :meth:`ahead` estimates the places of many jobs."""

    head: float | None
    owners: list[tuple[float, float]]

    @classmethod
    def load(cls, session: Session | Connection) -> OwnerTags:
        v = virtual_time(session)
        if v is None:
            return cls(None, [])
        rows = session.execute(
            select(_owners.c.last_start, _owners.c.weight).where(_owners.c.last_start >= v)
        ).all()
        return cls(v, [(float(last), float(weight)) for last, weight in rows])

    def ahead(self, key: float) -> int:
        if self.head is None or key <= self.head:
            return 0
        return sum(_tags_below(self.head, last, weight, key) for last, weight in self.owners)


def _tags_below(v: float, last: float, weight: float, key: float) -> int:
    """An owner's tags v', v' + 1/w, …, ``last`` (v' the first at or after ``v``) that are below
    ``key``: counted from its last one back, which is the one it surely has."""
    step = 1.0 / weight if weight > 0 else 1.0
    eps = 1e-9
    queued = math.floor((last - v) / step + eps) + 1  # its tags from v' to last
    if key > last:
        return queued
    # Tags at or above key: last, last - step, … >= key.
    at_or_above = math.floor((last - key) / step + eps) + 1
    return max(0, queued - at_or_above)


def places(session: Session, jobs: Sequence[Any]) -> dict[uuid.UUID, Place]:
    """For each of these queued jobs (rows with ``id``, ``fair_key`` and ``created_at``): its
    :class:`Place`. Bounded work per job, whatever the queue's depth."""
    out = {}
    boundary = head_boundary(session) if len(jobs) > 1 else None
    tags: OwnerTags | None = None
    for job in jobs:
        if job.fair_key is None:  # not keyed: cannot be placed (never after the migration)
            continue
        mine = (job.fair_key, job.created_at, job.id)
        beyond = boundary is not None and mine > boundary
        ahead = POSITION_EXACT_UP_TO if beyond else count_ahead(session, *mine)
        if ahead < POSITION_EXACT_UP_TO:
            out[job.id] = Place(ahead, True)
        else:
            tags = tags or OwnerTags.load(session)
            out[job.id] = Place(max(tags.ahead(job.fair_key), POSITION_EXACT_UP_TO), False)
    return out


def head_boundary(session: Session) -> tuple[Any, ...] | None:
    """The (tag, age, id) of the last job of the counted head (the POSITION_EXACT_UP_TO-th in
    line): a job after it is past the bound, without counting. None when the queue is shorter."""
    row = session.execute(
        select(*ORDER).where(QUEUED).order_by(*ORDER).offset(POSITION_EXACT_UP_TO - 1).limit(1)
    ).first()
    return None if row is None else tuple(row)


def queue_positions(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, Place]:
    """For each of these jobs that is queued: its :class:`Place` in the fair order."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(_jobs.c.id, _jobs.c.fair_key, _jobs.c.created_at).where(
            _jobs.c.id.in_(job_ids), QUEUED
        )
    ).all()
    return places(session, rows)
