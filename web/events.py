"""Live push: a job's events as a text/event-stream (server-sent events).

``GET /api/v1/jobs/<id>/events`` (Bearer token) and ``GET /jobs/<id>/events`` (the job page's
EventSource, with the browser's session) stream the rows that database triggers append to
``job_events`` on every change of the job (``core.db.events``). The row id is the event id, so a
client that reconnects with ``Last-Event-ID`` gets exactly the events it has not seen.

Events (``event:`` names):

- ``status`` (queued, running), ``progress`` (a denoising step), ``preview`` (a new preview);
- ``completed``, ``failed``, ``canceled``: the end; the stream closes after it;
- ``queue`` (no id, never replayed): the job again while it waits, at most every
  ``QUEUE_REFRESH_SECONDS``, when jobs ahead of it have moved.

``data`` is JSON: ``job_id``, and ``status``, ``progress`` (``step``, ``total``, ``preview_url``)
and ``at`` as of that event; ``job``, the job object of GET /api/v1/jobs/<id> as it is when sent
(presigned URLs, images, queue position, estimates), rides on the newest event of each write, so
always on the terminal one. A job that ended before its events were recorded gets one terminal
event without an id.

The stream opens with a ``retry:`` hint, sends a ``: keep-alive`` comment every
DQ_SSE_HEARTBEAT_SECONDS while idle, and closes after ``timeout`` seconds (EventSource then
reconnects with its Last-Event-ID; nothing is lost). A finished job with nothing after
Last-Event-ID answers 204, which tells EventSource to stop reconnecting. The waiting is done by
one thread per process (``core.queue.event_hub``); a stream reads the database only when its job
changed.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import uuid
from collections.abc import Iterator
from time import monotonic
from typing import Any

from apiflask import Schema
from apiflask.fields import Integer
from apiflask.validators import Range
from flask import Flask, Response, current_app, request, stream_with_context
from marshmallow import RAISE
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db.models import JobEvent, JobStatus
from core.queue.eta import SnapshotCache
from core.queue.event_hub import EventHub, ServerBusy, TooManyStreams
from core.queue.notify import redis_url
from core.services.jobs import JobNotFound
from core.storage import Storage
from web.api import COMMON_ERRORS, api
from web.auth import bearer_caller, page_caller
from web.db import end_reads, get_session
from web.pages import NO_SUCH_JOB, pages
from web.problems import Problem
from web.resources import iso, job_resource, job_views, load_job
from web.services import services

log = logging.getLogger(__name__)

RETRY_MS = 3000
DEFAULT_TIMEOUT_SECONDS = 600
MAX_TIMEOUT_SECONDS = 3600
QUEUE_REFRESH_SECONDS = 10.0
MAX_STREAMS_PER_OWNER = 100  # per web process
REPLAY_BATCH = 500
MAX_EVENT_ID = 2**63 - 1
TERMINAL = {
    JobStatus.SUCCEEDED.value: "completed",
    JobStatus.FAILED.value: "failed",
    JobStatus.CANCELED.value: "canceled",
}

_hub_lock = threading.Lock()


def event_hub(app: Flask) -> EventHub:
    """This app's hub, made on first use (so in each gunicorn worker, after the fork)."""
    with _hub_lock:
        hub: EventHub | None = app.extensions.get("dq_event_hub")
        if hub is None:
            svc = app.extensions["dq"]
            hub = EventHub(
                svc.read_engine,
                redis_url(svc.settings),
                max_streams_per_owner=MAX_STREAMS_PER_OWNER,
                max_streams=svc.settings.sse_max_streams,
            )
            app.extensions["dq_event_hub"] = hub
        return hub


def event_name(kind: str, status: str) -> str:
    if kind == "status":
        return TERMINAL.get(status, "status")
    return kind


def frame(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One event in the wire format (a JSON line has no newlines, so one ``data:`` line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def read_events(engine: Engine, job_id: uuid.UUID, after: int) -> list[Any]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                select(
                    JobEvent.id,
                    JobEvent.kind,
                    JobEvent.status,
                    JobEvent.step,
                    JobEvent.total,
                    JobEvent.at,
                )
                .where(JobEvent.job_id == job_id, JobEvent.id > after)
                .order_by(JobEvent.id)
                .limit(REPLAY_BATCH)
            )
        )


def read_job(
    engine: Engine, storage: Storage, snapshots: SnapshotCache, job_id: uuid.UUID
) -> dict[str, Any] | None:
    """The job object as the API shows it now (its place from the process's view of the
    queue); None once the job is gone (pruned)."""
    with Session(engine) as session:
        views = job_views(session, [job_id], snapshots=snapshots)
        return job_resource(views[0], storage) if views else None


class EventStream:
    """The body of one open stream."""

    def __init__(
        self,
        hub: EventHub,
        job_id: uuid.UUID,
        owner: str,
        last_event_id: int | None,
        timeout: float,
    ):
        svc = services()
        self.hub = hub
        self.engine = svc.read_engine
        self.storage = svc.storage
        self.snapshots = svc.queue_snapshots
        self.heartbeat = svc.settings.sse_heartbeat_seconds
        self.job_id = job_id
        self.last_id = last_event_id or 0
        self.resumed = last_event_id is not None
        self.timeout = timeout
        # Subscribe before the first read: whatever commits after it wakes this stream.
        self.sub = hub.subscribe(job_id, owner)

    def close(self) -> None:
        self.hub.unsubscribe(self.sub)

    def read_job(self) -> dict[str, Any] | None:
        return read_job(self.engine, self.storage, self.snapshots, self.job_id)

    def _batch(self, rows: list[Any], job: dict[str, Any] | None) -> str:
        running_preview = job["progress"]["preview_url"] if job else None
        out = []
        for i, row in enumerate(rows):
            data: dict[str, Any] = {
                "job_id": str(self.job_id),
                "status": row.status,
                "progress": {
                    "step": row.step,
                    "total": row.total,
                    "preview_url": running_preview if row.status == "running" else None,
                },
                "at": iso(row.at),
            }
            if i == len(rows) - 1 and job is not None:
                data["job"] = job
            out.append(frame(event_name(row.kind, row.status), data, row.id))
        return "".join(out)

    def first_rows(self) -> list[Any]:
        return read_events(self.engine, self.job_id, self.last_id)

    def body(self, rows: list[Any], status: str, job: dict[str, Any]) -> Iterator[str]:
        try:
            yield from self._body(rows, status, job)
        except SQLAlchemyError as e:  # the client reconnects and resumes where it was
            log.warning("event stream of job %s ends: the database failed (%s)", self.job_id, e)
        finally:
            self.close()

    def _body(self, rows: list[Any], status: str, opened: dict[str, Any]) -> Iterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        now = monotonic()
        deadline = now + self.timeout
        next_beat = now + self.heartbeat
        queue_seen = self.hub.queue_version
        # Spread out, so that the waiting streams do not all read at once when the queue moves.
        queue_check = now + QUEUE_REFRESH_SECONDS * random.uniform(0.5, 1.0)
        more = len(rows) == REPLAY_BATCH
        if not rows and status in TERMINAL:
            # Ended before events were recorded (resumed streams of ended jobs got 204).
            job = opened
            if job is not None:
                data = {"job_id": str(self.job_id), "status": status, "job": job}
                data["progress"], data["at"] = job["progress"], job["finished_at"]
                yield frame(TERMINAL[status], data)
            return
        while True:
            if rows:
                ended = next(
                    (i for i, r in enumerate(rows) if r.kind == "status" and r.status in TERMINAL),
                    None,
                )
                last = rows[-1 if ended is None else ended]
                # The job as the view read it just before the first rows, when no later change
                # came between: one read fewer per stream opened.
                fresh = opened.get("status") == last.status and (
                    opened["progress"]["step"] == last.step
                )
                job = opened if fresh else self.read_job()
                opened = {}
                if ended is not None:
                    yield self._batch(rows[: ended + 1], job)
                    return
                yield self._batch(rows, job)
                self.last_id = rows[-1].id
                status = rows[-1].status
                next_beat = monotonic() + self.heartbeat
                if job is None:  # deleted: nothing more will come
                    return
                if more:
                    rows = read_events(self.engine, self.job_id, self.last_id)
                    more = len(rows) == REPLAY_BATCH
                    continue
            now = monotonic()
            if now >= deadline:
                return
            wake_at = min(next_beat, deadline)
            if status == "queued":
                wake_at = min(wake_at, queue_check)
            if self.sub.wait(wake_at - now):
                rows = read_events(self.engine, self.job_id, self.last_id)
                more = len(rows) == REPLAY_BATCH
                continue
            rows = []
            now = monotonic()
            if status == "queued" and now >= queue_check:
                queue_check = now + QUEUE_REFRESH_SECONDS
                if self.hub.queue_version != queue_seen:
                    queue_seen = self.hub.queue_version
                    # Every stream of the process shares one new read of the queue.
                    self.snapshots.moved(queue_seen)
                    job = self.read_job()
                    if job is None:
                        return
                    if job["status"] == "queued":  # else its own event is on the way
                        yield frame("queue", {"job_id": str(self.job_id), "job": job})
                        next_beat = now + self.heartbeat
            if now >= next_beat:
                yield ": keep-alive\n\n"
                next_beat = now + self.heartbeat


def open_stream(
    job_id: uuid.UUID,
    scope: str | None,
    owner: str,
    last_event_id: int | None,
    timeout: float,
    not_found: str,
) -> Response:
    session = get_session()
    try:
        view = load_job(session, job_id, scope)
    except JobNotFound:
        raise Problem(404, not_found) from None
    finally:
        end_reads(session)
    try:
        stream = EventStream(event_hub(current_app), job_id, owner, last_event_id, timeout)
    except TooManyStreams as e:
        raise Problem(429, f"{e}; close some first.", headers={"Retry-After": "30"}) from None
    except ServerBusy as e:
        # Threads stay free for pages and API calls; the job page polls instead.
        raise Problem(503, f"{e}; poll the job instead.", headers={"Retry-After": "5"}) from None
    try:
        rows = stream.first_rows()
    except BaseException:
        stream.close()
        raise
    status = view.job.status.value
    if status in TERMINAL and not rows and last_event_id is not None:
        stream.close()
        return Response(status=204)  # seen to the end: EventSource stops reconnecting
    response = Response(
        stream_with_context(stream.body(rows, status, job_resource(view, services().storage))),
        mimetype="text/event-stream",
    )
    # The generator's own finally does not run if it never started; this always does.
    response.call_on_close(stream.close)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


# --- the API ---------------------------------------------------------------------------------


class StreamQuery(Schema):
    last_event_id = Integer(
        validate=Range(min=0, max=MAX_EVENT_ID),
        metadata={
            "description": "Resume after this event id, when a client cannot send the "
            "Last-Event-ID header; the header wins."
        },
    )
    timeout = Integer(
        load_default=DEFAULT_TIMEOUT_SECONDS,
        validate=Range(min=1, max=MAX_TIMEOUT_SECONDS),
        metadata={
            "description": "Close the stream after this many seconds (reconnect with "
            "Last-Event-ID to go on)."
        },
    )


class StreamHeaders(Schema):
    last_event_id = Integer(
        data_key="Last-Event-ID",
        validate=Range(min=0, max=MAX_EVENT_ID),
        metadata={"description": "The id of the last event received: only later ones are sent."},
    )


STREAM_DESCRIPTION = """\
A `text/event-stream` (server-sent events) of the job's changes, closed after its end.

Events: `status` (queued, running), `progress` (a step), `preview` (a new live preview), and
one of `completed`, `failed`, `canceled`, after which the stream closes; `queue` (without an id)
repeats the job while it waits when jobs ahead of it move, at most every 10 s. Each `data:` is
JSON: `job_id`, and `status`, `progress` {`step`, `total`, `preview_url`} and `at` as of the
event; `job`, the job object of GET /api/v1/jobs/{job_id} as it is when sent (images with URLs
once it succeeded), comes on the newest event of each change, so always on the last one.

`id:` is the event's number: reconnect with `Last-Event-ID` (or `?last_event_id=`) to get
exactly the events after it. The server sends `retry:` first, a `: keep-alive` comment every
DQ_SSE_HEARTBEAT_SECONDS while nothing happens, and closes after `timeout` seconds. A job that
has ended with nothing after Last-Event-ID answers 204.
"""


EVENT_NAMES = ["status", "progress", "preview", *TERMINAL.values(), "queue"]
# One event of the stream, as OpenAPI 3.2 describes the items of text/event-stream: the fields
# of the wire format, with ``data`` a JSON text (see STREAM_DESCRIPTION for what each carries).
EVENT_DATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["job_id"],
    "anyOf": [{"required": ["status", "progress", "at"]}, {"required": ["job"]}],
    "properties": {
        "job_id": {"type": "string", "format": "uuid"},
        "status": {"type": "string", "enum": [s.value for s in JobStatus]},
        "progress": {"$ref": "#/components/schemas/Progress"},
        "at": {"type": ["string", "null"], "format": "date-time"},
        "job": {"$ref": "#/components/schemas/JobOut"},
    },
}
EVENT_ITEM = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": EVENT_NAMES},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": EVENT_DATA,
        },
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "Last-Event-ID."},
    },
}


@api.get("/jobs/<uuid:job_id>/events")
@api.input(StreamQuery, location="query", arg_name="query", unknown=RAISE)
@api.input(StreamHeaders, location="headers", arg_name="headers")
@api.doc(
    summary="Follow a job live (server-sent events)",
    description=STREAM_DESCRIPTION,
    security="BearerAuth",
    responses={
        200: {
            "description": "The event stream.",
            "content": {"text/event-stream": {"itemSchema": EVENT_ITEM}},
        },
        204: "The job has ended and the client has seen its last event.",
        **COMMON_ERRORS,
        404: "No such job, or another owner's.",
        429: f"The caller has {MAX_STREAMS_PER_OWNER} streams open on this server already.",
        503: "The database is down, or this server holds DQ_SSE_MAX_STREAMS streams already "
        "(see Retry-After): poll the job instead.",
    },
)
def job_events_view(job_id: uuid.UUID, query: dict[str, Any], headers: dict[str, Any]) -> Any:
    caller = bearer_caller()
    last_event_id = headers.get("last_event_id", query.get("last_event_id"))
    return open_stream(
        job_id,
        caller.scope,
        caller.owner,
        last_event_id,
        query["timeout"],
        f"There is no job {job_id}.",
    )


# --- the job page ----------------------------------------------------------------------------


def _event_id_from_request() -> int | None:
    value = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) > MAX_EVENT_ID:
        raise Problem(422, "Last-Event-ID must be a whole number of at least 0.")
    return int(value)


@pages.get("/jobs/<uuid:job_id>/events")
def job_events_page(job_id: uuid.UUID) -> Any:
    """The same stream for the job page's EventSource, which cannot send a token: the browser's
    session decides, as for /jobs/<id>.json."""
    caller = page_caller()
    return open_stream(
        job_id,
        caller.scope,
        caller.owner,
        _event_id_from_request(),
        DEFAULT_TIMEOUT_SECONDS,
        NO_SUCH_JOB,
    )
