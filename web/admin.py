"""Admin pages: sign in with an admin token, start and watch training runs (status, step, loss
curve, samples, cancel), choose which model version serves, and read the audit trail."""

from __future__ import annotations

import json
import uuid
from typing import Any

from apiflask import APIBlueprint
from flask import flash, redirect, render_template, request, url_for
from sqlalchemy.exc import IntegrityError
from werkzeug.wrappers import Response as BaseResponse

from core.db.models import JobStatus, ModelKind, ModelVersion
from core.services.audit import ACTIONS, recent, record
from core.services.model_rollout import GateBounds, activate_checked
from core.services.model_versions import (
    DEFAULT_MODEL_NAME,
    SHIPPED_MODEL_NAME,
    ModelStateError,
    deactivate_all,
    serving_model,
)
from core.services.training_runs import (
    RunFinished,
    RunNotFound,
    TrainingRequestError,
    cancel_run,
    get_run,
    list_runs,
    metric_series,
)
from core.storage import StorageError
from web.audit import DEFAULT_PAGE, audited_session, next_cursor
from web.auth import logged_in_admin, page_caller
from web.db import get_session
from web.forms import RUN_FIELD_FOR_ERROR, TrainingRunForm, attach_error
from web.loss_curve import loss_curve_svg
from web.problems import Problem
from web.resources import list_versions, samples_key
from web.services import services
from web.sign_in import ADMIN_TOKEN, sign_in_page, sign_out_page
from web.submission import start_training_run

# apiflask expects every blueprint to be an APIBlueprint; this one stays out of the API document.
admin = APIBlueprint("admin", __name__, url_prefix="/admin", enable_openapi=False)

PUBLIC_ENDPOINTS = {"admin.login", "admin.logout"}


@admin.before_request
def require_login() -> BaseResponse | None:
    if request.endpoint in PUBLIC_ENDPOINTS or logged_in_admin() is not None:
        return None
    if request.method == "GET":
        return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
    raise Problem(403, "Sign in with an admin token first.")


@admin.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """Sign in with an admin token: the admin pages, and every job."""
    return sign_in_page(ADMIN_TOKEN)


@admin.post("/logout")
def logout() -> BaseResponse:
    return sign_out_page()


@admin.get("/")
def home() -> BaseResponse:
    return redirect(url_for("admin.runs"))


def _status(run: Any) -> dict[str, Any]:
    """What a cancel did, for the audit row: canceled, or asked to stop."""
    return {"status": run.status.value, "cancel_requested": bool(run.cancel_requested)}


def _autoencoder_choices() -> dict[str, str]:
    """The autoencoders a denoiser run may train on, each with its reconstruction eval."""
    versions = list_versions(get_session(), ModelKind.AUTOENCODER)
    return {"": "the shipped one", **{str(v.id): _with_eval(v) for v in versions}}


def _with_eval(version: ModelVersion) -> str:
    found = (version.metrics or {}).get("eval")
    if not isinstance(found, dict) or found.get("kind") != "reconstruction":
        return version.name
    try:
        return f"{version.name} (rFID {float(found['fid']):.2f}, {float(found['psnr_db']):.1f} dB)"
    except (KeyError, TypeError, ValueError):
        return version.name


def _base_choices() -> dict[str, str]:
    """What a run may fine-tune: the served model, the shipped one, or a denoiser version not
    retired, by name (as base_version names them in the API)."""
    versions = [
        v.name
        for v in list_versions(get_session(), ModelKind.DENOISER)
        if v.retired_at is None and v.name not in (DEFAULT_MODEL_NAME, SHIPPED_MODEL_NAME)
    ]
    return {
        "": "nothing: train from scratch",
        DEFAULT_MODEL_NAME: "the served model (default)",
        SHIPPED_MODEL_NAME: "the shipped model",
        **{name: name for name in versions},
    }


def _run_request(form: TrainingRunForm) -> dict[str, Any]:
    """The form as the arguments of submit_training_run; ValueError for unreadable JSON."""
    dataset: dict[str, Any] = {"kind": form.dataset_kind.data}
    location = (form.dataset_location.data or "").strip()
    if form.dataset_kind.data == "s3":
        dataset["uri"] = location
    elif form.dataset_kind.data == "path":
        dataset["path"] = location
    elif form.shapes_seed.data is not None:
        dataset["seed"] = form.shapes_seed.data
    config: dict[str, Any] = {}
    if (form.config_json.data or "").strip():
        config = json.loads(form.config_json.data or "")
        if not isinstance(config, dict):
            raise ValueError("must be a JSON object")
    train = {
        key: getattr(form, key).data
        for key in ("steps", "batch_size", "lr", "seed")
        if getattr(form, key).data is not None
    }
    if train:
        config["train"] = {**(config.get("train") or {}), **train}
    ae = form.autoencoder_version_id.data
    return {
        "kind": form.kind.data,
        "dataset": dataset,
        "config": config,
        "autoencoder_version_id": uuid.UUID(ae) if ae else None,
        "activate": bool(form.activate.data),
        "base_version": form.base_version.data or None,
        "freeze_text_encoder": bool(form.freeze_text_encoder.data),
    }


def _form_field(core_field: str) -> str:
    if core_field in RUN_FIELD_FOR_ERROR:
        return RUN_FIELD_FOR_ERROR[core_field]
    if core_field.startswith("config"):
        return "config_json"
    if core_field.startswith("dataset"):
        return "dataset_location"
    return core_field


@admin.route("/runs", methods=["GET", "POST"])
def runs() -> Any:
    form = TrainingRunForm()
    form.autoencoder_version_id.choices = _autoencoder_choices()
    form.base_version.choices = _base_choices()
    if form.validate_on_submit():
        try:
            arguments = _run_request(form)
        except ValueError as e:
            attach_error(form, "config_json", f"is not a JSON object: {e}")
        else:
            try:
                run = start_training_run(
                    audited_session(), created_by=page_caller().owner, **arguments
                )
            except TrainingRequestError as e:
                attach_error(form, _form_field(e.field), f"{e.field}: {e.message}")
            else:
                return redirect(url_for("admin.run_page", run_id=run.id), code=303)
    status = 422 if request.method == "POST" else 200
    filter_ = request.args.get("status")
    chosen = JobStatus(filter_) if filter_ in {s.value for s in JobStatus} else None
    rows, total = list_runs(get_session(), chosen, limit=100)
    return render_template(
        "admin/runs.html", form=form, runs=rows, total=total, status_filter=chosen
    ), status


@admin.get("/runs/<uuid:run_id>")
def run_page(run_id: uuid.UUID) -> Any:
    session = get_session()
    try:
        run = get_run(session, run_id)
    except RunNotFound as e:
        raise Problem(404, str(e)) from None
    series = metric_series(session, run.id)
    losses = {name: points for name, points in series.items() if "loss" in name}
    others = {name: points[-1] for name, points in series.items() if "loss" not in name}
    storage = services().storage
    try:
        key = samples_key(run.id)
        samples_url = storage.url(key) if storage.exists(key) else None
    except StorageError:
        samples_url = None
    return render_template(
        "admin/run.html",
        run=run,
        chart=loss_curve_svg(losses),
        latest=others,
        samples_url=samples_url,
        statuses=JobStatus,
    )


@admin.post("/runs/<uuid:run_id>/cancel")
def cancel_run_page(run_id: uuid.UUID) -> BaseResponse:
    session = audited_session()
    try:
        run = cancel_run(session, get_run(session, run_id))
        record(session, page_caller().owner, "run.cancel", f"run:{run_id}", detail=_status(run))
        session.commit()
    except RunNotFound as e:
        raise Problem(404, str(e)) from None
    except RunFinished as e:
        session.rollback()
        flash(str(e))
    return redirect(url_for("admin.run_page", run_id=run_id), code=303)


@admin.get("/models")
def models() -> Any:
    session = get_session()
    return render_template(
        "admin/models.html", versions=list_versions(session), serving=serving_model(session)
    )


@admin.post("/models/<uuid:version_id>/activate")
def activate(version_id: uuid.UUID) -> BaseResponse:
    """Activate behind the eval gate, as the admin API does; the page's "activate anyway"
    button sends force."""
    session = audited_session()
    force = request.form.get("force") == "1"
    try:
        version, result = activate_checked(
            session, version_id, GateBounds.of(services().settings), force=force
        )
        record(
            session,
            page_caller().owner,
            "model.activate",
            f"model:{version.id}",
            detail={
                "name": version.name,
                "kind": version.kind.value,
                "forced": force and not result.passed,
                "gate": result.as_dict(),
            },
        )
        session.commit()
        flash(f"{version.name} now serves new jobs.")
    except LookupError:
        raise Problem(404, f"There is no model version {version_id}.") from None
    except ModelStateError as e:
        session.rollback()
        flash(f"Not activated: {e}.")
    except IntegrityError:
        session.rollback()
        flash("Another version was activated at the same moment; try again.")
    return redirect(url_for("admin.models"), code=303)


@admin.post("/models/default")
def activate_default() -> BaseResponse:
    session = audited_session()
    deactivate_all(session)
    record(session, page_caller().owner, "model.activate", "model:default")
    session.commit()
    flash("The shipped default model now serves new jobs.")
    return redirect(url_for("admin.models"), code=303)


@admin.get("/audit")
def audit() -> Any:
    """The audit trail, newest first, by action and actor, a page at a time."""
    action = request.args.get("action") or None
    actor = (request.args.get("actor") or "").replace("\x00", "").strip()[:80] or None
    before = request.args.get("before", "")
    if action is not None and action not in ACTIONS:
        raise Problem(400, f"There is no audit action {action!r}; use one of the list.")
    cursor = int(before) if before.isdigit() and 0 < int(before) < 2**63 else None
    events = recent(get_session(), limit=DEFAULT_PAGE, before_id=cursor, action=action, actor=actor)
    return render_template(
        "admin/audit.html",
        events=events,
        actions=ACTIONS,
        action=action,
        actor=actor or "",
        next_before=next_cursor(events, DEFAULT_PAGE),
    )
