"""Response hardening: request ids, nosniff, a CSP on pages, HSTS and Secure cookies over HTTPS
(behind a trusted proxy too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from tests.web.conftest import RecordingPublisher, make_settings
from web.security import CONTENT_SECURITY_POLICY


def test_every_answer_has_a_request_id_and_problems_name_it(client: FlaskClient) -> None:
    page = client.get("/")
    assert len(page.headers["X-Request-ID"]) == 32
    given = client.get("/healthz", headers={"X-Request-ID": "lb-1234.abc"})
    assert given.headers["X-Request-ID"] == "lb-1234.abc"  # passed through from the proxy
    bad = client.get("/healthz", headers={"X-Request-ID": "x" * 300 + ";drop"})
    assert bad.headers["X-Request-ID"] != "x" * 300 and len(bad.headers["X-Request-ID"]) == 32
    problem = client.get("/api/v1/jobs/nope", headers={"X-Request-ID": "req-42"})
    assert problem.status_code in (401, 404)
    assert problem.get_json()["request_id"] == "req-42"


def test_pages_carry_a_content_security_policy_and_everything_nosniff(
    client: FlaskClient,
) -> None:
    page = client.get("/")
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    api = client.get("/api/v1/openapi.json")
    assert api.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in api.headers
    assert "Strict-Transport-Security" not in page.headers  # plain HTTP: no HSTS


@pytest.mark.parametrize(
    ("values", "origin"),
    [
        ({}, None),  # local files: served by the app itself
        ({"storage_url": "s3://b/p"}, "https://*.amazonaws.com"),
        ({"storage_url": "s3://b/p", "s3_endpoint_url": "http://minio:9000"}, "http://minio:9000"),
        (
            {
                "storage_url": "s3://b/p",
                "s3_endpoint_url": "http://minio:9000",
                "s3_public_endpoint_url": "https://objects.example.com/",
            },
            "https://objects.example.com",
        ),
    ],
)
def test_pages_let_images_come_only_from_where_presigned_urls_point(
    values: dict[str, str], origin: str | None
) -> None:
    from core.runtime.settings import Settings
    from web.security import content_security_policy, image_origins

    settings = Settings.from_env({}, **values)
    img_src = next(
        d for d in content_security_policy(image_origins(settings)).split("; ") if "img-src" in d
    )
    assert img_src == "img-src 'self' data: blob:" + (f" {origin}" if origin else "")


def test_over_https_behind_a_trusted_proxy_cookies_are_secure_and_hsts_is_sent(
    db_url: str, tmp_path: Path, engine: Engine
) -> None:
    from web import create_app

    settings = make_settings(db_url, tmp_path, trusted_proxy_hops=1)
    client = create_app(settings, publisher=RecordingPublisher()).test_client()
    page = client.get("/", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
    assert page.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    cookie = page.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    plain = create_app(settings, publisher=RecordingPublisher()).test_client().get("/")
    assert "Secure" not in plain.headers["Set-Cookie"]


def test_an_untrusted_forwarded_header_changes_nothing(client: FlaskClient) -> None:
    page = client.get("/", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in page.headers
    assert "Secure" not in page.headers["Set-Cookie"]
