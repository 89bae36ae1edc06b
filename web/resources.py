"""Jobs, training runs and model versions as the JSON objects the API returns (and the job page
polls). One function per object, so that submit, poll and list all answer the same shape.

Polling is the hot path: a client asks for its job every half second. :func:`load_job` reads a
job in one query built once at import (building a SQLAlchemy statement costs more than running
it): the job and its model's name; the images take a second query once the job has succeeded.
While a job waits or runs, ``core.queue.eta`` adds its queue position under fair share and its
estimated start and finish from the process's view of the queue (``QueueSnapshot``, read again
at most once every DQ_QUEUE_SNAPSHOT_SECONDS): no query of the queue per poll.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

from flask import Flask, has_app_context, request
from sqlalchemy import Enum, Select, Uuid, any_, bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from core.db.models import (
    Image,
    Job,
    JobStatus,
    ModelKind,
    ModelVersion,
    TrainingRun,
    Upload,
    UTCDateTime,
)
from core.queue.eta import UNKNOWN, Estimate, Reader, SnapshotCache, estimate, view_of
from core.runtime.settings import Settings
from core.services.jobs import JobNotFound, size_bounds
from core.services.model_versions import (
    DEFAULT_MODEL_NAME,
    SHIPPED_MODEL_NAME,
    ServingModel,
    serving_of,
    shipped_checkpoint,
    shipped_model,
)
from core.services.uploads import upload_key
from core.storage import Storage
from web.services import services

_jobs, _images, _versions = Job.__table__, Image.__table__, ModelVersion.__table__

# What the job object shows of a job and its model's name. The queue position comes from
# core.queue.eta, by the rule of core.services.jobs.queue_position (tests/web/test_resources.py
# keeps the two in step).
_JOB_COLUMNS = select(
    *(
        _jobs.c[name]
        for name in (
            "id",
            "owner",
            "status",
            "prompt",
            "negative_prompt",
            "steps",
            "guidance",
            "guidance_interval",
            "sampler",
            "seed",
            "width",
            "height",
            "num_images",
            "progress_step",
            "progress_total",
            "preview_key",
            "error",
            "created_at",
            "fair_key",
            "started_at",
            "finished_at",
            "webhook_url",
            "webhook_events",
            "model_version_id",
            "model_pick",
            "worker_host",
            "init_upload_id",
            "mask_upload_id",
            "strength",
        )
    ),
    _versions.c.name.label("model_name"),
).select_from(_jobs.outerjoin(_versions, _jobs.c.model_version_id == _versions.c.id))
_JOBS = _JOB_COLUMNS.where(_jobs.c.id.in_(bindparam("job_ids", expanding=True)))
_IMAGES = (
    select(
        _images.c.job_id, _images.c.storage_key, _images.c.width, _images.c.height, _images.c.seed
    )
    .where(_images.c.job_id.in_(bindparam("job_ids", expanding=True)))
    .order_by(_images.c.job_id, _images.c.index)
)


def _job_rows(connection: Connection, job_ids: Sequence[uuid.UUID]) -> Sequence[Any]:
    """The rows of ``_JOBS`` for these ids. On PostgreSQL the statement goes straight to the
    driver's cursor: SQLAlchemy's handling of a statement and its result (about 0.1 ms) is a
    third of what a poll costs the web process, and a poll is the request a server answers most.
    The values are converted as the columns' types would (:class:`_DriverRows`), and
    tests/web/test_resources.py checks both ways give the same rows."""
    if connection.dialect.name != "postgresql":
        return connection.execute(_JOBS, {"job_ids": list(job_ids)}).all()
    return _DRIVER_ROWS.fetch(connection, list(job_ids))


class _DriverRows:
    """``_JOBS`` compiled once for PostgreSQL, with ``id = ANY(array)`` for the expanding list,
    and rows that look like SQLAlchemy's: named fields; enums as their class; UTC datetimes."""

    def __init__(self, statement: Select[Any]):
        columns = list(statement.selected_columns)
        self.row = namedtuple("JobRow", [c.key for c in columns])  # type: ignore[misc]
        self.enums = [
            (i, c.type.enum_class)
            for i, c in enumerate(columns)
            if isinstance(c.type, Enum) and c.type.enum_class is not None
        ]
        self.datetimes = [i for i, c in enumerate(columns) if isinstance(c.type, UTCDateTime)]
        # One job (a poll) by `id = %(job_id)s`: a UUID costs psycopg less to send than an array
        # of one (its conversion was about a twentieth of the poll's work in the web process).
        self.statements = (
            statement.where(_jobs.c.id == bindparam("job_id", type_=Uuid())),
            statement.where(
                _jobs.c.id == any_(bindparam("job_ids_array", type_=postgresql.ARRAY(Uuid())))
            ),
        )
        self.sql: tuple[str, str] | None = None

    def fetch(self, connection: Connection, job_ids: list[uuid.UUID]) -> list[Any]:
        if self.sql is None:
            one, many = (str(s.compile(dialect=connection.dialect)) for s in self.statements)
            self.sql = (one, many)
        sql, params = (
            (self.sql[0], {"job_id": job_ids[0]})
            if len(job_ids) == 1
            else (self.sql[1], {"job_ids_array": job_ids})
        )
        try:
            cursor = cast(Any, connection.connection.dbapi_connection).cursor()
            cursor.execute(sql, params)
            fetched = cursor.fetchall()
        except connection.dialect.loaded_dbapi.Error:
            # The read again through SQLAlchemy, so that its handling of the failure applies:
            # the error wrapped (DBAPIError), and after a lost connection the pool renewed and
            # the error marked connection_invalidated (web.db reads once more on that).
            return connection.execute(_JOBS, {"job_ids": job_ids}).all()
        rows = []
        for values in fetched:
            values = list(values)
            for i, enum in self.enums:
                if values[i] is not None:
                    values[i] = enum(values[i])
            for i in self.datetimes:
                if values[i] is not None:
                    values[i] = values[i].astimezone(UTC)
            rows.append(self.row._make(values))
        return rows


_DRIVER_ROWS = _DriverRows(_JOB_COLUMNS)


@dataclass(frozen=True)
class JobView:
    """A job as the job object shows it (a row of ``_JOBS``: the job's columns and its model's
    name), the job's images, and its queue position and estimated start and finish."""

    job: Any
    images: Sequence[Any]
    estimate: Estimate = UNKNOWN

    @property
    def model_name(self) -> str:
        return str(self.job.model_name or DEFAULT_MODEL_NAME)

    @property
    def queue_position(self) -> int | None:
        return self.estimate.queue_position


def job_views(
    session: Reader,
    job_ids: Sequence[uuid.UUID],
    *,
    estimates: bool = True,
    snapshots: SnapshotCache | None = None,
) -> list[JobView]:
    """The jobs in the order given (absent ones left out): one query, and one more for the
    images when some of them have succeeded; then, unless ``estimates`` is False, their queue
    positions and estimated times (:func:`with_estimates`)."""
    if not job_ids:
        return []
    # Through the session's connection (or the bare one given): these are table queries, and
    # the ORM's handling of a statement costs more than the query itself.
    connection = session.connection() if isinstance(session, Session) else session
    rows = {row.id: row for row in _job_rows(connection, job_ids)}
    done = [job_id for job_id, row in rows.items() if row.status is JobStatus.SUCCEEDED]
    images: dict[uuid.UUID, list[Any]] = {job_id: [] for job_id in done}
    if done:
        for image in connection.execute(_IMAGES, {"job_ids": done}):
            images[image.job_id].append(image)
    views = [JobView(rows[i], images.get(i, [])) for i in job_ids if i in rows]
    return with_estimates(session, views, snapshots) if estimates else views


def with_estimates(
    session: Reader, views: Sequence[JobView], snapshots: SnapshotCache | None = None
) -> list[JobView]:
    """The views with their queue position and estimated start and finish, from the process's
    view of the queue (at most DQ_QUEUE_SNAPSHOT_SECONDS old): ``snapshots``, else the app's
    (outside an app, the queue is read afresh)."""
    found = estimate(
        session,
        [v.job for v in views],
        max_batch_size=_max_batch_size(),
        snapshot=snapshots or _snapshots(),
    )
    return [replace(v, estimate=found[v.job.id]) for v in views]


def init_app(app: Flask) -> None:
    """A request of this process that may queue, claim or cancel a job (anything but a read)
    renews the process's view of the queue, so that its answer, and the polls after it, see
    the queue as the write left it: a client that submits and then polls finds its job in
    place at once."""

    @app.before_request
    def renew_queue_view() -> None:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            services().queue_snapshots.clear()


def _snapshots() -> SnapshotCache | None:
    """The app's cache of the queue's view; None outside an app (a fresh read each time)."""
    return services().queue_snapshots if has_app_context() else None


# A poll's validator stays the same for at most this long, so that a client answered 304 never
# holds image and preview URLs (signed for an hour) older than this.
ETAG_PERIOD_SECONDS = 1800


def job_etag(session: Reader, view: JobView) -> str:
    """A validator of what a poll would show: the job's state, its place in the queue, and the
    half hour (the signed URLs). Estimated times are left out: they move every second, and a
    client that already has them loses nothing by keeping them until the state changes. Costs
    the job's row (already read) and, while it waits, the process's view of the queue (no
    query while it is fresh)."""
    job = view.job
    place = None
    if job.status is JobStatus.QUEUED and job.fair_key is not None:
        found = view_of(session, _snapshots()).place(job)
        place = None if found is None else found[0]
    parts = (
        job.id,
        job.status.value,
        job.progress_step,
        job.preview_key,
        job.error,
        job.finished_at,
        len(view.images),
        place,
        int(time.time() // ETAG_PERIOD_SECONDS),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def poll_after_seconds(view: JobView) -> int | None:
    """How long a poller should wait before asking again (the Retry-After of a poll): a second
    while it runs (its progress moves every step), longer the further back it waits, and None
    once it has ended (nothing will change)."""
    job = view.job
    if job.status is JobStatus.RUNNING:
        return 1
    if job.status is not JobStatus.QUEUED:
        return None
    ahead = view.queue_position or 0
    return 2 if ahead < 20 else 5 if ahead < 200 else 15


def _max_batch_size() -> int:
    """The app's DQ_MAX_BATCH_SIZE (the workers share its settings); the default outside one."""
    if has_app_context():
        return services().settings.max_batch_size
    return Settings().max_batch_size


def load_job(
    session: Reader, job_id: uuid.UUID, scope: str | None, *, estimates: bool = True
) -> JobView:
    """The job as its owner (or an admin, ``scope=None``) sees it; JobNotFound otherwise, as
    ``core.services.jobs.get_job`` answers."""
    views = job_views(session, [job_id], estimates=estimates)
    if not views or (scope is not None and views[0].job.owner != scope):
        raise JobNotFound(f"no job {job_id}")
    return views[0]


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 with the UTC offset, e.g. 2025-01-31T12:00:00.123456+00:00."""
    return None if moment is None else moment.isoformat()


def job_resource(view: JobView, storage: Storage) -> dict[str, Any]:
    job = view.job
    running = job.status is JobStatus.RUNNING
    return {
        "id": str(job.id),
        "status": job.status.value,
        "progress": {
            "step": job.progress_step,
            "total": job.progress_total,
            "preview_url": storage.url(job.preview_key) if running and job.preview_key else None,
        },
        "queue_position": view.queue_position,
        "queue_position_exact": view.queue_position is None or view.estimate.position_exact,
        "estimated_start": iso(view.estimate.start),
        "estimated_finish": iso(view.estimate.finish),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "params": {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "steps": job.steps,
            "guidance": job.guidance,
            "guidance_interval": list(job.guidance_interval or (0.0, 1.0)),
            "sampler": job.sampler,
            "seed": job.seed,
            "num_images": job.num_images,
            "size": job.width,
            "model": view.model_name,
            "model_pick": job.model_pick,
            "init_image": _upload_ref(job.init_upload_id, storage),
            "mask": _upload_ref(job.mask_upload_id, storage),
            "strength": job.strength,
        },
        "images": [
            {
                "url": storage.url(image.storage_key),
                "width": image.width,
                "height": image.height,
                "seed": image.seed,
            }
            for image in view.images
        ],
        "error": job.error,
        "webhook": job.webhook_url,
        "webhook_events_filter": job.webhook_events,
    }


def _upload_ref(upload_id: uuid.UUID | None, storage: Storage) -> dict[str, str] | None:
    if upload_id is None:
        return None
    return {"id": str(upload_id), "url": storage.url(upload_key(upload_id))}


def upload_resource(upload: Upload, storage: Storage) -> dict[str, Any]:
    return {
        "id": str(upload.id),
        "url": storage.url(upload.storage_key),
        "width": upload.width,
        "height": upload.height,
        "bytes": upload.bytes,
        "created_at": iso(upload.created_at),
    }


def list_versions(session: Session, kind: ModelKind | None = None) -> list[ModelVersion]:
    """Model versions, newest first, of one kind or all."""
    query = select(ModelVersion).order_by(ModelVersion.created_at.desc())
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    return list(session.scalars(query))


def serving_resource(model: ServingModel) -> dict[str, Any]:
    return model.as_dict()


def model_version_resource(version: ModelVersion) -> dict[str, Any]:
    return {
        "id": str(version.id),
        "name": version.name,
        "kind": version.kind.value,
        "is_active": version.is_active,
        "metrics": version.metrics or {},
        "eval": (version.metrics or {}).get("eval"),
        "base_version": ((version.metrics or {}).get("finetune") or {}).get("base_version"),
        "created_at": iso(version.created_at),
        "activated_at": iso(version.activated_at),
        "retired_at": iso(version.retired_at),
        "canary_percent": version.canary_percent or 0,
    }


def servable_model_resource(version: ModelVersion | None, *, active: bool) -> dict[str, Any]:
    """A model a request may name, with its defaults and sizes (None: the shipped model)."""
    model = shipped_model() if version is None else serving_of(version)
    lo, hi = size_bounds(model)
    metrics = (version.metrics or {}) if version is not None else {}
    checkpoint = metrics.get("checkpoint") if version is not None else shipped_checkpoint()
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    found = metrics.get("eval")
    return {
        "name": SHIPPED_MODEL_NAME if version is None else version.name,
        "id": None if version is None else str(version.id),
        "is_active": active,
        "canary_percent": 0 if version is None else version.canary_percent or 0,
        "defaults": model.as_dict()["defaults"],
        "sizes": {"default": model.image_size, "min": lo, "max": hi, "multiple": lo},
        "parameters": _count(checkpoint.get("parameters")),
        "checkpoint_bytes": _count(checkpoint.get("bytes")),
        "eval": found if isinstance(found, dict) else None,
        "created_at": None if version is None else iso(version.created_at),
    }


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def samples_key(run_id: Any) -> str:
    """Where the worker writes a denoiser run's sample grid."""
    return f"runs/{run_id}/samples.png"


def run_resource(
    run: TrainingRun,
    *,
    metrics: dict[str, list[tuple[int, float]]] | None = None,
    samples_url: str | None = None,
    detail: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(run.id),
        "status": run.status.value,
        "kind": run.kind.value,
        "dataset": run.dataset,
        "config": run.config,
        "step": run.step,
        "total_steps": run.total_steps,
        "cancel_requested": run.cancel_requested,
        "created_by": run.created_by,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "error": run.error,
        "model_version_id": str(run.model_version_id) if run.model_version_id else None,
    }
    if detail:
        out["metrics"] = {
            # A diverged run logs NaN or inf, which JSON cannot carry: null stands for them.
            name: [
                {"step": step, "value": value if math.isfinite(value) else None}
                for step, value in series
            ]
            for name, series in (metrics or {}).items()
        }
        out["samples_url"] = samples_url
    return out
