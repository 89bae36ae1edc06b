"""Job events and webhook deliveries, written by the database in the transaction of the change.

Triggers on ``jobs`` append to ``job_events`` on insert, on every status change, every progress
step of a running job and every new preview: live push (SSE) streams those rows by id. On a
status change that is a webhook event (running → ``start``, succeeded → ``completed``, failed,
canceled) of a job with a ``webhook_url`` and that event in its filter, another trigger adds the
``webhook_deliveries`` row. Whichever code path changes a job (a claim, the reaper, a cancel, a
hand-written UPDATE), its events and deliveries commit with it or not at all: a committed state
change always leads to its delivery. ``message_id`` (the ``webhook-id`` header) is
``msg_<job>_<event>``, inserted at most once, so a job re-queued after a lost worker sends one
``start``, not one per claim.

The same statements run in the migration and after ``metadata.create_all`` (tests).
"""

from __future__ import annotations

from sqlalchemy import Connection

from core.db.triggers import Triggers, on_create_all

# Job status → webhook event name.
WEBHOOK_EVENTS = {
    "running": "start",
    "succeeded": "completed",
    "failed": "failed",
    "canceled": "canceled",
}

_PG = [
    """
CREATE OR REPLACE FUNCTION dq_job_event() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_events (job_id, kind, status, step, total, at)
    VALUES (NEW.id, TG_ARGV[0], NEW.status, NEW.progress_step, NEW.progress_total, now());
    RETURN NULL;
END
$$ LANGUAGE plpgsql
""",
    """
CREATE OR REPLACE FUNCTION dq_job_webhook() RETURNS trigger AS $$
DECLARE
    name text := CASE NEW.status WHEN 'running' THEN 'start' WHEN 'succeeded' THEN 'completed'
                 WHEN 'failed' THEN 'failed' WHEN 'canceled' THEN 'canceled' END;
BEGIN
    IF name IS NOT NULL AND (NEW.webhook_events IS NULL
                             OR NEW.webhook_events::jsonb ? name) THEN
        INSERT INTO webhook_deliveries
            (message_id, owner, job_id, event, url, state, attempts, next_attempt_at, created_at)
        VALUES ('msg_' || replace(NEW.id::text, '-', '') || '_' || name, NEW.owner, NEW.id, name,
                NEW.webhook_url, 'pending', 0, now(), now())
        ON CONFLICT (message_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
""",
    "CREATE TRIGGER jobs_event_insert AFTER INSERT ON jobs FOR EACH ROW "
    "EXECUTE FUNCTION dq_job_event('status')",
    "CREATE TRIGGER jobs_event_status AFTER UPDATE OF status ON jobs FOR EACH ROW "
    "WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION dq_job_event('status')",
    "CREATE TRIGGER jobs_event_progress AFTER UPDATE OF progress_step ON jobs FOR EACH ROW "
    "WHEN (OLD.progress_step IS DISTINCT FROM NEW.progress_step AND OLD.status = NEW.status "
    "AND NEW.status = 'running') EXECUTE FUNCTION dq_job_event('progress')",
    "CREATE TRIGGER jobs_event_preview AFTER UPDATE OF preview_key ON jobs FOR EACH ROW "
    "WHEN (NEW.preview_key IS NOT NULL AND OLD.preview_key IS DISTINCT FROM NEW.preview_key) "
    "EXECUTE FUNCTION dq_job_event('preview')",
    "CREATE TRIGGER jobs_webhook AFTER UPDATE OF status ON jobs FOR EACH ROW "
    "WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.webhook_url IS NOT NULL) "
    "EXECUTE FUNCTION dq_job_webhook()",
]

_SQLITE_EVENT = (
    "INSERT INTO job_events (job_id, kind, status, step, total, at) VALUES "
    "(NEW.id, '{kind}', NEW.status, NEW.progress_step, NEW.progress_total, "
    "strftime('%Y-%m-%d %H:%M:%f', 'now'));"
)
_SQLITE_WEBHOOK_NAME = (
    "CASE NEW.status WHEN 'running' THEN 'start' WHEN 'succeeded' THEN 'completed' "
    "WHEN 'failed' THEN 'failed' WHEN 'canceled' THEN 'canceled' END"
)
_SQLITE = [
    "CREATE TRIGGER jobs_event_insert AFTER INSERT ON jobs BEGIN "
    + _SQLITE_EVENT.format(kind="status")
    + " END",
    "CREATE TRIGGER jobs_event_status AFTER UPDATE OF status ON jobs "
    "WHEN OLD.status IS NOT NEW.status BEGIN " + _SQLITE_EVENT.format(kind="status") + " END",
    "CREATE TRIGGER jobs_event_progress AFTER UPDATE OF progress_step ON jobs "
    "WHEN OLD.progress_step IS NOT NEW.progress_step AND OLD.status = NEW.status "
    "AND NEW.status = 'running' BEGIN " + _SQLITE_EVENT.format(kind="progress") + " END",
    "CREATE TRIGGER jobs_event_preview AFTER UPDATE OF preview_key ON jobs "
    "WHEN NEW.preview_key IS NOT NULL AND OLD.preview_key IS NOT NEW.preview_key BEGIN "
    + _SQLITE_EVENT.format(kind="preview")
    + " END",
    "CREATE TRIGGER jobs_webhook AFTER UPDATE OF status ON jobs "
    "WHEN OLD.status IS NOT NEW.status AND NEW.webhook_url IS NOT NULL "
    f"AND ({_SQLITE_WEBHOOK_NAME}) IS NOT NULL AND (NEW.webhook_events IS NULL OR EXISTS "
    f"(SELECT 1 FROM json_each(NEW.webhook_events) WHERE value = {_SQLITE_WEBHOOK_NAME})) "
    "BEGIN INSERT OR IGNORE INTO webhook_deliveries "
    "(message_id, owner, job_id, event, url, state, attempts, next_attempt_at, created_at) "
    f"VALUES ('msg_' || NEW.id || '_' || {_SQLITE_WEBHOOK_NAME}, NEW.owner, NEW.id, "
    f"{_SQLITE_WEBHOOK_NAME}, NEW.webhook_url, 'pending', 0, "
    "strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%Y-%m-%d %H:%M:%f', 'now')); END",
]

TRIGGERS = Triggers(
    purpose="job events",
    statements={"postgresql": _PG, "sqlite": _SQLITE},
    names=[
        (name, "jobs")
        for name in (
            "jobs_event_insert",
            "jobs_event_status",
            "jobs_event_progress",
            "jobs_event_preview",
            "jobs_webhook",
        )
    ],
    functions=["dq_job_event", "dq_job_webhook"],
)


def create_triggers(connection: Connection) -> None:
    TRIGGERS.create(connection)


def drop_triggers(connection: Connection) -> None:
    TRIGGERS.drop(connection)


on_create_all("job_events", create_triggers)
