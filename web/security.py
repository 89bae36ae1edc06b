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

from flask import Flask, Response, g, has_request_context, request
from flask.sessions import SecureCookieSessionInterface

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        # Images come from object storage (presigned S3 URLs) as well as from this site.
        "img-src 'self' data: blob: http: https:",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "object-src 'none'",
    ]
)
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


def init_app(app: Flask) -> None:
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
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        return response
