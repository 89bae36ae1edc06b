"""The tasks, thin: parse the id, then claim, call core, record (``worker.generation`` and
``worker.training``). They are shared tasks, bound to whichever app the worker runs
(``worker.app``), so importing this module builds no Celery app."""

from __future__ import annotations

import logging
import uuid

from celery import shared_task

from core.queue.dispatch import TASK_DELIVER_WEBHOOK, TASK_GENERATE, TASK_TRAIN

log = logging.getLogger("worker")


def _parse_id(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        log.error("message with a malformed id %r acknowledged and dropped", value)
        return None


@shared_task(name=TASK_GENERATE, ignore_result=True)
def generate(job_id: str) -> None:
    """Run one generation job, and any compatible queued jobs with it."""
    from worker.context import get_context
    from worker.generation import run_generation

    parsed = _parse_id(job_id)
    if parsed is not None:
        run_generation(get_context(), parsed)


@shared_task(name=TASK_TRAIN, ignore_result=True)
def train(run_id: str) -> None:
    """Run (or resume) one training run."""
    from worker.context import get_context
    from worker.training import run_training

    parsed = _parse_id(run_id)
    if parsed is not None:
        run_training(get_context(), parsed)


@shared_task(name=TASK_DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(delivery_id: int) -> None:
    """One try of one webhook delivery (queue ``webhooks``); a duplicate message does nothing."""
    from worker.webhooks import run_delivery

    if isinstance(delivery_id, bool) or not isinstance(delivery_id, int):
        log.error("message with a malformed delivery id %r acknowledged and dropped", delivery_id)
        return
    run_delivery(delivery_id)
