"""Operations endpoints: liveness, readiness, the dependencies' health, Prometheus metrics, and
the API docs page's assets.

The docs page (``/api/v1/docs``, Swagger UI through apiflask) loads its script and stylesheet
from this app rather than from a CDN, so it works on machines that cannot reach the internet:
the files are Swagger UI's own distribution (5.x, which reads OpenAPI 3.1), as the
``flask-swagger-ui`` package ships it; only its files are used, not its blueprint.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import flask_swagger_ui
from apiflask import APIBlueprint
from flask import Flask, Response, abort, current_app, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from web.dependencies import probe_database, probe_dependencies
from web.problems import Problem
from web.services import services

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


@ops.get("/readyz")
def readyz() -> Any:
    """200 when the database answers, else 503. The broker and storage are left out on purpose
    (see :mod:`web.dependencies`): with the broker down a submit still succeeds."""
    database = probe_database(services())
    body = {
        "status": "ready" if database.ok else "unavailable",
        "down": [] if database.ok else ["database"],
        "checks": {"database": "ok" if database.ok else f"down: {database.error}"},
    }
    return jsonify(body), 200 if database.ok else 503


@ops.get("/readyz/dependencies")
def readyz_dependencies() -> Any:
    """The database, the broker and storage, each probed now: 200 when all answer, else 503."""
    states = probe_dependencies(services())
    body = {name: {"ok": state.ok, "error": state.error} for name, state in states.items()}
    return jsonify(body), 200 if all(state.ok for state in states.values()) else 503


@ops.get("/metrics")
def metrics() -> Response:
    """Prometheus text. With DQ_METRICS_TOKEN set, only for 'Authorization: Bearer <token>'."""
    expected = services().settings.metrics_token
    if expected:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            raise Problem(
                401,
                "/metrics needs 'Authorization: Bearer <DQ_METRICS_TOKEN>'.",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    registry: CollectorRegistry = current_app.extensions["dq_metrics"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
