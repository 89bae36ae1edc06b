"""The webhook task's body: one try of one delivery
(:func:`core.services.webhooks.delivery.deliver`), under the watchdog. A ``webhooks`` worker loads
no model: it needs only the settings and the engine."""

from __future__ import annotations

import logging

from core.services.webhooks.delivery import CLAIM_SECONDS, deliver
from worker.context import get_context

log = logging.getLogger(__name__)


def run_delivery(delivery_id: int) -> None:
    context = get_context()
    # A try that outlives its claim could be overtaken by another worker's; the watchdog ends
    # the process first (its try is then fenced out, and the row comes due again).
    context.watchdog.begin(f"webhook delivery {delivery_id}", CLAIM_SECONDS - 5, lambda: None)
    try:
        outcome = deliver(context.engine, delivery_id, context.settings)
    finally:
        context.watchdog.end()
    if outcome.state != "skipped":
        log.info(
            "webhook delivery %d try %d: %s (%s)",
            delivery_id,
            outcome.attempt,
            outcome.state,
            outcome.status_code or outcome.error,
        )
