"""Webhooks end to end, with real processes: a ``dq worker --queues webhooks`` and a ``dq reaper``
(the relay) on each topology, delivering to a real HTTP receiver on loopback (allow-listed by
DQ_WEBHOOK_ALLOWED_NETWORKS). Signatures are verified with the ``standardwebhooks`` package.

Jobs get their events cheaply: a queued job is canceled (its ``canceled`` delivery), so no
generation worker runs. Backoff is shortened with DQ_WEBHOOK_BACKOFF_BASE_SECONDS.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from core.db import session_scope
from core.db.models import WebhookAttempt, WebhookDelivery
from core.runtime.settings import Settings
from core.services.jobs import JobRequest, cancel_job, submit_job
from core.services.tokens import create_token
from core.services.webhooks.signing import get_or_create_secret
from core.services.webhooks.targets import validate_target
from tests.core.test_webhooks import Receiver
from tests.worker.conftest import Stack

ALLOW = {"DQ_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", "DQ_WEBHOOK_BACKOFF_BASE_SECONDS": "0.2"}


def _start(stack: Stack) -> tuple[Settings, int]:
    stack.env.update(ALLOW)
    stack.start_worker(queues="webhooks")
    stack.start_reaper(interval=0.3)
    with session_scope(stack.engine) as s:
        token, _ = create_token(s, "user", "hooks")
        token_id = token.id
    return Settings.from_env(stack.env), token_id


def _canceled_job(stack: Stack, settings: Settings, token_id: int, url: str) -> uuid.UUID:
    """Submit a job with a webhook as the API does, then cancel it while it is queued."""
    with session_scope(stack.engine) as s:
        target = validate_target(url, ["canceled"], settings)
        job, _ = submit_job(
            s, JobRequest(prompt="a red circle"), f"token:{token_id}", settings, webhook=target
        )
        cancel_job(s, job)
        return job.id


def _deliveries(stack: Stack, job_id: uuid.UUID) -> list[WebhookDelivery]:
    with Session(stack.engine) as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))


def test_a_receiver_down_for_three_tries_gets_one_signed_delivery(stack: Stack) -> None:
    receiver = Receiver([503, 503, 503])
    try:
        settings, token_id = _start(stack)
        job_id = _canceled_job(stack, settings, token_id, receiver.url)
        stack.wait_until(
            lambda: [d.state for d in _deliveries(stack, job_id)] == ["delivered"],
            timeout=30,
            what="the delivery",
        )
        (delivery,) = _deliveries(stack, job_id)
        assert delivery.attempts == 4 and delivery.last_status_code == 200
        assert len(receiver.requests) == 4
        assert {h["webhook-id"] for h, _ in receiver.requests} == {delivery.message_id}
        assert len({body for _, body in receiver.requests}) == 1
        with session_scope(stack.engine) as s:
            key = get_or_create_secret(s, token_id).key
            codes = s.scalars(
                select(WebhookAttempt.status_code)
                .where(WebhookAttempt.delivery_id == delivery.id)
                .order_by(WebhookAttempt.attempt)
            ).all()
        assert codes == [503, 503, 503, 200]
        headers, body = receiver.requests[-1]
        payload = Webhook(key).verify(body, headers)
        assert payload["type"] == "job.canceled" and payload["data"]["id"] == str(job_id)
    finally:
        receiver.close()


def test_410_disables_the_url_and_a_redirect_is_a_failure(embedded_stack: Stack) -> None:
    stack = embedded_stack
    gone, moving, target = Receiver([410]), Receiver([302] * 100), Receiver([])
    moving.location = target.url
    try:
        settings, token_id = _start(stack)
        first = _canceled_job(stack, settings, token_id, gone.url)
        redirected = _canceled_job(stack, settings, token_id, moving.url)
        stack.wait_until(
            lambda: [d.state for d in _deliveries(stack, first)] == ["disabled"],
            timeout=30,
            what="the 410",
        )
        later = _canceled_job(stack, settings, token_id, gone.url)
        stack.wait_until(
            lambda: [d.state for d in _deliveries(stack, later)] == ["disabled"],
            timeout=30,
            what="the later delivery disabled",
        )
        stack.wait_until(lambda: len(moving.requests) >= 2, timeout=30, what="two redirects")
        assert len(gone.requests) == 1  # nothing after the 410
        (tried,) = _deliveries(stack, redirected)
        assert tried.state == "pending" and tried.last_status_code == 302
        assert "redirect" in (tried.last_error or "") and target.requests == []
    finally:
        for r in (gone, moving, target):
            r.close()
