"""Counts of jobs and training runs by status, kept by the database itself.

Triggers on ``jobs`` and ``training_runs`` append a −1 for the old status and a +1 for the new one
to ``status_count_deltas`` on every insert, status change and delete, whichever code path made
it (a claim, the reaper, ``dq prune``, a hand-written ``UPDATE``). The reaper folds the deltas
into ``status_counts`` (:func:`fold`); a reader adds the two (:func:`read`). Either way a scrape
of /metrics reads a handful of rows, not the tables.

Appending rather than updating one counter row keeps concurrent transactions from waiting on
(or deadlocking over) the same row. The same statements run in the migration and after
``metadata.create_all`` (tests), so both get the triggers.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import Connection, delete, func, select, text
from sqlalchemy.orm import Session

from core.db.models import JobStatus, StatusCount, StatusCountDelta
from core.db.triggers import Triggers, on_create_all

TABLES = {"jobs": "job", "training_runs": "run"}

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION dq_status_count() RETURNS trigger AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO status_count_deltas (kind, status, delta) VALUES (TG_ARGV[0], OLD.status, -1);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO status_count_deltas (kind, status, delta) VALUES (TG_ARGV[0], NEW.status, 1);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""


def _postgresql() -> list[str]:
    out = [_PG_FUNCTION]
    for table, kind in TABLES.items():
        for event_name, when in (
            ("INSERT", ""),
            ("DELETE", ""),
            ("UPDATE OF status", "WHEN (OLD.status IS DISTINCT FROM NEW.status)"),
        ):
            name = f"{table}_count_{event_name.split()[0].lower()}"
            out.append(
                f"CREATE TRIGGER {name} AFTER {event_name} ON {table} FOR EACH ROW {when} "
                f"EXECUTE FUNCTION dq_status_count('{kind}')"
            )
    return out


def _sqlite() -> list[str]:
    out = []
    for table, kind in TABLES.items():
        add = "INSERT INTO status_count_deltas (kind, status, delta) VALUES ('{k}', {s}, {d});"
        out.append(
            f"CREATE TRIGGER {table}_count_insert AFTER INSERT ON {table} BEGIN "
            + add.format(k=kind, s="NEW.status", d=1)
            + " END"
        )
        out.append(
            f"CREATE TRIGGER {table}_count_delete AFTER DELETE ON {table} BEGIN "
            + add.format(k=kind, s="OLD.status", d=-1)
            + " END"
        )
        out.append(
            f"CREATE TRIGGER {table}_count_update AFTER UPDATE OF status ON {table} "
            "WHEN OLD.status IS NOT NEW.status BEGIN "
            + add.format(k=kind, s="OLD.status", d=-1)
            + " "
            + add.format(k=kind, s="NEW.status", d=1)
            + " END"
        )
    return out


TRIGGERS = Triggers(
    purpose="status counts",
    statements={"postgresql": _postgresql(), "sqlite": _sqlite()},
    names=[
        (f"{table}_count_{op}", table) for table in TABLES for op in ("insert", "delete", "update")
    ],
    functions=["dq_status_count"],
)


def create_triggers(connection: Connection) -> None:
    """Install the triggers, and count what the tables already hold."""
    TRIGGERS.create(connection)
    for table, kind in TABLES.items():
        connection.execute(
            text(
                f"INSERT INTO status_counts (kind, status, count) "
                f"SELECT '{kind}', status, COUNT(*) FROM {table} GROUP BY status"
            )
        )


def drop_triggers(connection: Connection) -> None:
    TRIGGERS.drop(connection)


on_create_all("status_count_deltas", create_triggers)


def fold(session: Session) -> int:
    """Move the appended deltas into the counters; returns how many deltas were folded.

    ``DELETE … RETURNING`` takes only rows this transaction can see, so a delta committed a
    moment later stays for the next fold instead of being lost."""
    rows = session.execute(
        delete(StatusCountDelta).returning(
            StatusCountDelta.kind, StatusCountDelta.status, StatusCountDelta.delta
        )
    ).all()
    if not rows:
        return 0
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for kind, status, delta in rows:
        sums[(kind, status)] += delta
    # A fixed order of row locks: two reapers folding at once cannot deadlock.
    for (kind, status), total in sorted(sums.items()):
        if total == 0:
            continue
        row = session.get(StatusCount, (kind, status), with_for_update=True)
        if row is None:
            session.add(StatusCount(kind=kind, status=status, count=total))
            session.flush()
        else:
            row.count += total
    return len(rows)


def read(session: Session, kind: str) -> dict[str, int]:
    """Rows of ``kind`` ("job" or "run") by status: the counters plus the unfolded deltas."""
    counts = {status.value: 0 for status in JobStatus}
    for status, count in session.execute(
        select(StatusCount.status, StatusCount.count).where(StatusCount.kind == kind)
    ):
        counts[status] = counts.get(status, 0) + int(count)
    for status, delta in session.execute(
        select(StatusCountDelta.status, func.sum(StatusCountDelta.delta))
        .where(StatusCountDelta.kind == kind)
        .group_by(StatusCountDelta.status)
    ):
        counts[status] = counts.get(status, 0) + int(delta)
    return counts
