"""Fine-tuning runs through the admin API: base_version and freeze_text_encoder are checked
before anything is written, the run records its base, and a version shows its quick eval."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.engine import Engine

from core.db import ModelKind, ModelVersion, session_scope
from tests.web.conftest import RecordingPublisher, add_version, bearer
from tests.web.test_admin_api import SHAPES_RUN, count_runs
from tests.web.test_api_jobs import assert_problem

FOLDER_RUN = {"kind": "denoiser", "dataset": {"kind": "path", "path": "pink"}}


def test_a_fine_tune_of_default_starts_from_what_default_traffic_runs_on(
    client: FlaskClient, admin_token: str, publisher: RecordingPublisher, engine: Engine
) -> None:
    body = {
        **FOLDER_RUN,
        "base_version": "default",
        "freeze_text_encoder": True,
        "config": {"finetune": {"init_words": {"pink": "red purple"}}},
    }
    # No version active: default traffic runs on the shipped model, and so does the fine-tune.
    r = client.post("/api/v1/admin/training-runs", json=body, headers=bearer(admin_token))
    assert r.status_code == 202, r.get_json()
    run = r.get_json()
    assert run["config"]["finetune"] == {
        "base": "shipped",
        "freeze_text_encoder": True,
        "init_words": {"pink": "red purple"},
    }
    assert run["config"]["base_version_id"] is None
    assert run["total_steps"] == 300  # configs/finetune.toml, not the 4000 of denoiser.toml
    assert len(publisher.sent) == 1
    # With a version active, default names it; shipped still names the shipped model.
    active = add_version(engine, "served-v1", config={"image_size": 64})
    with session_scope(engine) as session:
        session.execute(
            update(ModelVersion).where(ModelVersion.id == active).values(is_active=True)
        )
    r = client.post("/api/v1/admin/training-runs", json=body, headers=bearer(admin_token))
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["config"]["base_version_id"] == str(active)
    assert r.get_json()["config"]["finetune"]["base"] == "served-v1"
    shipped = {**body, "base_version": "shipped"}
    r = client.post("/api/v1/admin/training-runs", json=shipped, headers=bearer(admin_token))
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["config"]["base_version_id"] is None


def test_a_fine_tune_of_a_version_names_it_by_id(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    version = add_version(engine, "shapes-v2", config={"image_size": 64})
    body = {**SHAPES_RUN, "base_version": "shapes-v2", "config": {"train": {"steps": 40}}}
    r = client.post("/api/v1/admin/training-runs", json=body, headers=bearer(admin_token))
    assert r.status_code == 202, r.get_json()
    run = r.get_json()
    assert run["config"]["base_version_id"] == str(version)
    assert run["config"]["finetune"]["base"] == "shapes-v2" and run["total_steps"] == 40


BAD = [
    ({**SHAPES_RUN, "base_version": "no-such-version"}, "base_version"),
    ({**SHAPES_RUN, "base_version": "an-autoencoder"}, "base_version"),
    ({**SHAPES_RUN, "base_version": ""}, "base_version"),
    ({**SHAPES_RUN, "base_version": 7}, "base_version"),
    (
        {"kind": "autoencoder", "dataset": {"kind": "shapes"}, "base_version": "default"},
        "base_version",
    ),
    ({**SHAPES_RUN, "freeze_text_encoder": True}, "freeze_text_encoder"),
    ({**SHAPES_RUN, "freeze_text_encoder": "yes", "base_version": "default"},
     "freeze_text_encoder"),
    ({**SHAPES_RUN, "base_version": "default", "config": {"unet": {"heads": 8}}},
     "config.unet"),
    ({**SHAPES_RUN, "base_version": "default",
      "config": {"train": {"text_pretrain_steps": 100}}}, "config.train.text_pretrain_steps"),
    ({"kind": "denoiser", "dataset": {"kind": "shapes", "image_size": 32},
      "base_version": "default"}, "dataset.image_size"),
    ({**SHAPES_RUN, "config": {"finetune": {"init_words": {"pink": "red"}}}},
     "config.finetune"),
    ({**SHAPES_RUN, "base_version": "default",
      "config": {"finetune": {"init_words": {"pink": ""}}}}, "config.finetune.init_words.pink"),
]  # fmt: skip


def test_bad_fine_tunes_get_422_naming_the_field_and_write_nothing(
    client: FlaskClient, admin_token: str, engine: Engine, publisher: RecordingPublisher
) -> None:
    add_version(engine, "an-autoencoder", kind=ModelKind.AUTOENCODER)
    for body, field in BAD:
        r = client.post("/api/v1/admin/training-runs", json=body, headers=bearer(admin_token))
        problem = assert_problem(r, 422, field)
        assert any(e["field"] == field for e in problem["errors"]), (field, problem)
    assert count_runs(engine) == 0 and publisher.sent == []


def test_a_version_shows_its_quick_eval_and_base(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    figures = {"fid": 83.1, "n": 256, "adherence": 0.98, "reference": "shapes eval stream, seed 0"}
    add_version(
        engine,
        "tuned",
        metrics={"eval": figures, "finetune": {"base_version": "default"}},
    )
    add_version(engine, "imported")
    listing = client.get("/api/v1/models", headers=bearer(admin_token)).get_json()
    versions = {v["name"]: v for v in listing["versions"]}
    assert versions["tuned"]["eval"] == figures
    assert versions["tuned"]["base_version"] == "default"
    assert versions["imported"]["eval"] is None and versions["imported"]["base_version"] is None


def test_the_models_page_shows_the_quick_eval_and_the_base(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    from tests.web.test_admin_pages import log_in

    reference = "shapes eval stream, seed 0"
    figures = {"fid": 83.14, "n": 256, "adherence": 0.984, "reference": reference, "floor": 81.7}
    add_version(engine, "tuned", metrics={"eval": figures, "finetune": {"base_version": "default"}})
    log_in(client, admin_token)
    page = client.get("/admin/models").get_data(as_text=True)
    assert "FID 83.14 (floor 81.70) at N = 256, adherence 98.4%" in page
    assert "against shapes eval stream, seed 0" in page and "fine-tuned from default" in page


def test_the_models_page_shows_an_autoencoders_reconstruction_eval(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    from tests.web.test_admin_pages import log_in

    figures = {
        "kind": "reconstruction", "fid": 1.234, "psnr_db": 31.456, "n": 256, "real_n": 256,
        "reference": "shapes held-out split, seed 0", "adherence": None, "floor": None,
    }  # fmt: skip
    add_version(engine, "an-ae", kind=ModelKind.AUTOENCODER, metrics={"eval": figures})
    log_in(client, admin_token)
    page = client.get("/admin/models").get_data(as_text=True)
    assert "reconstruction FID 1.23, PSNR 31.46 dB at N = 256" in page
    assert "on shapes held-out split, seed 0" in page
    listing = client.get("/api/v1/models", headers=bearer(admin_token)).get_json()
    assert {v["name"]: v["eval"] for v in listing["versions"]}["an-ae"] == figures
