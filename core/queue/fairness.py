"""Fair share between owners: the order in which queued jobs run.

Weighted round-robin by owner (fair queueing, Demers, Keshav and Shenker 1989, with whole jobs
as the packets). Each queued job gets a *fair key*

    key = rank / weight
    rank = the owner's turns taken (its jobs running, or started and ended within the last
           FAIR_WINDOW_SECONDS) + the job's place among the owner's queued jobs by created_at

and jobs run in (key, created_at, id) order. An owner is ``token:<id>`` (weight from
``api_tokens.weight``, admin-set, default 1) or ``session:…`` (weight 1). So every owner's next
job comes before anyone's second turn: owner A with 200 queued jobs and owner B with one take
turns, and B waits for at most one batch of A's. A weight of 2 gives two turns per round (keys
0.5, 1, 1.5, …), 0.5 one turn every other round.

Why the turns taken count: ranked by place in the queue alone, A's next job would rank 1 again
after each of A's batches, tie B's at rank 1, win on created_at, and B would wait behind all of
A's jobs whenever its job could not share A's batches. Counting the jobs A started keeps A's
later jobs behind B's. The order of the jobs still waiting does not change when a claim takes
one (the owner's turns go up by one as its places go down by one), so a queue position stays
true while the queue drains, until turns leave the window. The window is the memory of the
round: an owner idle for FAIR_WINDOW_SECONDS starts afresh. Extreme weight ratios (100 against
0.1) need more turns than one window holds before the light owner's turn comes.

A worker claims the head of this order, then fills its batch with compatible jobs taken in the
same order (``worker.generation.claim_batch``). The order is one statement with a window function
(SQLite ≥ 3.25, PostgreSQL): it reads the queued rows by the status index and sorts them by
owner, plus the running and recently ended ones by ``ix_jobs_status_finished_at``; some
milliseconds at 5,000 queued jobs. Each caller takes a bounded head of it (``LIMIT``).

No Flask, no Celery here.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    Float,
    Row,
    String,
    cast,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from core.db.models import ApiToken, Job, JobStatus
from core.db.transitions import db_now

_jobs = Job.__table__
_tokens = ApiToken.__table__

# Jobs an owner started this recently (running, or ended since) count as its turns taken.
FAIR_WINDOW_SECONDS = 600.0
ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
# The columns a claim needs to judge whether a job fits a batch.
BATCH_COLUMNS = ("model_version_id", "sampler", "steps", "width", "height", "num_images")


def fair_queue() -> CTE:
    """The queued jobs with their fair key: a CTE with columns ``id``, ``owner``,
    ``created_at``, :data:`BATCH_COLUMNS` and ``fair_key``; order by :func:`fair_order`."""
    columns = (_jobs.c.id, _jobs.c.owner, _jobs.c.created_at, *(_jobs.c[n] for n in BATCH_COLUMNS))
    # The owners' turns taken first (waiting 0), then their queued jobs (waiting 1), so that
    # a queued job's number counts them too.
    active = (
        select(*columns, literal(0).label("waiting"))
        .where(_jobs.c.status == JobStatus.RUNNING)
        .union_all(
            # By ix_jobs_status_finished_at: a range per status.
            select(*columns, literal(0)).where(
                _jobs.c.status.in_(ENDED),
                _jobs.c.finished_at >= db_now(-FAIR_WINDOW_SECONDS),
                _jobs.c.started_at.is_not(None),
            ),
            select(*columns, literal(1)).where(_jobs.c.status == JobStatus.QUEUED),
        )
        .subquery("active")
    )
    ranked = (
        select(
            active,
            func.row_number()
            .over(
                partition_by=active.c.owner,
                order_by=(active.c.waiting, active.c.created_at, active.c.id),
            )
            .label("rank"),
        )
    ).subquery("ranked")
    # Only tokens whose weight differs from 1: usually none or a few rows, computed once.
    weights = (
        select(
            (literal("token:", String) + cast(_tokens.c.id, String)).label("owner"),
            _tokens.c.weight,
        )
        .where(_tokens.c.weight != 1.0, _tokens.c.weight > 0)
        .cte("weights")
        .prefix_with("MATERIALIZED")
    )
    return (
        select(
            ranked.c.id,
            ranked.c.owner,
            ranked.c.created_at,
            *(ranked.c[name] for name in BATCH_COLUMNS),
            (cast(ranked.c.rank, Float) / func.coalesce(weights.c.weight, 1.0)).label("fair_key"),
        )
        .select_from(ranked.outerjoin(weights, weights.c.owner == ranked.c.owner))
        .where(ranked.c.waiting == 1)
        .cte("fair")
    )


def fair_order(fair: Any) -> tuple[ColumnElement[Any], ...]:
    """The run order of :func:`fair_queue`'s rows: key, then age, then id (to break ties)."""
    return (fair.c.fair_key, fair.c.created_at, fair.c.id)


def next_in_line(
    session: Session, limit: int, *, like: Any = None, max_images: int | None = None
) -> list[Row[Any]]:
    """The first ``limit`` queued jobs in fair order (id and :data:`BATCH_COLUMNS`). With
    ``like`` (anything with the batch columns), only jobs that can share its batch, and with
    ``max_images`` only those that fit in what is left of it."""
    fair = fair_queue()
    query = select(fair.c.id, *(fair.c[name] for name in BATCH_COLUMNS))
    if like is not None:
        query = query.where(
            fair.c.model_version_id.is_not_distinct_from(like.model_version_id),
            fair.c.sampler == like.sampler,
            fair.c.steps == like.steps,
            fair.c.width == like.width,
            fair.c.height == like.height,
        )
    if max_images is not None:
        query = query.where(fair.c.num_images <= max_images)
    return list(session.execute(query.order_by(*fair_order(fair)).limit(limit)).all())


def ahead_of(fair: Any, me: Any) -> ColumnElement[bool]:
    """Rows of ``fair`` that run before the row ``me`` (an alias of the same CTE)."""
    return tuple_(*fair_order(fair)) < tuple_(*fair_order(me))


def queue_positions(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    """For each of these jobs that is queued: how many queued jobs come before it in fair
    order. One statement, whatever the number of jobs asked about."""
    if not job_ids:
        return {}
    fair = fair_queue()
    me = fair.alias("me")
    ahead = fair.alias("ahead")
    rows = session.execute(
        select(me.c.id, func.count(ahead.c.id))
        .select_from(me.outerjoin(ahead, ahead_of(ahead, me)))
        .where(me.c.id.in_(job_ids))
        .group_by(me.c.id)
    ).all()
    return {row[0]: int(row[1]) for row in rows}
