"""Signed job webhooks, delivered from the database outbox.

A trigger adds a ``webhook_deliveries`` row in the transaction of each job status change that is
a webhook event (:mod:`core.db.events`); the relay (:func:`core.queue.dispatch.relay_once`) hands
due rows to the ``webhooks`` queue, and :func:`~.delivery.deliver` makes one try of one row.

- ``targets``: a target URL taken apart and checked, and the SSRF guard (which hosts and
  addresses are refused, what DNS must answer);
- ``signing``: Standard Webhooks signing: each token's secret, its rotation, the headers of a try;
- ``payload``: the body a delivery sends, built once from the job or batch;
- ``delivery``: one try of one delivery (claim, send to a checked address, record), retries with
  backoff, disabled URLs, and the delivery log users and admins read, with replay.

``delivery`` imports the other three, which import none of their siblings; none of them
imports from this ``__init__``. They may import ``core.runtime``, ``core.db``,
``core.services.jobs`` and ``core.services.model_versions``; never Flask, Celery or torch. This
module re-exports the names that ``web`` imports from the package; ``worker`` and the tests
import the module that defines each name.
"""

from core.services.webhooks.delivery import (
    DeliveryNotFound,
    attempts_of,
    deliveries_of_job,
    failing_endpoints,
    replay,
)
from core.services.webhooks.signing import (
    ROTATION_OVERLAP,
    get_or_create_secret,
    owner_token_id,
    rotate_secret,
)
from core.services.webhooks.targets import (
    EVENTS,
    MAX_URL_LENGTH,
    WEBHOOK_URL_PATTERN,
    validate_target,
)

__all__ = [
    "EVENTS",
    "MAX_URL_LENGTH",
    "ROTATION_OVERLAP",
    "WEBHOOK_URL_PATTERN",
    "DeliveryNotFound",
    "attempts_of",
    "deliveries_of_job",
    "failing_endpoints",
    "get_or_create_secret",
    "owner_token_id",
    "replay",
    "rotate_secret",
    "validate_target",
]
