"""The Flask front end: the generation form and live job pages, REST API v1 with its OpenAPI
document, admin pages and API for training runs and model versions, and the operations
endpoints (/healthz, /readyz, /readyz/dependencies, /metrics).

It records work in the database and sends task messages by name; it never imports torch or the
``worker`` package, so it starts fast and its image stays small. Serve it with ``dq web``
(gunicorn on ``web:create_app()``) or ``flask --app web run``.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from apiflask import APIFlask
from flask import request
from flask_wtf.csrf import CSRFProtect
from limits import parse as parse_rate_limit
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.middleware.proxy_fix import ProxyFix

from core.db.session import get_engine
from core.queue.dispatch import Publisher
from core.runtime import logs
from core.runtime.settings import Settings, SettingsError
from core.storage import Storage, make_storage

# A generation request is a few hundred bytes; anything this big is a mistake or an attack.
MAX_BODY_BYTES = 64 * 1024
# How long a process trusts a token it has checked: a revoked token stops working within this.
TOKEN_CACHE_SECONDS = 5.0


def create_app(
    settings: Settings | None = None,
    publisher: Publisher | None = None,
    storage: Storage | None = None,
) -> APIFlask:
    """Build the app. ``settings`` default to the DQ_* environment; ``publisher`` to a Celery
    sender on the settings' broker; ``storage`` to the settings' store (tests pass fakes)."""
    from core.queue.eta import SnapshotCache
    from core.services.model_versions import (
        SHIPPED_MODEL_NAME,
        servable_versions,
        serving_model,
        serving_of,
        shipped_model,
    )
    from web import (  # noqa: F401 -- routes on api, admin_api
        admin,
        admin_api,
        api,
        batches,
        db,
        events,
        ops,
        pages,
        problems,
        ratelimit,
        resources,
        security,
        submission,
        webhooks_api,
    )
    from web.converters import CONVERTERS
    from web.db import get_session
    from web.metrics import make_registry
    from web.openapi import DESCRIPTION, finish_spec, with_serving_model
    from web.schemas import Problem as ProblemBody
    from web.services import Services
    from web.token_cache import TokenCache

    settings = settings or Settings.from_env()
    settings.check_secret_key()
    for name, limit in (
        ("DQ_RATE_LIMIT", settings.rate_limit),
        ("DQ_GLOBAL_RATE_LIMIT", settings.global_rate_limit),
    ):
        try:
            parse_rate_limit(limit)
        except ValueError:
            raise SettingsError(f"{name}={limit!r} is not valid: use e.g. 60/minute") from None
    if publisher is None:
        from core.queue.broker import CeleryPublisher

        publisher = CeleryPublisher.from_settings(settings)

    app = APIFlask(
        __name__,
        title="diffusion-queue API",
        version="1",
        spec_path="/api/v1/openapi.json",
        docs_path="/api/v1/docs",
        docs_oauth2_redirect_path=None,
        json_errors=False,  # web.problems answers every error, as JSON or as a page
    )
    app.config.update(
        SECRET_KEY=settings.effective_secret_key,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        DEBUG=settings.debug,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(days=30),
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
        # 3.2: the first version that describes an event stream's items (itemSchema).
        OPENAPI_VERSION="3.2.0",
        DESCRIPTION=DESCRIPTION,
        SECURITY_SCHEMES={
            "BearerAuth": {"type": "http", "scheme": "bearer", "description": "dq token create"}
        },
        HTTP_ERROR_SCHEMA=ProblemBody,
        VALIDATION_ERROR_SCHEMA=ProblemBody,
        VALIDATION_ERROR_DESCRIPTION="A field is missing, unknown or out of range.",
        AUTO_404_RESPONSE=True,
        TAGS=[
            {"name": "Jobs", "description": "Generation jobs and the models they run on."},
            {"name": "Admin", "description": "Training runs and model versions (admin tokens)."},
            {
                "name": "Webhooks",
                "description": "Signing keys, delivery logs and replays of signed webhooks.",
            },
        ],
    )
    app.url_map.converters.update(CONVERTERS)  # before any blueprint's routes are added
    if settings.trusted_proxy_hops:
        # The client's address and scheme as the trusted proxies saw them (rate limits, Secure
        # cookies, HSTS). The Host header is not taken from them.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxy_hops, x_proto=settings.trusted_proxy_hops
        )
    app.session_interface = security.SessionInterface()
    security.init_app(app, settings)
    ops.use_local_docs_assets(app)
    logs.configure(
        settings.log_format,
        level=logging.DEBUG if settings.debug else logging.INFO,
        text_format="%(asctime)s %(levelname)s %(name)s rid=%(request_id)s %(message)s",
        filters=(security.RequestIdFilter(),),
        # gunicorn leaves the root logger bare; a test runner or host application does not.
        only_if_unconfigured=True,
    )
    if settings.debug:
        logging.getLogger("web").setLevel(logging.DEBUG)

    engine = get_engine(settings)
    svc = Services(
        settings=settings,
        engine=engine,
        storage=storage or make_storage(settings),
        publisher=publisher,
        token_cache=TokenCache(ttl=TOKEN_CACHE_SECONDS),
        queue_snapshots=SnapshotCache(settings.queue_snapshot_seconds),
        read_engine=db.read_engine(settings),
        replica=db.replica(settings),
    )
    app.extensions["dq"] = svc
    app.extensions["dq_metrics"] = make_registry(svc)

    db.init_app(app)
    resources.init_app(app)
    problems.init_app(app)
    submission.init_app(app)  # before the CSRF check, which reads the body
    csrf = CSRFProtect(app)
    app.register_blueprint(pages.pages)
    app.register_blueprint(admin.admin)
    app.register_blueprint(api.api)
    app.register_blueprint(admin_api.admin_api)
    app.register_blueprint(ops.ops)
    # Bearer tokens cannot be sent by a third-party page, so the API needs no CSRF token.
    csrf.exempt(api.api)
    csrf.exempt(admin_api.admin_api)
    svc.limiter = ratelimit.init_app(app, settings)

    @app.after_request
    def document_the_serving_model(response: Any) -> Any:
        if request.path != app.spec_path or response.status_code != 200:
            return response
        try:
            session = get_session()
            model = serving_model(session)
            versions = servable_versions(session)
        except SQLAlchemyError:  # the database is down: the document without the model's sizes
            return response
        named = {SHIPPED_MODEL_NAME: shipped_model(), **{v.name: serving_of(v) for v in versions}}
        canary = next((named[v.name] for v in versions if v.canary_percent > 0), None)
        document = with_serving_model(response.get_json(), model, named, canary)
        response.set_data(json.dumps(document))
        return response

    @app.spec_processor
    def finish(spec: dict[str, Any] | str) -> dict[str, Any] | str:
        return finish_spec(spec, settings, app.url_map) if isinstance(spec, dict) else spec

    return app
