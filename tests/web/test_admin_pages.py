"""Admin pages: token login, training runs (start, list, watch, cancel) and model versions."""

from __future__ import annotations

import re
import uuid

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.engine import Engine
from werkzeug.test import TestResponse

from core.db import JobStatus, ModelKind, ModelVersion, TrainingMetric, TrainingRun, session_scope
from core.services.tokens import revoke_token
from core.storage import LocalStorage
from tests.web.conftest import PNG_BYTES, RecordingPublisher, add_version, csrf_token
from tests.web.test_admin_api import add_run
from tests.web.test_pages import field_errors


def log_in(client: FlaskClient, token: str) -> None:
    csrf = csrf_token(client, "/admin/login")
    r = client.post("/admin/login", data={"token": token, "csrf_token": csrf})
    assert r.status_code == 303, r.get_data(as_text=True)


def post(client: FlaskClient, path: str, **data: str) -> TestResponse:
    return client.post(path, data={**data, "csrf_token": csrf_token(client, "/admin/runs")})


def test_admin_pages_need_a_login(client: FlaskClient, engine: Engine) -> None:
    r = client.get("/admin/models")
    assert r.status_code == 302 and r.headers["Location"] == "/admin/login?next=/admin/models"
    run_id = add_run(engine)
    csrf = csrf_token(client, "/admin/login")
    r = client.post(f"/admin/runs/{run_id}/cancel", data={"csrf_token": csrf})
    assert r.status_code == 403
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status is JobStatus.QUEUED


def test_login_refuses_user_tokens_and_accepts_admin_tokens(
    client: FlaskClient, user_token: str, admin_token: str
) -> None:
    csrf = csrf_token(client, "/admin/login")
    r = client.post("/admin/login", data={"token": user_token, "csrf_token": csrf})
    assert r.status_code == 401
    assert field_errors(r.get_data(as_text=True), "token") == ["This is not a live admin token."]
    r = client.post(
        "/admin/login?next=/admin/models", data={"token": admin_token, "csrf_token": csrf}
    )
    assert r.status_code == 303 and r.headers["Location"] == "/admin/models"
    assert client.get("/admin/models").status_code == 200


def test_login_never_redirects_off_site(client: FlaskClient, admin_token: str) -> None:
    csrf = csrf_token(client, "/admin/login")
    r = client.post(
        "/admin/login?next=//evil.example/x", data={"token": admin_token, "csrf_token": csrf}
    )
    assert r.headers["Location"] == "/admin/runs"


@pytest.mark.parametrize(
    "target",
    [
        "/%09/evil.example",  # a tab, which browsers drop: //evil.example
        "/%0a/evil.example",
        "/%5Cevil.example",  # a backslash, which browsers read as a slash
        "%5C/evil.example",
        "/%5C%5Cevil.example",
        "https://evil.example/",
        "%20//evil.example",
    ],
)
def test_login_stays_on_the_site_whatever_the_encoding(
    client: FlaskClient, admin_token: str, target: str
) -> None:
    csrf = csrf_token(client, "/admin/login")
    r = client.post(f"/admin/login?next={target}", data={"token": admin_token, "csrf_token": csrf})
    assert r.status_code == 303 and r.headers["Location"] == "/admin/runs"


def test_login_goes_on_to_a_page_of_the_site(client: FlaskClient, admin_token: str) -> None:
    csrf = csrf_token(client, "/admin/login")
    r = client.post(
        "/admin/login?next=/admin/models%3Fx%3D1", data={"token": admin_token, "csrf_token": csrf}
    )
    assert r.headers["Location"] == "/admin/models?x=1"


def test_a_revoked_admin_token_ends_the_login(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    log_in(client, admin_token)
    assert client.get("/admin/runs").status_code == 200
    with session_scope(engine) as session:
        revoke_token(session, admin_token)
    assert client.get("/admin/runs").status_code == 302


def test_start_a_run_from_the_form(
    client: FlaskClient, admin_token: str, engine: Engine, publisher: RecordingPublisher
) -> None:
    log_in(client, admin_token)
    r = post(
        client,
        "/admin/runs",
        kind="denoiser",
        dataset_kind="shapes",
        shapes_seed="5",
        steps="300",
        lr="0.0005",
        config_json='{"train": {"warmup_steps": 10}}',
        autoencoder_version_id="",
        activate="y",
    )
    assert r.status_code == 303
    with session_scope(engine) as session:
        (run,) = session.scalars(select(TrainingRun))
        assert r.headers["Location"] == f"/admin/runs/{run.id}"
        assert run.dataset == {"kind": "shapes", "seed": 5}
        assert run.config == {
            "train": {"warmup_steps": 10, "steps": 300, "lr": 0.0005},
            "activate": True,
        }
        assert run.total_steps == 300 and run.created_by.startswith("token:")
    assert publisher.sent[0][2] == {"run_id": str(run.id)}


def test_run_form_errors_appear_next_to_the_field(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    log_in(client, admin_token)
    base = {"kind": "denoiser", "autoencoder_version_id": ""}
    r = post(client, "/admin/runs", **base, dataset_kind="s3", dataset_location="http://x/y")
    assert r.status_code == 422
    errors = field_errors(r.get_data(as_text=True), "dataset_location")
    assert errors == ["dataset.uri: must be s3://BUCKET/PREFIX"]
    r = post(client, "/admin/runs", **base, dataset_kind="shapes", lr="0")
    assert field_errors(r.get_data(as_text=True), "lr") == [
        "config.train.lr: must be above 0 and at most 1"
    ]
    r = post(client, "/admin/runs", **base, dataset_kind="shapes", config_json="[1, 2")
    assert field_errors(r.get_data(as_text=True), "config_json")[0].startswith(
        "is not a JSON object"
    )
    with session_scope(engine) as session:
        assert list(session.scalars(select(TrainingRun))) == []


def test_the_run_form_fine_tunes_a_version_and_offers_only_what_can_be_fine_tuned(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    from sqlalchemy import update

    from core.db import utcnow

    log_in(client, admin_token)
    version = add_version(engine, "shapes-v2", config={"image_size": 64})
    retired = add_version(engine, "old-v1", config={"image_size": 64})
    add_version(engine, "an-autoencoder", kind=ModelKind.AUTOENCODER)
    with session_scope(engine) as session:
        session.execute(
            update(ModelVersion).where(ModelVersion.id == retired).values(retired_at=utcnow())
        )
    page = client.get("/admin/runs").get_data(as_text=True)
    offered = re.findall(
        r'<option[^>]*value="([^"]*)"', page.split('name="base_version"')[1].split("</select>")[0]
    )
    assert offered == ["", "default", "shipped", "shapes-v2"]

    base = {"kind": "denoiser", "dataset_kind": "shapes", "autoencoder_version_id": ""}
    r = post(client, "/admin/runs", **base, base_version="shapes-v2", freeze_text_encoder="y")
    assert r.status_code == 303, r.get_data(as_text=True)
    with session_scope(engine) as session:
        (run,) = session.scalars(select(TrainingRun))
        assert run.config["base_version_id"] == str(version)
        assert run.config["finetune"] == {"base": "shapes-v2", "freeze_text_encoder": True}

    # A frozen text encoder without a base, or a base for an autoencoder: the field says why.
    r = post(client, "/admin/runs", **base, base_version="", freeze_text_encoder="y")
    assert r.status_code == 422
    assert field_errors(r.get_data(as_text=True), "freeze_text_encoder") == [
        "freeze_text_encoder: needs base_version: only a fine-tune has one"
    ]
    r = post(client, "/admin/runs", **{**base, "kind": "autoencoder"}, base_version="default")
    assert field_errors(r.get_data(as_text=True), "base_version") == [
        "base_version: only a denoiser run starts from a base"
    ]
    r = post(client, "/admin/runs", **base, base_version="old-v1")  # not among the choices
    assert r.status_code == 422
    with session_scope(engine) as session:
        assert len(list(session.scalars(select(TrainingRun)))) == 1


def test_runs_list_shows_status_and_step(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    log_in(client, admin_token)
    running = add_run(engine, JobStatus.RUNNING, step=42)
    add_run(engine, JobStatus.FAILED)
    html = client.get("/admin/runs").get_data(as_text=True)
    assert f'href="/admin/runs/{running}"' in html
    assert '<progress max="100" value="42"></progress> 42 / 100' in html
    assert html.count('class="badge failed"') == 1
    only_running = client.get("/admin/runs?status=running").get_data(as_text=True)
    assert only_running.count("<tr>") == 2  # the header and one run


def test_run_page_draws_the_loss_curve_from_the_metrics_and_shows_samples(
    client: FlaskClient, admin_token: str, engine: Engine, storage: LocalStorage
) -> None:
    log_in(client, admin_token)
    run_id = add_run(engine, JobStatus.RUNNING, step=300)
    with session_scope(engine) as session:
        for step, loss in ((100, 0.5), (200, 0.3), (300, 0.2)):
            session.add(TrainingMetric(run_id=run_id, step=step, name="loss", value=loss))
        session.add(TrainingMetric(run_id=run_id, step=300, name="lr", value=1e-4))
    storage.put(f"runs/{run_id}/samples.png", PNG_BYTES, "image/png")
    html = client.get(f"/admin/runs/{run_id}").get_data(as_text=True)
    (points,) = re.findall(r'<polyline[^>]*points="([^"]+)"', html)
    xs = [float(p.split(",")[0]) for p in points.split()]
    ys = [float(p.split(",")[1]) for p in points.split()]
    assert len(xs) == 3 and xs == sorted(xs) and ys == sorted(ys)  # falling loss: y grows down
    assert "<td>lr</td><td>300</td><td>0.0001</td>" in html
    samples = re.search(r'<img class="samples" src="([^"]+)"', html)
    assert samples and client.get(samples.group(1).replace("&amp;", "&")).data == PNG_BYTES
    assert "Cancel run" in html


def test_cancel_control_cancels_a_queued_run(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    log_in(client, admin_token)
    run_id = add_run(engine)
    r = post(client, f"/admin/runs/{run_id}/cancel")
    assert r.status_code == 303
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status is JobStatus.CANCELED
    assert "Cancel run" not in client.get(f"/admin/runs/{run_id}").get_data(as_text=True)


def test_models_page_lists_metrics_and_activates_a_version(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    log_in(client, admin_token)
    version_id = add_version(engine, "shapes-v3", metrics={"fid": 21.25, "clip_score": 0.31})
    add_version(engine, "ae-v1", kind=ModelKind.AUTOENCODER, metrics={"psnr_db": 36.3})
    html = client.get("/admin/models").get_data(as_text=True)
    assert "New jobs use <strong>default</strong>" in html
    assert "clip_score = 0.31, fid = 21.25" in html and "psnr_db = 36.3" in html
    r = post(client, f"/admin/models/{version_id}/activate")
    assert r.status_code == 303
    html = client.get("/admin/models").get_data(as_text=True)
    assert "shapes-v3 now serves new jobs." in html
    assert "New jobs use <strong>shapes-v3</strong>" in html
    with session_scope(engine) as session:
        assert session.scalar(select(ModelVersion.name).where(ModelVersion.is_active)) == (
            "shapes-v3"
        )
    post(client, "/admin/models/default")
    html = client.get("/admin/models").get_data(as_text=True)
    assert "New jobs use <strong>default</strong>" in html
    assert post(client, f"/admin/models/{uuid.uuid4()}/activate").status_code == 404


def test_the_run_form_shows_each_autoencoders_reconstruction_eval(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    log_in(client, admin_token)
    recon = {"kind": "reconstruction", "fid": 0.149, "psnr_db": 36.31, "n": 256}
    measured = add_version(engine, "ae-new", kind=ModelKind.AUTOENCODER, metrics={"eval": recon})
    older = add_version(engine, "ae-old", kind=ModelKind.AUTOENCODER)  # trained before the eval
    page = client.get("/admin/runs").get_data(as_text=True)
    select_ = page.split('name="autoencoder_version_id"')[1].split("</select>")[0]
    labels = dict(re.findall(r'<option[^>]*value="([^"]*)"[^>]*>([^<]*)</option>', select_))
    assert labels == {
        "": "the shipped one",
        str(measured): "ae-new (rFID 0.15, 36.3 dB)",
        str(older): "ae-old",
    }
