"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

from apiflask import APIBlueprint
from flask import Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from core.db.session import check_database
from web.services import services

log = logging.getLogger(__name__)

# apiflask expects every blueprint to be an APIBlueprint; this one stays out of the API document.
ops = APIBlueprint("ops", __name__, enable_openapi=False)


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
