"""Rate limits on submissions (jobs and training runs), through Flask-Limiter.

Only the endpoints that create work are limited, twice: per caller (DQ_RATE_LIMIT) and for all
callers together (DQ_GLOBAL_RATE_LIMIT). A caller is an API token, or, for anyone without one,
the client's address: a browser session costs nothing to make anew, so it cannot be what a limit
counts. Behind a proxy the address comes from X-Forwarded-For through ProxyFix, trusting
DQ_TRUSTED_PROXY_HOPS proxies. Counts live in DQ_RATE_LIMIT_STORAGE_URL (redis://… in
production, so that every gunicorn process shares them).

If that store is down, token holders' submissions are let through (each is still bounded by
DQ_MAX_ACTIVE_JOBS_PER_OWNER), and anonymous ones are refused with 503: the limits fail closed
for the callers nobody can name.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flask import Flask, g, request
from flask_limiter import Limiter

from core.runtime.settings import Settings
from web.problems import Problem

log = logging.getLogger(__name__)

# The views that create work; their POSTs are limited.
SUBMISSION_ENDPOINTS = (
    "api.submit_job_view",
    "api.submit_batch_view",
    "api.create_upload_view",
    "admin_api.submit_run_view",
    "pages.index",
    "admin.runs",
)


def caller_key() -> str:
    """Who is submitting: the API caller (authenticated before the limit is checked), or the
    client's address."""
    caller = g.get("caller")
    return caller.owner if caller is not None else f"addr:{request.remote_addr or 'unknown'}"


def _everyone() -> str:
    return "all-callers"


def _fail_closed(limiter: Limiter, view: Any) -> Any:
    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        # Admin pages require an admin login before any view runs: those callers are named.
        anonymous = g.get("caller") is None and not (request.endpoint or "").startswith("admin.")
        if request.method == "POST" and anonymous:
            try:
                up = bool(limiter.storage.check())
            except Exception:
                up = False
            if not up:
                log.warning("the rate limiter's store is down: anonymous submission refused")
                raise Problem(
                    503,
                    "Submissions without a token are paused while the rate limiter is "
                    "unavailable; try again shortly, or use an API token.",
                    headers={"Retry-After": "30"},
                )
        return view(*args, **kwargs)

    return guarded


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
        view = limiter.limit(settings.rate_limit, methods=["POST"])(view)
        view = limiter.limit(
            settings.global_rate_limit, key_func=_everyone, methods=["POST"], scope="global"
        )(view)
        app.view_functions[endpoint] = _fail_closed(limiter, view)
    # Only these route limits exist, and the decorator checks them when the view is called. The
    # app-wide before_request check Flask-Limiter also installs would find nothing to do at
    # ~70 µs a request, a sixth of a job poll; it goes.
    hooks = app.before_request_funcs.get(None, [])
    if limiter._check_request_limit in hooks:
        hooks.remove(limiter._check_request_limit)
    return limiter
