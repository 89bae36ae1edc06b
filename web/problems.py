"""The one error helper: every error becomes RFC 9457 problem JSON under ``/api/`` (and on
the machine endpoints such as /metrics), and an HTML
page everywhere else, each with one sentence a person can act on.

Views raise :class:`Problem` (or let werkzeug, apiflask's validation, Flask-Limiter or SQLAlchemy
raise); the handlers registered by :func:`init_app` turn each into a response.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from apiflask.exceptions import HTTPError as ApiflaskHTTPError
from flask import Flask, Response, current_app, jsonify, render_template, request
from flask_limiter.errors import RateLimitExceeded
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from web.security import request_id

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    """An error answer: status, one-sentence detail, and for 422 the fields at fault."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})


def cap_problem(e: Exception) -> Problem:
    """429 when the caller has too many jobs active, 503 with Retry-After when the queue is
    full (core.services.jobs.TooManyActiveJobs, QueueFull)."""
    from core.services.jobs import QueueFull

    if isinstance(e, QueueFull):
        return Problem(503, f"{e}.", headers={"Retry-After": "30"})
    return Problem(429, f"{e}.", headers={"Retry-After": "30"})


def invalid(field: str, message: str) -> Problem:
    """422 naming the field, e.g. ``invalid("steps", "must be from 1 to 200")``."""
    return Problem(422, f"{field}: {message}", errors=[{"field": field, "message": message}])


# Read by machines (Prometheus, probes), so their errors are problem JSON too.
MACHINE_PATHS = frozenset(("/metrics", "/healthz", "/readyz", "/readyz/dependencies"))


def is_api_request() -> bool:
    return request.path.startswith("/api/") or request.path in MACHINE_PATHS


def render_problem(problem: Problem) -> Response:
    if is_api_request():
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": HTTP_STATUS_CODES.get(problem.status, "Error"),
            "status": problem.status,
            "detail": problem.detail,
            "instance": request.path,
        }
        rid = request_id()
        if rid:
            body["request_id"] = rid  # the X-Request-ID of this answer, as in the logs
        if problem.errors is not None:
            body["errors"] = problem.errors
        response = jsonify(body)
        response.mimetype = PROBLEM_CONTENT_TYPE
    else:
        response = Response(
            render_template(
                "error.html",
                status=problem.status,
                title=HTTP_STATUS_CODES.get(problem.status, "Error"),
                detail=problem.detail,
                errors=problem.errors or [],
            ),
            mimetype="text/html",
        )
    response.status_code = problem.status
    for name, value in problem.headers.items():
        response.headers[name] = value
    return response


# --- translating what others raise ----------------------------------------------------------


def _flatten(messages: Any, prefix: str = "") -> list[dict[str, str]]:
    """marshmallow's nested {field: [messages]} as [{field: "a.b", message}]."""
    out: list[dict[str, str]] = []
    if isinstance(messages, Mapping):
        for key, value in messages.items():
            name = "body" if key == "_schema" else str(key)
            out.extend(_flatten(value, f"{prefix}.{name}" if prefix else name))
    elif isinstance(messages, (list, tuple)):
        for message in messages:
            if isinstance(message, (Mapping, list, tuple)):
                out.extend(_flatten(message, prefix))
            else:
                out.append({"field": prefix or "body", "message": _sentence(str(message))})
    else:
        out.append({"field": prefix or "body", "message": _sentence(str(messages))})
    return out


def _sentence(message: str) -> str:
    """marshmallow's "Not a valid integer." as "not a valid integer", to follow a field name."""
    message = message.rstrip(".")
    if message == "Unknown field":
        return "is not a known field"
    if message == "Missing data for required field":
        return "is required"
    if message == "Invalid input type":
        return "must be a JSON object"
    if message == "Field may not be null":
        return "must not be null"
    return message[:1].lower() + message[1:] if message[1:2].islower() else message


def validation_problem(error: ApiflaskHTTPError) -> Problem:
    detail = error.detail if isinstance(error.detail, Mapping) else {}
    errors: list[dict[str, str]] = []
    # apiflask nests the messages under the request part: {"json": {...}, "query": {...}}.
    for location in ("json", "query", "headers", "path", "view_args"):
        errors.extend(_flatten(detail.get(location, {})))
    if not errors:
        errors = [{"field": "body", "message": str(error.message)}]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return Problem(error.status_code, summary, errors=errors)


def _retry_after_seconds() -> int:
    from web.services import services

    limiter = services().limiter
    limit = limiter.current_limit if limiter is not None else None
    if limit is None:
        return 60
    return max(1, math.ceil(limit.reset_at - time.time()))


def http_problem(e: HTTPException) -> Problem:
    """A werkzeug HTTPException (404, 405, 413, JSON 400, CSRF 400, 429 …) as a Problem."""
    status = e.code or 500
    headers = {k: v for k, v in e.get_headers() if k.lower() != "content-type"}
    detail = e.description or HTTP_STATUS_CODES.get(status, "Error")
    if isinstance(e, CSRFError):
        detail = (
            "The form's security token is missing or has expired "
            f"({e.description.rstrip('.').lower()}). Reload the page and submit it again."
        )
    elif isinstance(e, RateLimitExceeded):
        retry = _retry_after_seconds()
        headers["Retry-After"] = str(retry)
        detail = (
            f"Too many submissions: the limit is {e.description}. "
            f"Try again in {retry} second{'s' if retry != 1 else ''}."
        )
    elif status == 400 and (
        "json" in (getattr(e, "data", None) or {}).get("messages", {})
        or "Failed to decode JSON" in str(e.description)
    ):
        detail = "The request body is not valid JSON."
    elif status == 404:
        detail = f"There is nothing at {request.path}."
    elif status == 405:
        allowed = headers.get("Allow", "")
        detail = f"{request.method} is not allowed on {request.path}; use {allowed}."
    elif status == 413:
        limit = request.max_content_length or current_app.config.get("MAX_CONTENT_LENGTH") or 0
        detail = f"The request body is larger than the limit of {limit // 1024} KiB."
    return Problem(status, detail, headers=headers)


def init_app(app: Flask) -> None:
    @app.errorhandler(Problem)
    def on_problem(e: Problem) -> Response:
        return render_problem(e)

    @app.errorhandler(HTTPException)
    def on_http_exception(e: HTTPException) -> Response:
        if e.code == 500:
            log.error("unhandled error on %s %s", request.method, request.path)
            return render_problem(
                Problem(500, "Something went wrong on our side; the error was logged.")
            )
        return render_problem(http_problem(e))

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def on_database_down(e: Exception) -> Response:
        # Nothing half-written remains: the request's transaction was never committed.
        log.warning("database unavailable on %s %s: %s", request.method, request.path, e)
        read = request.method in ("GET", "HEAD")
        detail = "The database is unavailable" + ("." if read else "; nothing was saved.")
        detail += " Try again shortly."
        return render_problem(Problem(503, detail, headers={"Retry-After": "5"}))

    # apiflask raises its HTTPError for request validation (422) and calls this for it.
    def on_apiflask_error(error: ApiflaskHTTPError) -> Response:
        if error.status_code == current_app.config["VALIDATION_ERROR_STATUS_CODE"]:
            return render_problem(validation_problem(error))
        detail = error.message if isinstance(error.message, str) else "Error"
        headers = dict(Headers(error.headers).items())
        return render_problem(Problem(error.status_code, detail, headers=headers))

    app.error_callback = on_apiflask_error  # type: ignore[attr-defined]
