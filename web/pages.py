"""The HTML pages for people: the generation form, the live job page, recent jobs, and the local
files behind signed URLs.

Anonymous visitors are welcome: their jobs belong to a random id kept in their session cookie.
A visitor may also sign in at ``/login`` with any live token: the browser then acts as that
token (its jobs are the token's jobs, all jobs for an admin token). With
DQ_FORM_REQUIRES_LOGIN, signing in is the only way: the form shows a sign-in prompt, and the
job pages and submissions answer 401 (pages redirect to the sign-in page).
The job page polls ``/jobs/<id>.json`` (the API's job object) and updates itself in place.
"""

from __future__ import annotations

import base64
import mimetypes
import uuid
from typing import Any

from apiflask import APIBlueprint
from flask import (
    abort,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response as BaseResponse

from core.db.models import Batch, Job
from core.services.batches import BatchNotFound, SharedSettings, cancel_batch, get_batch
from core.services.jobs import (
    JobNotFound,
    JobRequest,
    JobRequestError,
    QueueFull,
    TooManyActiveJobs,
    cancel_job,
    get_job,
    list_jobs,
)
from core.services.model_versions import (
    DEFAULT_MODEL_NAME,
    SHIPPED_MODEL_NAME,
    ServingModel,
    servable_versions,
    serving_model,
    serving_of,
    shipped_model,
)
from core.storage import InvalidKey, LocalStorage, content_disposition
from web.auth import SIGN_IN_KEY, page_caller
from web.batches import read_batch_detail, submit_batch_and_publish
from web.caller import Caller
from web.db import end_reads, get_session, replica_read
from web.forms import GenerateForm, attach_error
from web.problems import Problem, cap_problem
from web.resources import job_resource, job_views, load_job
from web.services import services
from web.sign_in import ANY_TOKEN, sign_in_page, sign_out_page
from web.submission import submit_and_publish

# apiflask expects every blueprint to be an APIBlueprint; this one stays out of the API document.
pages = APIBlueprint("pages", __name__, enable_openapi=False)

JOBS_PER_PAGE = 24


NO_SUCH_JOB = "There is no such job, or it was made in another browser."
SIGN_IN_FIRST = (
    "Sign in with your token first: this site queues and shows jobs only for signed-in users."
)
# Open to anyone even with DQ_FORM_REQUIRES_LOGIN. The form itself answers a GET with a sign-in
# prompt; files are reached only through URLs that a signed-in page handed out (signed).
OPEN_ENDPOINTS = {"pages.login", "pages.logout", "pages.local_file"}


@pages.before_request
def require_sign_in() -> BaseResponse | None:
    if not services().settings.form_requires_login or request.endpoint in OPEN_ENDPOINTS:
        return None
    if page_caller().signed_in or (request.endpoint == "pages.index" and request.method == "GET"):
        return None
    if request.method == "GET" and request.endpoint != "pages.job_json":
        return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))
    raise Problem(401, SIGN_IN_FIRST)


@pages.app_context_processor
def viewer() -> dict[str, Caller | None]:
    """Who the page is for, for the navigation: the caller a view already checked, else the
    sign-in the cookie names (checked now), else None for an anonymous visitor."""
    caller: Caller | None = g.get("page_caller")
    if caller is None and SIGN_IN_KEY in session:
        try:
            caller = page_caller()
        except SQLAlchemyError:  # the database is down: an error page is being drawn
            caller = None
    return {"viewer": caller if caller is not None and caller.signed_in else None}


def _job(job_id: uuid.UUID) -> Job:
    try:
        return get_job(get_session(), job_id, page_caller().scope)
    except JobNotFound:
        raise Problem(404, NO_SUCH_JOB) from None


def _job_json(job_id: uuid.UUID) -> dict[str, Any]:
    """The API's job object, as this browser may see it."""
    scope = page_caller().scope

    def read(session: Session) -> dict[str, Any]:
        try:
            view = load_job(session, job_id, scope)
        finally:
            end_reads(session)
        return job_resource(view, services().storage)

    try:
        return replica_read(read, JobNotFound)
    except JobNotFound:
        raise Problem(404, NO_SUCH_JOB) from None


def _prefill(form: GenerateForm) -> None:
    """Defaults from the serving model; with ?from=<job>, that job's settings and a new seed."""
    model = serving_model(get_session())
    form.steps.data, form.guidance.data, form.sampler.data = (
        model.steps,
        model.guidance,
        model.sampler,
    )
    form.num_images.data = 1
    source = request.args.get("from")
    if source:
        try:
            job = get_job(get_session(), source, page_caller().scope)
        except JobNotFound:
            return
        form.prompt.data, form.negative_prompt.data = job.prompt, job.negative_prompt
        form.steps.data, form.guidance.data = job.steps, job.guidance
        form.sampler.data, form.num_images.data = job.sampler, job.num_images
        version = job.model_version
        if version is None:
            form.model.data = SHIPPED_MODEL_NAME
        elif version.retired_at is None:
            form.model.data = version.name


def _model_choices(form: GenerateForm) -> dict[str, dict[str, Any]]:
    """Fill the form's model choices (default, each servable version, the shipped model) and
    return each one's defaults, which the page's script puts in the fields when it is chosen."""
    versions = servable_versions(get_session())
    active = next((v for v in versions if v.is_active), None)
    models: dict[str, ServingModel] = {
        DEFAULT_MODEL_NAME: serving_of(active) if active is not None else shipped_model(),
        **{v.name: serving_of(v) for v in versions},
        SHIPPED_MODEL_NAME: shipped_model(),
    }
    serving = active.name if active is not None else SHIPPED_MODEL_NAME
    form.model.choices = {
        name: f"default ({serving})" if name == DEFAULT_MODEL_NAME else name for name in models
    }
    return {
        name: {"steps": m.steps, "guidance": m.guidance, "sampler": m.sampler}
        for name, m in models.items()
    }


@pages.route("/", methods=["GET", "POST"])
def index() -> Any:
    form = GenerateForm()
    settings = services().settings
    if settings.form_requires_login and not page_caller().signed_in:
        return render_template("index.html", form=None, settings=settings)
    model_defaults = _model_choices(form)
    if request.method == "GET":
        _prefill(form)
    elif (valid := form.validate_on_submit()) and form.one_per_line.data:
        batch = _submit_lines(form)
        if batch is not None:
            return redirect(url_for("pages.batch_page", batch_id=batch.id), code=303)
    elif valid:
        init_image, mask = _sent_image(form.init_image.data), _sent_image(form.mask.data)
        request_ = JobRequest(
            prompt=form.prompt.data or "",
            negative_prompt=form.negative_prompt.data or "",
            steps=form.steps.data,
            guidance=form.guidance.data,
            sampler=form.sampler.data,
            seed=form.seed.data,
            num_images=form.num_images.data if form.num_images.data is not None else 1,
            init_image=init_image,
            mask=mask,
            # The slider always sends a value: it matters only with an image.
            strength=form.strength.data if init_image is not None else None,
            model=form.model.data or None,
        )
        try:
            job, _ = submit_and_publish(get_session(), request_, page_caller().owner)
        except JobRequestError as e:
            attach_error(form, e.field, e.message)
        except (TooManyActiveJobs, QueueFull) as e:
            raise cap_problem(e) from None
        else:
            return redirect(url_for("pages.job_page", job_id=job.id), code=303)
    status = 422 if request.method == "POST" else 200
    return render_template(
        "index.html", form=form, settings=settings, model_defaults=model_defaults
    ), status


def _sent_image(file: Any) -> str | None:
    """A file chosen on the form as the data: URL a job takes (None when none was chosen); its
    content is checked with the job (core.services.uploads)."""
    if file is None or not getattr(file, "filename", ""):
        return None
    data = file.read(services().settings.max_upload_bytes + 1)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _submit_lines(form: GenerateForm) -> Batch | None:
    """The form's prompt box, one prompt per line (blank lines skipped), as one batch; None
    with the error on the form."""
    lines = [line.strip() for line in (form.prompt.data or "").splitlines()]
    prompts = [line for line in lines if line]
    try:
        batch, _ = submit_batch_and_publish(
            get_session(),
            page_caller().owner,
            prompts=prompts,
            shared=SharedSettings(
                negative_prompt=form.negative_prompt.data or "",
                steps=form.steps.data,
                guidance=form.guidance.data,
                sampler=form.sampler.data,
                num_images=form.num_images.data if form.num_images.data is not None else 1,
                init_image=(init := _sent_image(form.init_image.data)),
                mask=_sent_image(form.mask.data),
                strength=form.strength.data if init is not None else None,
                model=form.model.data or None,
            ),
            seed=form.seed.data,
        )
    except JobRequestError as e:
        field, _, index = e.field.partition(".")
        if field == "prompts":
            where = f"prompt {int(index) + 1} of {len(prompts)}: " if index else ""
            attach_error(form, "prompt", where + e.message)
        else:
            attach_error(form, e.field, e.message)
        return None
    except (TooManyActiveJobs, QueueFull) as e:
        raise cap_problem(e) from None
    return batch


@pages.get("/batches/<uuid:batch_id>")
def batch_page(batch_id: uuid.UUID) -> Any:
    """A batch's jobs with their status and first image; reloads itself while any job waits or
    runs."""
    try:
        detail = read_batch_detail(batch_id, page_caller().scope)
    except BatchNotFound:
        raise Problem(404, "There is no such batch, or it was made in another browser.") from None
    return render_template("batch.html", batch=detail)


@pages.post("/batches/<uuid:batch_id>/cancel")
def cancel_batch_page(batch_id: uuid.UUID) -> BaseResponse:
    session = get_session()
    try:
        batch = get_batch(session, batch_id, page_caller().scope)
    except BatchNotFound:
        raise Problem(404, "There is no such batch, or it was made in another browser.") from None
    cancel_batch(session, batch, page_caller().scope)
    session.commit()
    return redirect(url_for("pages.batch_page", batch_id=batch_id), code=303)


@pages.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """Sign in with any live token: a user token (the browser then sees that token's jobs) or
    an admin token (every job, and the admin pages)."""
    return sign_in_page(ANY_TOKEN)


@pages.post("/logout")
def logout() -> BaseResponse:
    return sign_out_page()


@pages.get("/jobs")
def recent_jobs() -> Any:
    page = request.args.get("page", "1")
    number = int(page) if page.isdigit() and 0 < int(page) < 100_000 else 1
    scope = page_caller().scope
    storage = services().storage

    def read(session: Session) -> tuple[list[Job], int, dict[uuid.UUID, str | None]]:
        jobs, total = list_jobs(
            session, scope, limit=JOBS_PER_PAGE, offset=(number - 1) * JOBS_PER_PAGE
        )
        thumbnails = {
            view.job.id: storage.url(view.images[0].storage_key) if view.images else None
            for view in job_views(session, [job.id for job in jobs])
        }
        return jobs, total, thumbnails

    jobs, total, thumbnails = replica_read(read)
    return render_template(
        "jobs.html",
        jobs=jobs,
        thumbnails=thumbnails,
        page=number,
        pages=max(1, -(-total // JOBS_PER_PAGE)),
        total=total,
    )


@pages.get("/jobs/<uuid:job_id>")
def job_page(job_id: uuid.UUID) -> Any:
    return render_template("job.html", job=_job_json(job_id))


@pages.get("/jobs/<uuid:job_id>.json")
def job_json(job_id: uuid.UUID) -> Any:
    """The API's job object, for the page's polling script (session-scoped, no token)."""
    response = jsonify(_job_json(job_id))
    response.headers["Cache-Control"] = "no-store"
    return response


@pages.post("/jobs/<uuid:job_id>/cancel")
def cancel(job_id: uuid.UUID) -> BaseResponse:
    session = get_session()
    job = _job(job_id)
    cancel_job(session, job)
    session.commit()
    return redirect(url_for("pages.job_page", job_id=job_id), code=303)


@pages.get("/files/<path:key>")
def local_file(key: str) -> Any:
    """An object of the local store behind a URL that LocalStorage.url signed."""
    storage = services().storage
    if not isinstance(storage, LocalStorage):
        abort(404)
    if not storage.verify_url(key, request.args.get("expires"), request.args.get("sig")):
        raise Problem(403, "This file link is not valid or has expired; reload the page.")
    try:
        path = storage.path(key)
    except InvalidKey:
        abort(404)
    if not path.is_file():
        raise Problem(404, "This file does not exist (yet).")
    mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # Previews are overwritten in place as a job runs: never serve a stale one from a cache.
    response = send_file(path, mimetype=mimetype, max_age=0, conditional=True, etag=True)
    # Shown in the page, and saved as dq-<job>-<n>.png rather than "3.png".
    response.headers["Content-Disposition"] = content_disposition(key)
    return response
