"""The body of a webhook: the job (or batch) as the event left it, as compact JSON.

Built once, on a delivery's first try, and stored with the delivery, so every retry sends the
same bytes.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import Batch, Image, Job, ModelVersion, WebhookDelivery
from core.services.model_versions import DEFAULT_MODEL_NAME


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def job_data(session: Session, job: Job) -> dict[str, Any]:
    """The job as a webhook shows it: what the API's job object says, with image object keys
    instead of presigned URLs (those expire before the last retry; GET the job for fresh ones)."""
    model = DEFAULT_MODEL_NAME
    if job.model_version_id is not None:
        model = session.scalar(
            select(ModelVersion.name).where(ModelVersion.id == job.model_version_id)
        ) or str(job.model_version_id)
    images = session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index))
    return {
        "object": "job",
        "id": str(job.id),
        "status": job.status.value,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "params": {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "steps": job.steps,
            "guidance": job.guidance,
            "sampler": job.sampler,
            "seed": job.seed,
            "num_images": job.num_images,
            "size": job.width,
            "model": model,
        },
        "images": [
            {"key": i.storage_key, "width": i.width, "height": i.height, "seed": i.seed}
            for i in images
        ],
        "error": job.error,
        "batch_id": str(job.batch_id) if job.batch_id else None,
    }


def batch_data(session: Session, batch: Batch) -> dict[str, Any]:
    jobs = session.execute(
        select(Job.id, Job.status).where(Job.batch_id == batch.id).order_by(Job.created_at, Job.id)
    ).all()
    return {
        "object": "batch",
        "id": str(batch.id),
        "size": batch.size,
        "created_at": _iso(batch.created_at),
        "finished_at": _iso(batch.finished_at),
        "jobs": [{"id": str(job_id), "status": status.value} for job_id, status in jobs],
    }


def build_payload(session: Session, delivery: WebhookDelivery) -> str:
    """``{"type": "job.completed", "timestamp": <the event>, "data": {...}}`` as compact JSON
    (Standard Webhooks' recommended shape; ``type`` is the object and the event)."""
    if delivery.job_id is not None:
        job = session.get(Job, delivery.job_id)
        data = job_data(session, job) if job is not None else {"object": "job"}
        kind = "job"
    else:
        batch = session.get(Batch, delivery.batch_id) if delivery.batch_id else None
        data = batch_data(session, batch) if batch is not None else {"object": "batch"}
        kind = "batch"
    body = {
        "type": f"{kind}.{delivery.event}",
        "timestamp": _iso(delivery.created_at),
        "data": data,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
