"""Submitting work: record it, commit, then hand its message to the broker.

The order is the guarantee. The job (or training run) is committed first; only then is its task
message published (:func:`core.queue.dispatch.publish_job`). So:

- the database is down: the commit fails, nothing is written, the caller gets 503;
- the broker is down: the row is committed but unpublished, which makes it an outbox entry that
  the relay (``dq reaper``) publishes once the broker is back. The submission has succeeded and
  is durable, so the caller gets 202 like any other; the failure is logged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, request
from sqlalchemy.orm import Session

from core.db.models import Job, TrainingRun
from core.queue.dispatch import publish_job, publish_run
from core.services.jobs import JobRequest, WebhookTarget, submit_job
from core.services.training_runs import submit_training_run
from web.resources import JobView, job_views
from web.services import services

log = logging.getLogger(__name__)


def image_body_limit(max_upload_bytes: int) -> int:
    """The body limit of a request that may carry images (a job's or batch's inline init image
    and mask, an upload, the generate form): two of DQ_MAX_UPLOAD_BYTES as base64, and the
    app's limit for the rest of the request."""
    rest = int(current_app.config.get("MAX_CONTENT_LENGTH") or 0)
    return 2 * (4 * (max_upload_bytes + 2) // 3) + rest


# Endpoints whose body may carry images: the generate form, a job, a batch, an upload.
IMAGE_BODY_ENDPOINTS = frozenset(
    ("pages.index", "api.submit_job_view", "api.submit_batch_view", "api.create_upload_view")
)


def init_app(app: Flask) -> None:
    """Lift the body limit of the endpoints that take images, before anything reads a body
    (the CSRF check reads the form's)."""

    @app.before_request
    def allow_image_bodies() -> None:
        if request.endpoint in IMAGE_BODY_ENDPOINTS and request.method == "POST":
            request.max_content_length = image_body_limit(services().settings.max_upload_bytes)


def _publish(what: str, send: Callable[[], bool]) -> None:
    try:
        send()
    except Exception as e:  # the broker: its client raises many kinds of errors
        log.warning("%s is committed but not yet published (the relay will send it): %s", what, e)


def submit_and_publish(
    session: Session,
    request: JobRequest,
    owner: str,
    idempotency_key: str | None = None,
    webhook: WebhookTarget | None = None,
) -> tuple[Job, JobView]:
    """``core.services.jobs.submit_job``, committed, then published. Returns the job, and the job
    as the API shows it, read in the same transaction (on SQLite, each one takes the write lock).

    JobRequestError and IdempotencyConflict propagate with nothing written.
    """
    svc = services()
    try:
        job, _created = submit_job(
            session,
            request,
            owner,
            svc.settings,
            idempotency_key,
            webhook=webhook,
            storage=svc.storage,
        )
        (view,) = job_views(session, [job.id])
        session.commit()
    except Exception:
        session.rollback()
        raise
    # A replay of an idempotent request publishes too, in case the first try never got its
    # message out; publish_job sends only while the job is queued and unpublished.
    _publish(f"job {job.id}", lambda: publish_job(svc.engine, svc.publisher, job.id))
    return job, view


def start_training_run(
    session: Session,
    *,
    kind: Any,
    dataset: Any,
    config: Any,
    created_by: str,
    autoencoder_version_id: uuid.UUID | None = None,
    activate: bool = False,
    base_version: str | None = None,
    freeze_text_encoder: bool = False,
) -> TrainingRun:
    """``core.services.training_runs.submit_training_run``, committed, then published.

    TrainingRequestError propagates with nothing written.
    """
    svc = services()
    try:
        run = submit_training_run(
            session,
            svc.settings,
            kind=kind,
            dataset=dataset,
            config=config,
            created_by=created_by,
            autoencoder_version_id=autoencoder_version_id,
            activate=activate,
            base_version=base_version,
            freeze_text_encoder=freeze_text_encoder,
        )
        session.commit()
    except Exception:
        session.rollback()
        raise
    _publish(f"training run {run.id}", lambda: publish_run(svc.engine, svc.publisher, run.id))
    return run
