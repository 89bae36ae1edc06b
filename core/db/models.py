"""The schema: generation jobs and their images, training runs and their metrics, model
versions and API tokens.

The database is the source of truth for every job and run, not Celery's result backend. Status
columns change only through :mod:`core.db.transitions`. A queued job or run whose
``published_at`` is NULL is the outbox: its task message is still to be sent
(:mod:`core.queue.dispatch`).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps the zone (timestamptz); SQLite keeps naive text. Values are converted to UTC
    on the way in and marked UTC on the way out, so comparisons and arithmetic never mix naive and
    aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use core.db.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# 64-bit ids on PostgreSQL; SQLite's rowid alias must be spelled INTEGER to autoincrement.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Constraint names are fixed by convention, so that migrations can name what they drop.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class ModelKind(enum.StrEnum):
    AUTOENCODER = "autoencoder"
    DENOISER = "denoiser"


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR plus a CHECK constraint rather than a PostgreSQL ENUM type: adding a value
    # later is a plain migration on both backends.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda c: [m.value for m in c],
    )


class LeasedWork:
    """The lease lifecycle shared by generation jobs and training runs (columns only).

    A worker claims a queued row by raising ``attempts`` by one: that number is the claim's
    fencing token. Every later write of that worker names it in its ``WHERE`` clause
    (``core.db.transitions``), so a worker that stalled past its lease and lost the row to another
    cannot write to it again. Lease and deadline times come from the database's clock.
    """

    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Renewed by the worker's heartbeat; a running row past it is re-queued by the reaper.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The claim's time limit (DQ_JOB_TIME_LIMIT_SECONDS / DQ_TRAIN_TIME_LIMIT_SECONDS): the
    # heartbeat stops renewing past it, and the reaper ends the row.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the task message was last handed to the broker (None: not yet, or lost).
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    # Claims so far; the current claim's fencing token.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    error: Mapped[str | None] = mapped_column(Text)


class Job(LeasedWork, Base):
    """One generation request: a prompt, its parameters, and where it stands."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.QUEUED, index=True
    )
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    # [lo, hi]: guidance applies at noise levels t/(T−1) in it (None: every step).
    guidance_interval: Mapped[list[float] | None] = mapped_column(JSON(none_as_null=True))
    sampler: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(BigInteger)  # the first image's; image i uses seed + i
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    num_images: Mapped[int] = mapped_column(Integer)
    # None means the default model shipped with the code.
    model_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True
    )
    # How the version was picked: "named" (the request named it), "default" (the active one,
    # or the shipped model), "canary" (a default request sent to the canary); None before 0009.
    model_pick: Mapped[str | None] = mapped_column(String(16))
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    preview_key: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Its start tag in the fair order (core.queue.fairness), set by a trigger as it is queued.
    fair_key: Mapped[float | None] = mapped_column(Float)
    # "token:<id>" for API callers, "session:<random>" for anonymous form users.
    owner: Mapped[str] = mapped_column(String(80), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the canonical request, so a reused idempotency key with another body is refused.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Where to send signed webhooks, and which events (start, completed, failed, canceled;
    # None: all). A trigger writes a webhook_deliveries row in the same transaction as each
    # status change that is one of them (core.db.events).
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("batches.id", ondelete="SET NULL"), index=True
    )
    # Image editing: the upload it starts from (image-to-image), the mask of what to repaint
    # (inpainting) and how much of the schedule it runs; None for text-to-image. No foreign
    # keys: an upload is deleted only when no job names it (core.upkeep.retention).
    init_upload_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    mask_upload_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    strength: Mapped[float | None] = mapped_column(Float)

    images: Mapped[list[Image]] = relationship(
        back_populates="job", order_by="Image.index", cascade="all, delete-orphan"
    )
    model_version: Mapped[ModelVersion | None] = relationship()

    __table_args__ = (
        # Idempotency keys are unique per caller: two clients may pick the same key.
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        # Queue position (queued jobs created before this one) and the batch search.
        Index("ix_jobs_status_created_at", "status", "created_at"),
        # The relay's counts and batches of queued rows by when they were published.
        Index("ix_jobs_status_published_at", "status", "published_at"),
        # The latency histogram of /metrics (the last N succeeded jobs) and retention.
        Index("ix_jobs_status_finished_at", "status", "finished_at"),
        # The fair order of the queue (core.queue.fairness): its head, a claim, and a queue
        # position counted up to a bound are range scans of the queued rows alone.
        Index(
            "ix_jobs_queued_fair",
            "fair_key",
            "created_at",
            "id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        # A caller's active jobs (the per-caller cap) and its pages of jobs by status.
        Index("ix_jobs_owner_status_created_at", "owner", "status", "created_at"),
        # Filling a batch: the queued jobs of one kind, in fair order.
        Index(
            "ix_jobs_queued_kind",
            "model_version_id",
            "sampler",
            "steps",
            "width",
            "height",
            "fair_key",
            "created_at",
            "id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
    )

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


class Upload(Base):
    """An image a caller sent to edit (an init image or a mask), re-encoded as a bare PNG and
    stored under ``uploads/<id>.png``. It belongs to its owner; retention and ``dq prune``
    delete it once it is past DQ_RETENTION and no job names it."""

    __tablename__ = "uploads"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(80), index=True)
    storage_key: Mapped[str] = mapped_column(String(512))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Image(Base):
    """One PNG of a finished job, stored under ``images/<job>/<index>.png``."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)

    job: Mapped[Job] = relationship(back_populates="images")

    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_images_job_id_index"),)


class ModelVersion(Base):
    """A trained checkpoint that workers can serve; at most one is active per kind."""

    __tablename__ = "model_versions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[ModelKind] = mapped_column(_enum(ModelKind, "model_kind"))
    # Object-storage prefix holding model.json and model.safetensors (or autoencoder.*).
    checkpoint_key: Mapped[str] = mapped_column(String(512))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A retired version serves no new job and cannot be activated; its files and jobs stay.
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The canary: this share (1-100) of the jobs that ask for "default" run on this version
    # instead of the active one (core.services.model_versions); 0 for every other version.
    canary_percent: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    __table_args__ = (
        # A partial unique index: any number of inactive versions, one active one per kind.
        Index(
            "uq_model_versions_active_kind",
            "kind",
            unique=True,
            sqlite_where=text("is_active"),
            postgresql_where=text("is_active"),
        ),
        # And at most one canary per kind.
        Index(
            "uq_model_versions_canary_kind",
            "kind",
            unique=True,
            sqlite_where=text("canary_percent > 0"),
            postgresql_where=text("canary_percent > 0"),
        ),
    )


class TrainingRun(LeasedWork, Base):
    """An admin's request to train an autoencoder or a denoiser, and its outcome."""

    __tablename__ = "training_runs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "run_status"), default=JobStatus.QUEUED, index=True
    )
    kind: Mapped[ModelKind] = mapped_column(_enum(ModelKind, "run_kind"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # {"kind": "shapes", ...options} | {"kind": "s3", "prefix": ...} | {"kind": "path", ...}
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A denoiser is trained on the latents of this autoencoder version.
    autoencoder_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT")
    )
    created_by: Mapped[str] = mapped_column(String(80))
    checkpoint_keys: Mapped[list[str]] = mapped_column(JSON, default=list)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    model_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )

    model_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[model_version_id])
    metric_rows: Mapped[list[TrainingMetric]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="TrainingMetric.step"
    )

    __table_args__ = (Index("ix_training_runs_status_published_at", "status", "published_at"),)


class TrainingMetric(Base):
    """One value of one metric at one step of a training run (loss, lr, samples/s …)."""

    __tablename__ = "training_metrics"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)

    run: Mapped[TrainingRun] = relationship(back_populates="metric_rows")

    __table_args__ = (Index("ix_training_metrics_run_name_step", "run_id", "name", "step"),)


class ApiToken(Base):
    """A bearer token for the REST API. Only the SHA-256 of the token is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "token_role"))
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Fair share: this token's jobs get this many turns per round of the queue (admin-set).
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default=text("1.0"))


class AuditEvent(Base):
    """One admin action: who did what to which thing, and when (``core.services.audit``)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # "token:<id>" for an admin (by API token or browser login), "cli" or "reaper" for commands.
    actor: Mapped[str] = mapped_column(String(80), index=True)
    # sign_in, sign_out, model.activate, run.create, run.cancel, token.create, token.revoke, prune
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    request_id: Mapped[str | None] = mapped_column(String(64))
    client: Mapped[str | None] = mapped_column(String(64))


class AdminSession(Base):
    """A browser's admin sign-in. The cookie holds a random secret; this row holds its SHA-256.
    Signing out, or revoking the token it signed in with, ends the session at once."""

    __tablename__ = "admin_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 hex of the secret
    token_id: Mapped[int] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    client: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str] = mapped_column(String(200), default="")


class FairOwner(Base):
    """Each owner's place in the fair order (``core.queue.fairness``): the start tag its last
    queued job got, and where its next one starts. Written by the trigger that keys new jobs
    (``core.db.fair_keys``)."""

    __tablename__ = "fair_owners"

    owner: Mapped[str] = mapped_column(String(80), primary_key=True)
    last_start: Mapped[float] = mapped_column(Float, index=True)
    next_start: Mapped[float] = mapped_column(Float)
    weight: Mapped[float] = mapped_column(Float, default=1.0)


class StatusCount(Base):
    """Rows per status of ``jobs`` and ``training_runs``, so that /metrics reads a few rows
    instead of counting whole tables (``core.db.counts``)."""

    __tablename__ = "status_counts"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # "job" or "run"
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class StatusCountDelta(Base):
    """+1 / −1 per status change, appended by database triggers and folded into
    :class:`StatusCount` by the reaper. Appending never waits on a lock that another
    transaction holds, as updating one counter row would."""

    __tablename__ = "status_count_deltas"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    delta: Mapped[int] = mapped_column(Integer)


class Batch(Base):
    """Several jobs from one request: a list of prompts or a prompt matrix, shared settings."""

    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(80), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # The request as given (prompts or matrix, shared settings, base seed), for the API.
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # When every job of the batch had ended (the batch's own "completed" webhook).
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_batches_owner_idempotency_key"),
        # The reaper's pass looks for batches still running; finished ones are most of the table.
        Index(
            "ix_batches_unfinished",
            "created_at",
            sqlite_where=text("finished_at IS NULL"),
            postgresql_where=text("finished_at IS NULL"),
        ),
    )


class JobEvent(Base):
    """What happened to a job, in order: appended by triggers on ``jobs`` (core.db.events) on
    insert, on every status change, progress step and new preview. Live push (SSE) streams them
    by id, so a client resuming with Last-Event-ID misses none."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # status, progress, preview
    status: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, server_default=func.now())

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class WebhookDelivery(Base):
    """One logical webhook message (the outbox): written by a trigger in the transaction of the
    status change it reports, sent by the ``webhooks`` queue with retries until delivered, given
    up, or its URL disabled. ``message_id`` is the ``webhook-id`` header, the same on every try."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(80), unique=True)
    owner: Mapped[str] = mapped_column(String(80), index=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[str] = mapped_column(String(16))  # start, completed, failed, canceled
    url: Mapped[str] = mapped_column(String(2048))
    # The body as first sent; every retry sends the same bytes. None until the first try.
    payload: Mapped[str | None] = mapped_column(Text)
    # pending, delivered, failed (gave up), disabled (the URL answered 410)
    state: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )
    # When the task message was handed to the broker (None: still to send; the relay sends it).
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),)


class WebhookAttempt(Base):
    """One try of a delivery: what the receiver answered, how fast (the delivery log)."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class WebhookSecret(Base):
    """A token's signing key (``whsec_…``). During a rotation the previous key also signs, until
    ``previous_until``, so receivers can switch over."""

    __tablename__ = "webhook_secrets"

    token_id: Mapped[int] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(128))
    previous_key: Mapped[str | None] = mapped_column(String(128))
    previous_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DisabledWebhookUrl(Base):
    """A URL that answered 410 Gone: no more deliveries to it for this owner."""

    __tablename__ = "disabled_webhook_urls"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(80))
    url_sha256: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    disabled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("owner", "url_sha256", name="uq_disabled_webhook_urls_owner_url"),
    )


class ThroughputSample(Base):
    """Measured speed per kind of batch, a moving average: seconds per image per denoising step
    for a model, sampler, steps and batch size (honest ETAs)."""

    __tablename__ = "throughput_samples"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)  # version id or "default"
    sampler: Mapped[str] = mapped_column(String(32), primary_key=True)
    steps: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_size: Mapped[int] = mapped_column(Integer, primary_key=True)
    seconds_per_image_step: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkerPresence(Base):
    """A generation worker that said it was alive at ``last_seen`` (ETAs divide by live ones)."""

    __tablename__ = "worker_presence"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(100), default="")
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What it serves: "fp32", "bf16" or "fp16", and the model versions it holds in memory
    # (a list of version ids, null for the shipped default), most recently used last.
    precision: Mapped[str | None] = mapped_column(String(8))
    models: Mapped[list[str | None] | None] = mapped_column(JSON)
