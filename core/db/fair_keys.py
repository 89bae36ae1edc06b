"""Start tags for the fair order, given by the database itself as each job is queued.

A trigger on ``jobs`` keys every row inserted as queued without a key, whichever code path
inserted it (``submit_job``, a batch, a test's or a benchmark's bulk ``INSERT``):

    V     = the smallest start tag among the jobs queued or running (the job in service), or,
            with none, the largest any owner was given; 0 on a new database
    w     = the owner's weight (``api_tokens.weight`` for ``token:<id>``, else 1)
    start = max(V, the owner's next_start)       -> jobs.fair_key
    the owner's next_start = start + 1 / w       (fair_owners)

in one upsert of the owner's ``fair_owners`` row, so two jobs of one owner queued at once take
consecutive tags (the second waits for the first's row lock). The algorithm and why it is fair
are in :mod:`core.queue.fairness`. A row inserted with a key keeps it (a benchmark filling a
million rows may compute them itself). The same statements run in the migration that adds the
column and after ``metadata.create_all`` (tests).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from core.db.triggers import Triggers, on_create_all

# V: the smallest start tag among the jobs queued or running (the one in service), else the
# newest start tag given, else 0.
_QUEUED_MIN = "(SELECT min(fair_key) FROM jobs WHERE status = 'queued')"
_RUNNING_MIN = "(SELECT min(fair_key) FROM jobs WHERE status = 'running')"
_NEWEST = "(SELECT max(last_start) FROM fair_owners)"
_PG_VIRTUAL_TIME = f"coalesce(least({_QUEUED_MIN}, {_RUNNING_MIN}), {_NEWEST}, 0)"
_SQLITE_VIRTUAL_TIME = (
    f"coalesce(min(coalesce({_QUEUED_MIN}, {_RUNNING_MIN}), coalesce({_RUNNING_MIN}, "
    f"{_QUEUED_MIN})), {_NEWEST}, 0)"
)

_PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION dq_fair_key() RETURNS trigger AS $$
DECLARE
    w double precision;
    v double precision := {_PG_VIRTUAL_TIME};
BEGIN
    IF NEW.owner ~ '^token:[0-9]{{1,18}}$' THEN
        SELECT weight INTO w FROM api_tokens
        WHERE id = substr(NEW.owner, 7)::bigint AND weight > 0;
    END IF;
    w := coalesce(w, 1.0);
    INSERT INTO fair_owners AS o (owner, last_start, next_start, weight)
    VALUES (NEW.owner, v, v + 1.0 / w, w)
    ON CONFLICT (owner) DO UPDATE SET
        last_start = greatest(o.next_start, v),
        next_start = greatest(o.next_start, v) + 1.0 / w,
        weight = w
    RETURNING last_start INTO NEW.fair_key;
    RETURN NEW;
END
$$ LANGUAGE plpgsql
"""

_PG_TRIGGER = """
CREATE TRIGGER jobs_fair_key BEFORE INSERT ON jobs FOR EACH ROW
WHEN (NEW.status = 'queued' AND NEW.fair_key IS NULL) EXECUTE FUNCTION dq_fair_key()
"""

# SQLite cannot change NEW in a BEFORE trigger: the row is keyed just after it is inserted, in
# the same statement.
_SQLITE_TRIGGER = f"""
CREATE TRIGGER jobs_fair_key AFTER INSERT ON jobs
WHEN NEW.status = 'queued' AND NEW.fair_key IS NULL BEGIN
    INSERT INTO fair_owners (owner, last_start, next_start, weight)
    SELECT NEW.owner, v, v + 1.0 / w, w FROM (
        SELECT {_SQLITE_VIRTUAL_TIME} AS v,
            coalesce((SELECT weight FROM api_tokens
                WHERE NEW.owner GLOB 'token:[0-9]*'
                AND id = CAST(substr(NEW.owner, 7) AS INTEGER) AND weight > 0), 1.0) AS w
    ) WHERE true
    ON CONFLICT (owner) DO UPDATE SET
        last_start = max(next_start, excluded.last_start),
        next_start = max(next_start, excluded.last_start) + 1.0 / excluded.weight,
        weight = excluded.weight;
    UPDATE jobs SET fair_key = (SELECT last_start FROM fair_owners WHERE owner = NEW.owner)
    WHERE id = NEW.id;
END
"""

TRIGGERS = Triggers(
    purpose="fair keys",
    statements={"postgresql": [_PG_FUNCTION, _PG_TRIGGER], "sqlite": [_SQLITE_TRIGGER]},
    names=[("jobs_fair_key", "jobs")],
    functions=["dq_fair_key"],
)

# The weight of the owner of the job ``j``, as the backfill reads it.
_WEIGHT_OF_J = (
    "coalesce((SELECT t.weight FROM api_tokens t "
    "WHERE j.owner = 'token:' || CAST(t.id AS VARCHAR(20)) AND t.weight > 0), 1.0)"
)

# Jobs already queued or running when the column arrives: each owner's k-th (running ones
# first, then by age) starts at (k - 1) / weight, the order the window function gave them.
_BACKFILL_JOBS = f"""
UPDATE jobs SET fair_key = ranked.start FROM (
    SELECT j.id AS id,
        (row_number() OVER (PARTITION BY j.owner
            ORDER BY CASE WHEN j.status = 'running' THEN 0 ELSE 1 END, j.created_at, j.id) - 1)
        / {_WEIGHT_OF_J} AS start
    FROM jobs j WHERE j.status IN ('queued', 'running') AND j.fair_key IS NULL
) AS ranked WHERE jobs.id = ranked.id
"""

_BACKFILL_OWNERS = f"""
INSERT INTO fair_owners (owner, last_start, next_start, weight)
SELECT owner, max(fair_key), max(fair_key) + 1.0 / w, w FROM (
    SELECT j.owner AS owner, j.fair_key AS fair_key, {_WEIGHT_OF_J} AS w
    FROM jobs j WHERE j.status IN ('queued', 'running') AND j.fair_key IS NOT NULL
) AS keyed GROUP BY owner, w
"""


def create_triggers(connection: Connection) -> None:
    """Install the trigger, and key the jobs already queued or running."""
    connection.execute(text(_BACKFILL_JOBS))
    connection.execute(text(_BACKFILL_OWNERS))
    TRIGGERS.create(connection)


def drop_triggers(connection: Connection) -> None:
    TRIGGERS.drop(connection)


on_create_all("fair_owners", create_triggers)
