"""The HTML pages: the form, the live job page, recent jobs, and signed local files."""

from __future__ import annotations

import re
import uuid
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core.db import Job, JobStatus, session_scope
from core.services.model_versions import activate_version
from core.storage import LocalStorage
from tests.web.conftest import (
    PNG_BYTES,
    RecordingPublisher,
    add_image,
    add_job,
    add_version,
    csrf_token,
)

FORM = {
    "prompt": "a small purple triangle",
    "negative_prompt": "",
    "steps": "20",
    "guidance": "4",
    "sampler": "dpmpp-2m",
    "seed": "",
    "num_images": "1",
}


def session_owner(client: FlaskClient) -> str:
    with client.session_transaction() as session:
        return f"session:{session['owner']}"


def input_value(html: str, name: str) -> str | None:
    match = re.search(rf'<input[^>]*name="{name}"[^>]*value="([^"]*)"', html)
    if match is None:
        match = re.search(rf'<input[^>]*value="([^"]*)"[^>]*name="{name}"', html)
    return match.group(1) if match else None


def field_errors(html: str, name: str) -> list[str]:
    """The error messages shown inside the form field wrapper of ``name``."""
    block = re.search(rf'<div class="field[^"]*">\s*<label for="{name}".*?</div>', html, flags=re.S)
    assert block, f"no field {name}"
    return re.findall(r'<span class="error"[^>]*>([^<]*)</span>', block.group(0))


def submit(client: FlaskClient, **changes: str) -> Any:
    token = csrf_token(client)
    return client.post("/", data={**FORM, **changes, "csrf_token": token})


def test_form_shows_the_serving_models_defaults(client: FlaskClient, engine: Engine) -> None:
    html = client.get("/").get_data(as_text=True)
    assert input_value(html, "steps") == "10" and input_value(html, "guidance") == "4.0"
    version = add_version(
        engine, "v9", config={"sampling_defaults": {"steps": 37, "sampler": "ddim", "guidance": 6}}
    )
    with session_scope(engine) as session:
        activate_version(session, version)
    html = client.get("/").get_data(as_text=True)
    assert input_value(html, "steps") == "37" and input_value(html, "guidance") == "6.0"
    assert re.search(r'<option selected value="ddim">|<option value="ddim" selected>', html)
    assert input_value(html, "seed") in (None, "")  # random unless the user picks one


def test_post_without_a_csrf_token_is_400_and_creates_nothing(
    client: FlaskClient, jobs_of: Any
) -> None:
    r = client.post("/", data=FORM)
    assert r.status_code == 400 and r.mimetype == "text/html"
    assert "security token" in r.get_data(as_text=True)
    r = client.post("/", data={**FORM, "csrf_token": "forged"})
    assert r.status_code == 400
    assert jobs_of() == []


def test_submit_redirects_to_the_job_page_which_shows_the_seed(
    client: FlaskClient, publisher: RecordingPublisher, jobs_of: Any
) -> None:
    r = submit(client)
    assert r.status_code == 303
    match = re.fullmatch(r"/jobs/([0-9a-f-]{36})", r.headers["Location"])
    assert match
    (job,) = jobs_of()
    assert str(job.id) == match.group(1) and job.owner == session_owner(client)
    assert publisher.sent and publisher.sent[0][2] == {"job_id": str(job.id)}
    html = client.get(r.headers["Location"]).get_data(as_text=True)
    assert f'<strong id="seed">{job.seed}</strong>' in html
    assert "a small purple triangle" in html
    assert 'id="queue-position">0<' in html
    # "Run again with a new seed": the same settings, no seed.
    again = re.search(r'href="(/\?from=[^"]+)"', html)
    assert again
    form = client.get(again.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert "a small purple triangle</textarea>" in form
    assert input_value(form, "seed") in (None, "")


def test_a_chosen_seed_is_kept(client: FlaskClient, jobs_of: Any) -> None:
    assert submit(client, seed="4242", num_images="2").status_code == 303
    (job,) = jobs_of()
    assert job.seed == 4242 and job.seeds == [4242, 4243]


def test_validation_errors_appear_next_to_their_field(client: FlaskClient, jobs_of: Any) -> None:
    r = submit(client, steps="0")
    html = r.get_data(as_text=True)
    assert r.status_code == 422
    assert field_errors(html, "steps") == ["must be from 1 to 200"]
    assert field_errors(html, "prompt") == []
    assert "a small purple triangle</textarea>" in html  # what was typed is kept
    r = submit(client, guidance="lots")
    assert field_errors(r.get_data(as_text=True), "guidance") == ["Not a valid float value."]
    r = submit(client, prompt="")
    assert field_errors(r.get_data(as_text=True), "prompt") == ["Type a prompt."]
    r = submit(client, num_images="50")
    assert field_errors(r.get_data(as_text=True), "num_images") == ["must be from 1 to 8"]
    assert jobs_of() == []


def test_job_page_of_another_browser_is_404(client: FlaskClient, app: Any, jobs_of: Any) -> None:
    location = submit(client).headers["Location"]
    stranger = app.test_client()
    r = stranger.get(location)
    assert r.status_code == 404 and "another browser" in r.get_data(as_text=True)
    assert stranger.get(location + ".json").status_code == 404


def test_job_page_shows_progress_and_preview_while_running(
    client: FlaskClient, engine: Engine, storage: LocalStorage
) -> None:
    client.get("/jobs")  # the visit that gives this browser its owner id
    owner = session_owner(client)
    storage.put("previews/x.png", PNG_BYTES, "image/png")
    job_id = add_job(
        engine, owner, JobStatus.RUNNING, progress_step=5, preview_key="previews/x.png"
    )
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<progress id="progress" max="20" value="5">' in html
    assert "step 5 of 20" in html
    preview = re.search(r'<img id="preview"[^>]*src="([^"]+)"', html)
    assert preview and client.get(preview.group(1).replace("&amp;", "&")).data == PNG_BYTES
    data = client.get(f"/jobs/{job_id}.json").get_json()
    assert data["progress"]["step"] == 5 and data["status"] == "running"


def test_job_page_of_a_finished_job_has_images_with_download_links(
    client: FlaskClient, engine: Engine, storage: LocalStorage
) -> None:
    client.get("/jobs")  # the visit that gives this browser its owner id
    job_id = add_job(engine, session_owner(client), JobStatus.SUCCEEDED, num_images=2)
    add_image(engine, job_id, storage, 0)
    add_image(engine, job_id, storage, 1)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    links = re.findall(r'<a href="([^"]+)" download="[^"]+">download</a>', html)
    assert len(links) == 2
    r = client.get(links[1].replace("&amp;", "&"))
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data == PNG_BYTES
    assert 'id="cancel-form"' in html and re.search(r'id="cancel-form"[^>]*hidden', html)


def test_job_page_shows_the_error_or_the_canceled_state(
    client: FlaskClient, engine: Engine
) -> None:
    client.get("/jobs")  # the visit that gives this browser its owner id
    owner = session_owner(client)
    failed = add_job(engine, owner, JobStatus.FAILED, error="out of memory")
    html = client.get(f"/jobs/{failed}").get_data(as_text=True)
    assert re.search(
        r'<p id="error" class="error" >\s*The job failed: <span id="error-text">'
        r"out of memory",
        html,
    )
    canceled = add_job(engine, owner, JobStatus.CANCELED)
    html = client.get(f"/jobs/{canceled}").get_data(as_text=True)
    assert '<p id="canceled" >The job was canceled.</p>' in html


def test_cancel_button_cancels_with_csrf(client: FlaskClient, jobs_of: Any) -> None:
    location = submit(client).headers["Location"]
    html = client.get(location).get_data(as_text=True)
    token = input_value(html, "csrf_token")
    assert client.post(location + "/cancel").status_code == 400  # no token
    r = client.post(location + "/cancel", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["Location"] == location
    (job,) = jobs_of()
    assert job.status is JobStatus.CANCELED
    assert client.get(location + ".json").get_json()["status"] == "canceled"


def test_recent_jobs_lists_this_browsers_jobs_with_thumbnails(
    client: FlaskClient, engine: Engine, storage: LocalStorage
) -> None:
    client.get("/jobs")  # the visit that gives this browser its owner id
    owner = session_owner(client)
    done = add_job(engine, owner, JobStatus.SUCCEEDED, prompt="a green circle", seconds_ago=5)
    add_image(engine, done, storage)
    add_job(engine, owner, prompt="a blue square")
    add_job(engine, "session:someone-else", prompt="not mine")
    html = client.get("/jobs").get_data(as_text=True)
    assert "a green circle" in html and "a blue square" in html and "not mine" not in html
    assert html.index("a blue square") < html.index("a green circle")  # newest first
    thumbs = re.findall(r'<img class="thumb" src="([^"]+)"', html)
    assert len(thumbs) == 1 and f"/files/images/{done}/0.png" in thumbs[0]
    assert client.get(thumbs[0].replace("&amp;", "&")).data == PNG_BYTES


def test_job_json_is_the_api_object(client: FlaskClient, jobs_of: Any) -> None:
    location = submit(client).headers["Location"]
    body = client.get(location + ".json")
    assert body.headers["Cache-Control"] == "no-store"
    (job,) = jobs_of()
    assert body.get_json()["id"] == str(job.id)
    assert body.get_json()["params"]["seed"] == job.seed


def test_image_downloads_are_inline_with_a_named_file(
    client: FlaskClient, storage: LocalStorage
) -> None:
    storage.put("images/0f1e/1/2.png", PNG_BYTES, "image/png")
    r = client.get(storage.url("images/0f1e/1/2.png"))
    assert r.status_code == 200
    assert r.headers["Content-Disposition"] == 'inline; filename="dq-0f1e-2.png"'
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_files_need_a_valid_unexpired_signature(client: FlaskClient, storage: LocalStorage) -> None:
    storage.put("images/a/0.png", PNG_BYTES, "image/png")
    url = storage.url("images/a/0.png")
    good = client.get(url)
    assert good.status_code == 200 and good.mimetype == "image/png"
    assert client.get("/files/images/a/0.png").status_code == 403
    assert client.get(url.replace("sig=", "sig=x")).status_code == 403
    # A signature for one key does not open another.
    storage.put("images/b/0.png", b"secret", "image/png")
    assert client.get(url.replace("images/a/", "images/b/")).status_code == 403
    expired = storage.url("images/a/0.png", expires=-10)
    assert client.get(expired).status_code == 403
    missing = storage.url("images/none/0.png")
    assert client.get(missing).status_code == 404
    assert client.get("/files/../secret_key?expires=1&sig=x").status_code in (403, 404)


def test_anonymous_jobs_use_the_rate_limit_too(db_url: str, tmp_path: Any, engine: Engine) -> None:
    from tests.web.conftest import make_settings
    from web import create_app

    app = create_app(
        make_settings(db_url, tmp_path, rate_limit="1/minute"), publisher=RecordingPublisher()
    )
    client = app.test_client()
    assert submit(client).status_code == 303
    r = submit(client)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "Too many submissions" in r.get_data(as_text=True)
    with session_scope(engine) as session:
        assert len(list(session.scalars(select(Job)))) == 1
    # Only submissions are limited: the form still shows.
    assert client.get("/").status_code == 200


def test_unknown_page_is_an_html_404(client: FlaskClient) -> None:
    r = client.get(f"/jobs/{uuid.uuid4()}-nope")
    assert r.status_code == 404 and r.mimetype == "text/html"
    assert "There is nothing at" in r.get_data(as_text=True)


def _image_file(size: int, grey: bool = False) -> tuple[Any, str]:
    import io

    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 255, (size, size) if grey else (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    out.seek(0)
    return out, "picture.png"


def test_the_form_edits_an_image_through_a_mask_and_the_job_page_shows_both(
    client: FlaskClient, engine: Engine
) -> None:
    page = client.get("/").get_data(as_text=True)
    assert 'enctype="multipart/form-data"' in page and 'type="range"' in page
    form = {
        **FORM,
        "csrf_token": csrf_token(client),
        "init_image": _image_file(64),
        "mask": _image_file(64, grey=True),
        "strength": "0.6",
    }
    posted = client.post("/", data=form, content_type="multipart/form-data")
    assert posted.status_code == 303, posted.get_data(as_text=True)[:800]
    job_page = client.get(posted.headers["Location"]).get_data(as_text=True)
    assert "the image this job edits" in job_page and "strength 0.6" in job_page
    assert "the mask: white is repainted" in job_page
    job = client.get(f"{posted.headers['Location']}.json").get_json()
    assert job["params"]["init_image"] is not None and job["params"]["mask"] is not None
    # Without an image the slider's value is not sent on as a strength.
    plain = client.post("/", data={**FORM, "csrf_token": csrf_token(client), "strength": "0.6"})
    assert plain.status_code == 303
    assert client.get(f"{plain.headers['Location']}.json").get_json()["params"]["strength"] is None


def test_a_bad_image_on_the_form_shows_next_to_its_field_and_queues_nothing(
    client: FlaskClient, engine: Engine
) -> None:
    form = {
        **FORM,
        "csrf_token": csrf_token(client),
        "init_image": _image_file(64),
        "mask": _image_file(32, grey=True),
    }
    posted = client.post("/", data=form, content_type="multipart/form-data")
    assert posted.status_code == 422
    assert "is 32×32 pixels; its init_image is 64×64" in posted.get_data(as_text=True)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
