"""Webhook targets, signatures, backoff and one try of a delivery against a real HTTP receiver.

Signatures are checked with the ``standardwebhooks`` package's own ``verify``, not our code.
"""

from __future__ import annotations

import random
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from standardwebhooks import Webhook, WebhookVerificationError

from core.db import ApiToken, Job, JobStatus, Role, session_scope, utcnow
from core.db.models import DisabledWebhookUrl, WebhookAttempt, WebhookDelivery
from core.runtime.settings import Settings
from core.services.jobs import JobRequestError
from core.services.webhooks.delivery import BACKOFF_CAP_SECONDS, backoff, deliver, replay
from core.services.webhooks.signing import (
    get_or_create_secret,
    new_secret,
    rotate_secret,
    sign,
    signing_keys,
)
from core.services.webhooks.targets import WEBHOOK_URL_PATTERN, validate_target
from tests.core.test_db import new_job

OPEN = Settings.from_env({}, webhook_allowed_networks="127.0.0.0/8")
STRICT = Settings.from_env({})


def public(host: str, port: int) -> list[str]:
    """DNS as the internet would answer for a public name (the test machine has no DNS)."""
    return ["93.184.215.14"]


def answers(*addresses: str) -> Any:
    return lambda host, port: list(addresses)


# --- targets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://127.0.0.1/hook", "loopback"),
        ("https://localhost/hook", "loopback"),  # resolved by /etc/hosts, a single label
        ("https://[::1]/hook", "loopback"),
        ("https://10.1.2.3/hook", "private"),
        ("https://192.168.0.9:8443/x", "private"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://[::ffff:10.0.0.1]/", "private"),
    ],
)
def test_loopback_private_and_metadata_targets_are_refused(url: str, why: str) -> None:
    with pytest.raises(JobRequestError) as e:
        validate_target(url, None, STRICT)
    assert e.value.field == "webhook"


@pytest.mark.parametrize(
    "address", ["10.0.0.7", "127.0.0.1", "169.254.169.254", "fd00:ec2::254", "100.64.1.1"]
)
def test_a_name_resolving_to_any_internal_address_is_refused(address: str) -> None:
    with pytest.raises(JobRequestError, match="resolves to"):
        validate_target(
            "https://hooks.example.com/x", None, STRICT, resolver=answers("93.184.215.14", address)
        )


def test_allow_listed_networks_may_be_targets_even_over_http() -> None:
    target = validate_target("http://127.0.0.1:8080/hook", ["completed"], OPEN)
    assert target.url == "http://127.0.0.1:8080/hook" and target.events == ("completed",)
    with pytest.raises(JobRequestError, match="private"):
        validate_target("http://10.0.0.1/hook", None, OPEN)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://hooks.example.com/x", "https"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("ftp://hooks.example.com/x", "absolute https URL"),
        ("https://hooks.example.com/x#frag", "absolute https URL"),
        ("https://hooks.example.com/" + "a" * 2048, "limit is 2048"),
        ("https://93.184.215.14/x", "dotted DNS name"),
        ("https://hooks.example.com:0/x", "absolute https URL"),
        ("https://hooks.example.com/\n", "absolute https URL"),
    ],
)
def test_malformed_or_insecure_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(JobRequestError, match=message):
        validate_target(url, None, STRICT, resolver=public)


def test_plain_http_anywhere_only_when_the_setting_allows_it() -> None:
    allow = Settings.from_env({}, webhook_allow_http=True)
    assert validate_target("http://hooks.example.com/x", None, allow, resolver=public)


def test_a_public_name_passes_and_one_that_does_not_resolve_is_checked_at_each_try() -> None:
    assert validate_target("https://hooks.example.com/x?a=1", None, STRICT, resolver=public)
    # The test machine resolves no public name: accepted now, resolved again at every try.
    assert validate_target("https://no-such-host.invalid/x", None, STRICT)


def test_events_filter_is_a_nonempty_subset_in_a_fixed_order() -> None:
    got = validate_target("https://a.example.com/", ["failed", "start"], STRICT, resolver=public)
    assert got.events == ("start", "failed")
    for bad in ([], ["done"], "start"):
        with pytest.raises(JobRequestError) as e:
            validate_target("https://a.example.com/", bad, STRICT, resolver=public)
        assert e.value.field == "webhook_events_filter"


def test_the_documented_pattern_is_what_a_server_without_settings_accepts() -> None:
    pattern = re.compile(WEBHOOK_URL_PATTERN)
    for url in ("https://a.example.com/x", "https://a.example.com:8443/p/q?x=%20&y=@"):
        assert pattern.match(url) and validate_target(url, None, STRICT, resolver=public)
    for url in ("http://a.example.com/", "https://1.2.3.4/", "https://host/", "https://a.b.c/#x"):
        assert not pattern.match(url)
        with pytest.raises(JobRequestError):
            validate_target(url, None, STRICT, resolver=public)


# --- signatures and backoff -----------------------------------------------------------------


def test_secrets_are_whsec_keys_of_32_random_bytes() -> None:
    key = new_secret()
    assert key.startswith("whsec_") and key != new_secret()
    import base64

    assert len(base64.b64decode(key.removeprefix("whsec_"))) == 32


def test_a_signature_verifies_with_the_standardwebhooks_package() -> None:
    key, body = new_secret(), '{"type":"job.completed"}'
    headers = sign("msg_1", utcnow(), body, [key])
    assert Webhook(key).verify(body, headers) == {"type": "job.completed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(key).verify(body + " ", headers)


def test_during_a_rotation_both_keys_sign_and_each_verifies() -> None:
    old, new, body = new_secret(), new_secret(), "{}"
    headers = sign("msg_2", utcnow(), body, [new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for key in (old, new):
        Webhook(key).verify(body, headers)


def test_backoff_is_full_jitter_under_a_doubling_ceiling_and_a_cap() -> None:
    rng = random.Random(1)
    for attempt in range(1, 30):
        ceiling = min(BACKOFF_CAP_SECONDS, 5.0 * 2 ** (attempt - 1))
        draws = [backoff(attempt, base=5.0, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.8 * ceiling and min(draws) < 0.2 * ceiling  # spread, not fixed


# --- one try, against a real receiver -----------------------------------------------------------


class Receiver:
    """An HTTP receiver on loopback that answers the given codes in turn, then 200."""

    def __init__(self, codes: list[int], location: str | None = None):
        self.codes = list(codes)
        self.location = location
        self.requests: list[tuple[dict[str, str], str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                receiver.requests.append((dict(self.headers.items()), body))
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_id(engine: Engine) -> int:
    with session_scope(engine) as s:
        token = ApiToken(token_hash=uuid.uuid4().hex * 2, role=Role.USER, label="t")
        s.add(token)
        s.flush()
        return token.id


def _delivery(engine: Engine, owner: str, url: str) -> int:
    """A job with a webhook, canceled: the trigger writes its delivery."""
    with session_scope(engine) as s:
        job = new_job(owner=owner, webhook_url=url)
        s.add(job)
        s.flush()
        s.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.CANCELED))
        found = s.scalar(select(WebhookDelivery.id).where(WebhookDelivery.job_id == job.id))
        assert found is not None
        return found


def _make_due(engine: Engine, delivery_id: int) -> None:
    with session_scope(engine) as s:
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(codes: list[int], location: str | None = None) -> Receiver:
        made.append(Receiver(codes, location))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_receiver_down_three_times_gets_one_logical_delivery(
    engine: Engine, token_id: int, receiver_factory: Any
) -> None:
    receiver = receiver_factory([503, 503, 503])
    delivery_id = _delivery(engine, f"token:{token_id}", receiver.url)
    states = []
    for _ in range(4):
        _make_due(engine, delivery_id)
        states.append(deliver(engine, delivery_id, OPEN).state)
    assert states == ["pending", "pending", "pending", "delivered"]
    # Not due again: a duplicate message does nothing.
    assert deliver(engine, delivery_id, OPEN).state == "skipped"
    assert len(receiver.requests) == 4
    with Session(engine) as s:
        key = get_or_create_secret(s, token_id).key
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None and row.state == "delivered" and row.attempts == 4
        log = s.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id))
        assert [(a.attempt, a.status_code) for a in log] == [(1, 503), (2, 503), (3, 503), (4, 200)]
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    bodies = {body for _, body in receiver.requests}
    assert len(ids) == 1 and len(bodies) == 1  # the same message, byte for byte
    headers, body = receiver.requests[-1]
    payload = Webhook(key).verify(body, headers)
    assert payload["type"] == "job.canceled" and payload["data"]["status"] == "canceled"


def test_a_failed_try_waits_out_its_backoff(engine: Engine, token_id: int, receiver_factory: Any):
    receiver = receiver_factory([500])
    delivery_id = _delivery(engine, f"token:{token_id}", receiver.url)
    before = utcnow()
    assert deliver(engine, delivery_id, OPEN).state == "pending"
    with Session(engine) as s:
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None and row.published_at is None  # the relay sends it again
        assert before <= row.next_attempt_at <= utcnow() + timedelta(seconds=5.1)


def test_a_redirect_is_a_failure_and_is_not_followed(
    engine: Engine, token_id: int, receiver_factory: Any
) -> None:
    target = receiver_factory([])
    receiver = receiver_factory([302], location=target.url)
    delivery_id = _delivery(engine, f"token:{token_id}", receiver.url)
    outcome = deliver(engine, delivery_id, OPEN)
    assert (outcome.state, outcome.status_code) == ("pending", 302)
    assert "redirect" in (outcome.error or "") and target.requests == []


def test_410_disables_the_url_for_the_owner_and_its_other_deliveries(
    engine: Engine, token_id: int, receiver_factory: Any
) -> None:
    receiver = receiver_factory([410])
    owner = f"token:{token_id}"
    first, second = (_delivery(engine, owner, receiver.url) for _ in range(2))
    assert deliver(engine, first, OPEN).state == "disabled"
    with Session(engine) as s:
        assert s.get(WebhookDelivery, second).state == "disabled"  # type: ignore[union-attr]
        assert s.scalars(select(DisabledWebhookUrl.url)).all() == [receiver.url]
    later = _delivery(engine, owner, receiver.url)
    assert deliver(engine, later, OPEN).state == "disabled"
    assert len(receiver.requests) == 1  # the later ones never went out
    # Replaying re-enables the URL: the owner says the receiver is back.
    with session_scope(engine) as s:
        job_id = s.get(WebhookDelivery, later).job_id  # type: ignore[union-attr]
        assert job_id is not None
        replay(s, job_id, later)
    assert deliver(engine, later, OPEN).state == "delivered"


def test_the_retry_window_ends_a_delivery(engine: Engine, token_id: int, receiver_factory: Any):
    receiver = receiver_factory([503])
    delivery_id = _delivery(engine, f"token:{token_id}", receiver.url)
    with session_scope(engine) as s:
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(created_at=utcnow() - timedelta(days=2))
        )
    assert deliver(engine, delivery_id, OPEN).state == "failed"


def test_a_target_that_now_resolves_inside_is_not_contacted(
    engine: Engine, token_id: int, receiver_factory: Any
) -> None:
    receiver = receiver_factory([])
    delivery_id = _delivery(engine, f"token:{token_id}", receiver.url)
    outcome = deliver(engine, delivery_id, STRICT)  # 127.0.0.1 no longer allow-listed
    assert outcome.state == "pending" and "loopback" in (outcome.error or "")
    assert receiver.requests == []


def test_rotation_signs_with_both_keys_until_the_overlap_ends(
    engine: Engine, token_id: int, receiver_factory: Any
) -> None:
    receiver = receiver_factory([])
    with session_scope(engine) as s:
        old = get_or_create_secret(s, token_id).key
        new = rotate_secret(s, token_id).key
    delivery_id = _delivery(engine, f"token:{token_id}", receiver.url)
    assert deliver(engine, delivery_id, OPEN).state == "delivered"
    headers, body = receiver.requests[0]
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)
    with session_scope(engine) as s:
        row = rotate_secret(s, token_id, overlap=timedelta(0))
        assert signing_keys(row, utcnow()) == [row.key]
