"""Response hardening and request ids, for a service on the public internet.

- Every request gets an ``X-Request-ID``: the client's, when it is a sane token, or a new one. It
  is echoed on the response, put on every log line of the request, and named in problem bodies
  (``request_id``), so a user's report can be matched to the logs.
- Every response says ``X-Content-Type-Options: nosniff``; HTML pages carry a
  Content-Security-Policy (scripts and styles from this site only, no framing).
- Over HTTPS (directly, or behind a proxy trusted through DQ_TRUSTED_PROXY_HOPS) responses carry
  HSTS and the session cookie is ``Secure``.
"""

from __future__ import annotations

import logging
import re
import uuid
from urllib.parse import urlsplit

from flask import Flask, Response, g, has_request_context, request
from flask.sessions import SecureCookieSessionInterface

from core.runtime.settings import Settings, storage_location

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def content_security_policy(image_origins: str = "") -> str:
    """The policy of the HTML pages. Images come from this site and, for presigned S3 URLs, from
    ``image_origins`` (the store's origin as browsers reach it)."""
    return "; ".join(
        [
            "default-src 'self'",
            f"img-src 'self' data: blob: {image_origins}".rstrip(),
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'self'",
            "form-action 'self'",
            "object-src 'none'",
        ]
    )


def image_origins(settings: Settings) -> str:
    """Where presigned image URLs point: the public S3 endpoint, the app's own endpoint, or AWS
    S3's host names; nothing for a local store (served by this app)."""
    if storage_location(settings.storage_url)[0] != "s3":
        return ""
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if endpoint is None:
        return "https://*.amazonaws.com"
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}"


CONTENT_SECURITY_POLICY = content_security_policy()
HSTS = "max-age=31536000; includeSubDomains"
# The API's docs page (Swagger UI) runs inline scripts of its own; it gets no CSP.
NO_CSP_PREFIXES = ("/api/v1/docs",)


def request_id() -> str | None:
    return g.get("request_id") if has_request_context() else None


class SessionInterface(SecureCookieSessionInterface):
    """The signed-cookie session, whose cookie is Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        configured = bool(app.config.get("SESSION_COOKIE_SECURE"))
        return configured or (has_request_context() and request.is_secure)


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` on every record ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id() or "-"
        return True


def init_app(app: Flask, settings: Settings | None = None) -> None:
    policy = (
        content_security_policy(image_origins(settings)) if settings else CONTENT_SECURITY_POLICY
    )

    @app.before_request
    def assign_request_id() -> None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def harden(response: Response) -> Response:
        rid = request_id()
        if rid:
            response.headers[REQUEST_ID_HEADER] = rid
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.mimetype == "text/html" and not request.path.startswith(NO_CSP_PREFIXES):
            response.headers.setdefault("Content-Security-Policy", policy)
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        return response
