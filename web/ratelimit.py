"""Rate limits on submissions (jobs and training runs), through Flask-Limiter.

Only the endpoints that create work are limited, per caller: an API token, or a browser session.
Counts live in DQ_RATE_LIMIT_STORAGE_URL (redis://… in production, so that every gunicorn
process shares them). If that store is down, submissions are let through rather than refused.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, g
from flask_limiter import Limiter

from core.settings import Settings
from web.auth import session_owner

# The views that create work; their POSTs are limited.
SUBMISSION_ENDPOINTS = (
    "api.submit_job_view",
    "admin_api.submit_run_view",
    "pages.index",
    "admin.runs",
)


def caller_key() -> str:
    """Who is submitting: the API caller (authenticated before the limit is checked) or the
    browser session."""
    caller = g.get("caller")
    return caller.owner if caller is not None else session_owner()


def init_app(app: Flask, settings: Settings) -> Limiter:
    limiter = Limiter(
        caller_key,
        app=app,
        storage_uri=settings.rate_limit_storage_url,
        strategy="moving-window",
        # Retry-After is set on the 429 alone, by web.problems; not on every success.
        headers_enabled=False,
        swallow_errors=True,
        key_prefix="dq",
    )
    for endpoint in SUBMISSION_ENDPOINTS:
        view: Any = app.view_functions[endpoint]
        app.view_functions[endpoint] = limiter.limit(settings.rate_limit, methods=["POST"])(view)
    # Only these route limits exist, and the decorator checks them when the view is called. The
    # app-wide before_request check Flask-Limiter also installs would find nothing to do at
    # ~70 µs a request, a sixth of a job poll; it goes.
    hooks = app.before_request_funcs.get(None, [])
    if limiter._check_request_limit in hooks:
        hooks.remove(limiter._check_request_limit)
    return limiter
