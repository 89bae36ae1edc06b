"""Admin REST API: start, watch and cancel training runs; choose the model that serves.

Needs an admin token. A user token gets 403 before its request body is even read, so nothing
is ever written on its behalf.
"""

from __future__ import annotations

import uuid
from typing import Any

from apiflask import APIBlueprint
from flask import url_for
from marshmallow import RAISE
from sqlalchemy.exc import IntegrityError

from core.db.models import JobStatus
from core.model_versions import activate_version, deactivate_all
from core.storage import StorageError
from core.training_runs import (
    RunFinished,
    RunNotFound,
    TrainingRequestError,
    cancel_run,
    get_run,
    list_runs,
    metric_series,
)
from web.api import (
    BODY_ERRORS,
    COMMON_ERRORS,
    json_response,
    models_listing,
    refuse_non_json_body,
)
from web.auth import bearer_caller, require_admin
from web.db import get_session
from web.problems import Problem, invalid
from web.resources import run_resource, samples_key
from web.schemas import LocationHeader, ModelsOut, PageQuery, RunPage, TrainingRunIn, TrainingRunOut
from web.services import services
from web.submission import start_training_run

admin_api = APIBlueprint("admin_api", __name__, url_prefix="/api/v1/admin", tag="Admin")

ADMIN_ERRORS = {**COMMON_ERRORS, 403: "The token is not an admin token."}


@admin_api.before_request
def authenticate_admin() -> None:
    require_admin(bearer_caller())
    refuse_non_json_body()


def _run(run_id: uuid.UUID) -> Any:
    try:
        return get_run(get_session(), run_id)
    except RunNotFound as e:
        raise Problem(404, str(e)) from None


def _run_detail(run: Any) -> dict[str, Any]:
    storage = services().storage
    try:
        key = samples_key(run.id)
        samples_url = storage.url(key) if storage.exists(key) else None
    except StorageError:  # the store is down: show the run without its samples
        samples_url = None
    return run_resource(
        run, metrics=metric_series(get_session(), run.id), samples_url=samples_url, detail=True
    )


@admin_api.post("/training-runs")
@admin_api.input(TrainingRunIn, location="json", arg_name="body")
@admin_api.output(TrainingRunOut, status_code=202, headers=LocationHeader, description="Queued.")
@admin_api.doc(
    summary="Start a training run",
    description="Queues a run of the autoencoder or the denoiser on the shapes dataset, an "
    "s3:// prefix or a folder under DQ_DATA_ROOT, with hyperparameter overrides.",
    security="BearerAuth",
    responses={**ADMIN_ERRORS, **BODY_ERRORS, 429: "Too many submissions; see Retry-After."},
)
def submit_run_view(body: dict[str, Any]) -> Any:
    session = get_session()
    try:
        run = start_training_run(
            session,
            kind=body["kind"],
            dataset=body["dataset"],
            config=body.get("config"),
            created_by=bearer_caller().owner,
            autoencoder_version_id=body.get("autoencoder_version_id"),
            activate=body["activate"],
        )
    except TrainingRequestError as e:
        raise invalid(e.field, e.message) from None
    location = url_for("admin_api.get_run_view", run_id=run.id)
    return json_response(_run_detail(run), 202, {"Location": location})


@admin_api.get("/training-runs")
@admin_api.input(PageQuery, location="query", arg_name="query", unknown=RAISE)
@admin_api.output(RunPage)
@admin_api.doc(
    summary="List training runs",
    description="Newest first, optionally by status.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def list_runs_view(query: dict[str, Any]) -> Any:
    status = JobStatus(query["status"]) if query.get("status") else None
    runs, total = list_runs(get_session(), status, query["limit"], query["offset"])
    return json_response(
        {
            "runs": [run_resource(run) for run in runs],
            "total": total,
            "limit": query["limit"],
            "offset": query["offset"],
        }
    )


@admin_api.get("/training-runs/<uuid:run_id>")
@admin_api.output(TrainingRunOut)
@admin_api.doc(
    summary="Watch a training run",
    description="Status, step, every metric series (loss …) and the sample grid.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def get_run_view(run_id: uuid.UUID) -> Any:
    return json_response(_run_detail(_run(run_id)))


@admin_api.post("/training-runs/<uuid:run_id>/cancel")
@admin_api.output(TrainingRunOut)
@admin_api.doc(
    summary="Cancel a training run",
    description="A queued run is canceled at once; a running one stops at its next step.",
    security="BearerAuth",
    responses={**ADMIN_ERRORS, 409: "The run already succeeded or failed."},
)
def cancel_run_view(run_id: uuid.UUID) -> Any:
    session = get_session()
    try:
        run = cancel_run(session, _run(run_id))
    except RunFinished as e:
        raise Problem(409, str(e)) from None
    session.commit()
    return json_response(_run_detail(run))


@admin_api.post("/models/<uuid:version_id>/activate")
@admin_api.output(ModelsOut)
@admin_api.doc(
    summary="Serve a model version",
    description="Makes the version the active one of its kind; new jobs use it (workers load "
    "it on their next job).",
    security="BearerAuth",
    responses={**ADMIN_ERRORS, 409: "Another admin activated a version at the same moment."},
)
def activate_version_view(version_id: uuid.UUID) -> Any:
    session = get_session()
    try:
        activate_version(session, version_id)
        session.commit()
    except LookupError:
        session.rollback()
        raise Problem(404, f"There is no model version {version_id}.") from None
    except IntegrityError:
        session.rollback()
        raise Problem(409, "Another version was activated at the same moment; retry.") from None
    return json_response(models_listing())


@admin_api.post("/models/default/activate")
@admin_api.output(ModelsOut)
@admin_api.doc(
    summary="Serve the shipped default model",
    description="Deactivates every denoiser version, so new jobs use the default model again.",
    security="BearerAuth",
    responses=ADMIN_ERRORS,
)
def activate_default_view() -> Any:
    session = get_session()
    deactivate_all(session)
    session.commit()
    return json_response(models_listing())
