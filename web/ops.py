"""Operations endpoints: liveness, readiness, Prometheus metrics, and the API docs page's assets.

The docs page (``/api/v1/docs``, Swagger UI through apiflask) loads its script and stylesheet
from this app rather than from a CDN, so it works on machines that cannot reach the internet:
the files are Swagger UI's own distribution (5.x, which reads OpenAPI 3.1), as the
``flask-swagger-ui`` package ships it; only its files are used, not its blueprint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import flask_swagger_ui
from apiflask import APIBlueprint
from flask import Flask, Response, abort, current_app, jsonify, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from core.db.session import check_database
from web.services import services

log = logging.getLogger(__name__)

# apiflask expects every blueprint to be an APIBlueprint; this one stays out of the API document.
ops = APIBlueprint("ops", __name__, enable_openapi=False)

SWAGGER_UI_DIST = Path(flask_swagger_ui.__file__).resolve().parent / "dist"
DOCS_ASSETS_PATH = "/api/v1/docs/assets"
DOCS_ASSETS = {
    "SWAGGER_UI_CSS": "swagger-ui.css",
    "SWAGGER_UI_BUNDLE_JS": "swagger-ui-bundle.js",
    "SWAGGER_UI_STANDALONE_PRESET_JS": "swagger-ui-standalone-preset.js",
    "DOCS_FAVICON": "favicon-32x32.png",
}
"""apiflask's setting for each asset of the docs page, and the file that serves it."""


def use_local_docs_assets(app: Flask) -> None:
    """Points the docs page at the assets served below instead of apiflask's CDN defaults."""
    app.config.update({key: f"{DOCS_ASSETS_PATH}/{name}" for key, name in DOCS_ASSETS.items()})


@ops.get(f"{DOCS_ASSETS_PATH}/<name>")
def docs_asset(name: str) -> Response:
    if name not in DOCS_ASSETS.values():
        abort(404)
    return send_from_directory(SWAGGER_UI_DIST, name, max_age=86400)


@ops.get("/healthz")
def healthz() -> Response:
    """The process is up and serving; says nothing about what it depends on."""
    return jsonify(status="ok")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@ops.get("/readyz")
def readyz() -> Any:
    """200 when the database, the broker and storage all answer; else 503 naming what is down."""
    svc = services()
    checks: dict[str, str] = {}
    probes = {
        "database": lambda: check_database(svc.engine),
        "broker": getattr(svc.publisher, "check", lambda: None),
        "storage": svc.storage.check,
    }
    for name, probe in probes.items():
        try:
            probe()
            checks[name] = "ok"
        except Exception as e:  # any failure means "not ready"; the message says which
            log.warning("readiness: %s is down: %s", name, e)
            checks[name] = f"down: {_first_line(e)}"
    down = [name for name, state in checks.items() if state != "ok"]
    body = {"status": "unavailable" if down else "ready", "down": down, "checks": checks}
    return jsonify(body), 503 if down else 200


@ops.get("/metrics")
def metrics() -> Response:
    registry: CollectorRegistry = current_app.extensions["dq_metrics"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
