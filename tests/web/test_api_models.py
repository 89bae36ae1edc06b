"""Many models at once through the API: a job or batch names its model, GET /api/v1/models lists
what may be named, activation passes the eval gate (or is forced, and audited), the canary takes
its share of default traffic (each job's pick recorded), /metrics splits by model."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core.db import JobStatus, ModelKind, ModelVersion, session_scope
from core.db.models import AuditEvent, Batch, Job
from core.runtime.settings import Settings
from core.services.model_versions import activate_version, canary_slot
from tests.web.conftest import RecordingPublisher, add_job, add_version, bearer, make_settings
from tests.web.test_api_jobs import assert_problem
from tests.web.test_ops import samples

V2 = {"sampling_defaults": {"steps": 31, "sampler": "ddim", "guidance": 3.0}}
V3 = {"sampling_defaults": {"steps": 12, "sampler": "dpmpp-2m", "guidance": 5.5}, "image_size": 32}


def counts(engine: Engine) -> tuple[int, int]:
    with session_scope(engine) as session:
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        batches = session.scalar(select(func.count()).select_from(Batch)) or 0
        return jobs, batches


def audit(engine: Engine, action: str) -> list[AuditEvent]:
    with session_scope(engine) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def job_row(engine: Engine, job_id: str) -> Job:
    with session_scope(engine) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """Room for the canary's draws: more of one caller's jobs queued than the default 20."""
    return make_settings(db_url, tmp_path, max_active_jobs_per_owner=500)


@pytest.fixture
def versions(engine: Engine) -> dict[str, uuid.UUID]:
    """v2 active, v3 a candidate with its own defaults and size, old retired, and an
    autoencoder."""
    ids = {
        "v2": add_version(engine, "v2", config=V2, metrics={"eval": {"fid": 10.0, "n": 256}}),
        "v3": add_version(engine, "v3", config=V3),
        "old": add_version(engine, "old"),
        "ae": add_version(engine, "ae", kind=ModelKind.AUTOENCODER),
    }
    with session_scope(engine) as session:
        activate_version(session, ids["v2"])
        old = session.get(ModelVersion, ids["old"])
        assert old is not None
        old.retired_at = old.created_at
    return ids


def post_job(client: FlaskClient, token: str, **body: Any) -> Any:
    return client.post(
        "/api/v1/jobs", json={"prompt": "a red circle", **body}, headers=bearer(token)
    )


def test_a_job_names_its_model_takes_its_defaults_and_records_the_pick(
    client: FlaskClient, user_token: str, engine: Engine, versions: dict[str, uuid.UUID]
) -> None:
    named = post_job(client, user_token, model="v3")
    assert named.status_code == 202, named.get_json()
    params = named.get_json()["params"]
    # Every default is v3's, not the active v2's: steps, guidance, sampler and size.
    assert (params["model"], params["model_pick"]) == ("v3", "named")
    assert (params["steps"], params["guidance"], params["sampler"], params["size"]) == (
        12,
        5.5,
        "dpmpp-2m",
        32,
    )
    assert job_row(engine, named.get_json()["id"]).model_version_id == versions["v3"]
    polled = client.get(f"/api/v1/jobs/{named.get_json()['id']}", headers=bearer(user_token))
    assert polled.get_json()["params"]["model"] == "v3"

    for body in ({}, {"model": "default"}, {"model": None}):
        job = post_job(client, user_token, **body).get_json()
        assert (job["params"]["model"], job["params"]["model_pick"]) == ("v2", "default")
        assert job["params"]["steps"] == 31
    # v3 is a 32 px model (largest side 64); the active v2 (64 px) takes 128.
    assert post_job(client, user_token, size=128).status_code == 202
    problem = assert_problem(post_job(client, user_token, model="v3", size=128), 422, "size")
    assert problem["errors"][0]["field"] == "size"
    shipped = post_job(client, user_token, model="shipped").get_json()["params"]
    assert (shipped["model"], shipped["model_pick"]) == ("default", "named")
    assert (
        job_row(
            engine, post_job(client, user_token, model="shipped").get_json()["id"]
        ).model_version_id
        is None
    )


BAD_MODELS = [
    ("nope", "no model 'nope'"),
    ("old", "'old' is retired"),
    ("ae", "no model 'ae'"),  # an autoencoder serves no job
    ("../etc", "no model"),
    ("", "model"),
    ("x" * 129, "model"),
    (3, "model"),
    (["v2"], "model"),
]


def test_an_unknown_retired_or_malformed_model_is_422_naming_model_and_writes_nothing(
    client: FlaskClient,
    user_token: str,
    engine: Engine,
    publisher: RecordingPublisher,
    versions: dict[str, uuid.UUID],
) -> None:
    for model, words in BAD_MODELS:
        for path, body in (
            ("/api/v1/jobs", {"prompt": "a red circle", "model": model}),
            ("/api/v1/batches", {"prompts": ["a", "b"], "model": model}),
        ):
            r = client.post(path, json=body, headers=bearer(user_token))
            problem = assert_problem(r, 422, words)
            assert [e["field"] for e in problem["errors"]] == ["model"], (model, problem)
    assert counts(engine) == (0, 0) and publisher.sent == []


def test_a_batch_runs_on_one_model_even_under_a_canary_of_every_share(
    client: FlaskClient,
    user_token: str,
    admin_token: str,
    engine: Engine,
    versions: dict[str, uuid.UUID],
) -> None:
    r = client.post(
        "/api/v1/batches",
        json={"prompts": ["a", "b", "c"], "model": "v3"},
        headers=bearer(user_token),
    )
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["params"]["model"] == "v3"
    with session_scope(engine) as session:
        jobs = list(session.scalars(select(Job)))
        assert {(j.model_version_id, j.model_pick, j.steps) for j in jobs} == {
            (versions["v3"], "named", 12)
        }
    put = client.put(
        "/api/v1/admin/models/default/canary",
        json={"version": "v3", "percent": 50},
        headers=bearer(admin_token),
    )
    assert put.status_code == 200, put.get_json()
    picked = set()
    for _ in range(8):
        r = client.post(
            "/api/v1/batches", json={"prompts": ["a", "b"] * 4}, headers=bearer(user_token)
        )
        batch_id = uuid.UUID(r.get_json()["id"])
        with session_scope(engine) as session:
            rows = list(session.scalars(select(Job).where(Job.batch_id == batch_id)))
        # One pick per batch, drawn from the batch's id.
        assert len({(j.model_version_id, j.model_pick) for j in rows}) == 1
        expected = "canary" if canary_slot(batch_id) < 50 else "default"
        assert rows[0].model_pick == expected
        picked.add(expected)
    assert picked == {"canary", "default"}  # 8 draws at 50%: both, but for 1 in 128


def test_models_lists_every_servable_model_with_defaults_sizes_and_eval(
    client: FlaskClient, user_token: str, versions: dict[str, uuid.UUID]
) -> None:
    body = client.get("/api/v1/models", headers=bearer(user_token)).get_json()
    assert body["default"] == "v2" and body["canary"] is None
    by_name = {m["name"]: m for m in body["models"]}
    assert list(by_name) == ["v2", "v3", "shipped"]  # the active one first; old is retired
    assert by_name["v2"]["is_active"] and not by_name["shipped"]["is_active"]
    assert by_name["v2"]["eval"] == {"fid": 10.0, "n": 256} and by_name["v3"]["eval"] is None
    assert by_name["v3"]["defaults"]["steps"] == 12
    assert by_name["v3"]["sizes"] == {"default": 32, "min": 8, "max": 64, "multiple": 8}
    # The shipped model's weights, read from its safetensors header.
    assert by_name["shipped"]["parameters"] > 1_000_000
    assert by_name["shipped"]["checkpoint_bytes"] > 4 * by_name["shipped"]["parameters"] - 1
    retired = {v["name"]: v["retired_at"] for v in body["versions"]}
    assert retired["old"] is not None and retired["v3"] is None


# --- the eval gate ------------------------------------------------------------------------


def activate(client: FlaskClient, token: str, version_id: uuid.UUID, force: str = "") -> Any:
    query = f"?force={force}" if force else ""
    return client.post(f"/api/v1/admin/models/{version_id}/activate{query}", headers=bearer(token))


def is_active(engine: Engine, version_id: uuid.UUID) -> bool:
    with session_scope(engine) as session:
        version = session.get(ModelVersion, version_id)
        assert version is not None
        return version.is_active


REGRESSIONS: list[tuple[dict[str, Any] | None, list[str]]] = [
    ({"fid": 11.5, "n": 256, "adherence": 0.9}, ["FID 11.50 against 10.00", "+15.0%", "+10%"]),
    ({"fid": 10.2, "n": 256, "adherence": 0.8}, ["adherence 80.0% against 90.0%", "-10.0"]),
    (None, ["has no eval", "FID 10.00"]),
]


def test_activation_refuses_a_regression_with_409_naming_the_figures_unless_forced(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    active = add_version(engine, "a", metrics={"eval": {"fid": 10.0, "n": 256, "adherence": 0.9}})
    with session_scope(engine) as session:
        activate_version(session, active)
    for i, (candidate, words) in enumerate(REGRESSIONS):
        new = add_version(engine, f"b{i}", metrics={"eval": candidate} if candidate else {})
        r = activate(client, admin_token, new)
        assert_problem(r, 409, f"'b{i}' regresses against the active 'a'", "force", *words)
        assert is_active(engine, active) and not is_active(engine, new)
    assert audit(engine, "model.activate") == []

    r = activate(client, admin_token, new, force="true")
    assert r.status_code == 200, r.get_json()
    assert is_active(engine, new) and not is_active(engine, active)
    (event,) = audit(engine, "model.activate")
    assert event.detail["forced"] is True and event.detail["gate"]["passed"] is False
    assert event.detail["gate"]["active_eval"]["fid"] == 10.0


def test_activation_within_the_bounds_or_against_no_eval_passes_unforced(
    client: FlaskClient, admin_token: str, engine: Engine
) -> None:
    # No version active: the shipped model has no eval, so nothing to compare (and no eval
    # needed).
    first = add_version(engine, "first")
    assert activate(client, admin_token, first).status_code == 200
    with session_scope(engine) as session:
        session.get(ModelVersion, first).metrics = {"eval": {"fid": 10.0, "n": 256}}  # type: ignore[union-attr]
    better = add_version(engine, "better", metrics={"eval": {"fid": 10.9, "n": 256}})
    assert activate(client, admin_token, better).status_code == 200  # +9% < +10%
    events = audit(engine, "model.activate")
    assert [e.detail["forced"] for e in events] == [False, False]
    assert events[0].detail["gate"]["compared"] is False
    assert events[1].detail["gate"]["compared"] is True


def test_a_retired_version_cannot_be_activated_and_retiring_refuses_the_active_one(
    client: FlaskClient, admin_token: str, engine: Engine, versions: dict[str, uuid.UUID]
) -> None:
    assert_problem(activate(client, admin_token, versions["old"], "true"), 409, "retired")
    r = client.post(f"/api/v1/admin/models/{versions['v2']}/retire", headers=bearer(admin_token))
    assert_problem(r, 409, "active one")
    r = client.post(f"/api/v1/admin/models/{versions['v3']}/retire", headers=bearer(admin_token))
    assert r.status_code == 200
    assert "v3" not in {m["name"] for m in r.get_json()["models"]}
    r = client.post(f"/api/v1/admin/models/{uuid.uuid4()}/retire", headers=bearer(admin_token))
    assert_problem(r, 404)
    assert [e.detail["name"] for e in audit(engine, "model.retire")] == ["v3"]


# --- the canary -----------------------------------------------------------------------------


def test_the_canary_takes_its_share_by_job_id_records_it_and_ends(
    client: FlaskClient,
    user_token: str,
    admin_token: str,
    engine: Engine,
    versions: dict[str, uuid.UUID],
) -> None:
    r = client.put(
        "/api/v1/admin/models/default/canary",
        json={"version": "v3", "percent": 30},
        headers=bearer(admin_token),
    )
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["canary"] == {"version": "v3", "id": str(versions["v3"]), "percent": 30}
    picks = []
    for _ in range(24):
        job = post_job(client, user_token).get_json()
        slot = canary_slot(uuid.UUID(job["id"]))
        want = ("v3", "canary", 12) if slot < 30 else ("v2", "default", 31)
        got = (job["params"]["model"], job["params"]["model_pick"], job["params"]["steps"])
        assert got == want
        picks.append(got[1])
    assert 1 <= picks.count("canary") <= 17  # 30% of 24: outside this is a broken draw
    # A job that names its model is never the canary's.
    assert post_job(client, user_token, model="v2").get_json()["params"]["model_pick"] == "named"

    r = client.delete("/api/v1/admin/models/default/canary", headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["canary"] is None
    after = [post_job(client, user_token).get_json()["params"]["model"] for _ in range(10)]
    assert after == ["v2"] * 10
    assert [e.detail["percent"] for e in audit(engine, "model.canary")] == [30, 0]

    # Activating the canary's version ends the canary.
    body = {"version": str(versions["v3"]), "percent": 100}
    client.put("/api/v1/admin/models/default/canary", json=body, headers=bearer(admin_token))
    r = activate(client, admin_token, versions["v3"], "true")  # v3 has no eval, v2 has one
    assert r.status_code == 200 and r.get_json()["canary"] is None
    assert r.get_json()["default"] == "v3"


BAD_CANARIES: list[tuple[dict[str, Any], int, str | None]] = [
    ({"version": "v3", "percent": 101}, 422, "percent"),
    ({"version": "v3", "percent": -1}, 422, "percent"),
    ({"version": "v3", "percent": 10.5}, 422, "percent"),
    ({"version": "v3", "percent": "10"}, 422, "percent"),
    ({"version": "v3"}, 422, "percent"),
    ({"percent": 10}, 422, "version"),
    ({"version": "", "percent": 10}, 422, "version"),
    ({"version": "v3", "percent": 10, "extra": 1}, 422, "extra"),
    ({"version": "nope", "percent": 10}, 404, None),
    ({"version": "old", "percent": 10}, 409, None),
    ({"version": "v2", "percent": 10}, 409, None),
    ({"version": "ae", "percent": 10}, 409, None),
]


def test_a_bad_canary_is_refused_naming_the_field_and_changes_nothing(
    client: FlaskClient, admin_token: str, engine: Engine, versions: dict[str, uuid.UUID]
) -> None:
    for body, status, field in BAD_CANARIES:
        r = client.put(
            "/api/v1/admin/models/default/canary", json=body, headers=bearer(admin_token)
        )
        problem = assert_problem(r, status)
        if field is not None:
            assert [e["field"] for e in problem["errors"]] == [field], (body, problem)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).where(ModelVersion.canary_percent > 0)) == 0
    assert audit(engine, "model.canary") == []


ROLLOUT_CALLS = [
    ("put", "/api/v1/admin/models/default/canary"),
    ("delete", "/api/v1/admin/models/default/canary"),
    ("post", "/api/v1/admin/models/{v3}/retire"),
    ("post", "/api/v1/admin/models/{v3}/activate?force=true"),
]


def test_a_user_token_cannot_change_the_rollout(
    client: FlaskClient, user_token: str, engine: Engine, versions: dict[str, uuid.UUID]
) -> None:
    body = {"version": "v3", "percent": 50}
    for method, path in ROLLOUT_CALLS:
        url = path.format(v3=versions["v3"])
        assert_problem(getattr(client, method)(url, json=body, headers=bearer(user_token)), 403)
    with session_scope(engine) as session:
        v3 = session.get(ModelVersion, versions["v3"])
        assert v3 is not None
        assert (v3.canary_percent, v3.is_active, v3.retired_at) == (0, False, None)


def test_metrics_give_latency_and_failures_per_model_and_pick(
    client: FlaskClient, engine: Engine, versions: dict[str, uuid.UUID]
) -> None:
    v2, v3 = versions["v2"], versions["v3"]
    for latency in (1.5, 4.0):
        add_job(engine, "t", JobStatus.SUCCEEDED, seconds_ago=60, latency=latency,
                model_version_id=v2, model_pick="default")  # fmt: skip
    add_job(engine, "t", JobStatus.SUCCEEDED, seconds_ago=60, latency=40.0,
            model_version_id=v3, model_pick="canary")  # fmt: skip
    add_job(engine, "t", JobStatus.FAILED, seconds_ago=60, latency=3.0,
            model_version_id=v3, model_pick="canary")  # fmt: skip
    add_job(engine, "t", JobStatus.SUCCEEDED, seconds_ago=60, latency=0.3)  # shipped, no pick
    got = samples(client)
    canary = (("model", "v3"), ("pick", "canary"))
    assert got[("dq_model_jobs_recent", (*canary, ("status", "failed")))] == 1
    assert got[("dq_model_jobs_recent", (*canary, ("status", "succeeded")))] == 1
    assert got[("dq_model_job_latency_seconds_sum", canary)] == pytest.approx(40.0)
    active = (("model", "v2"), ("pick", "default"))
    assert got[("dq_model_job_latency_seconds_count", active)] == 2
    assert got[("dq_model_job_latency_seconds_bucket", (("le", "2.0"), *active))] == 1
    assert (
        got[("dq_model_jobs_recent", (("model", "default"), ("pick", ""), ("status", "succeeded")))]
        == 1
    )
    assert got[("dq_job_latency_seconds_count", ())] == 4  # all of them, as before


def test_with_one_set_of_sizes_the_document_keeps_plain_bounds(client: FlaskClient) -> None:
    """No version: default and shipped are the same model, so the sizes need no rules."""
    job_in = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]["JobIn"]
    assert "allOf" not in job_in
    assert job_in["properties"]["model"]["enum"] == ["default", "shipped", None]
    size = job_in["properties"]["size"]
    assert size["minimum"] == size["multipleOf"] and size["maximum"] > size["minimum"]


def test_the_api_document_names_the_servable_models_and_each_ones_sizes(
    client: FlaskClient, versions: dict[str, uuid.UUID]
) -> None:
    document = client.get("/api/v1/openapi.json").get_json()
    paths = document["paths"]
    assert {"put", "delete"} <= set(paths["/api/v1/admin/models/default/canary"])
    assert "/api/v1/admin/models/{version_id}/retire" in paths
    schemas = document["components"]["schemas"]
    assert schemas["CanaryIn"]["properties"]["percent"]["maximum"] == 100
    for name in ("JobIn", "BatchIn"):
        body = schemas[name]
        # Retired versions and autoencoders are not offered; null and default are.
        assert body["properties"]["model"]["enum"] == ["default", "shipped", "v2", "v3", None]
        rules = {
            json.dumps(rule["if"]["properties"]["model"]): rule["then"]["properties"]["size"]
            for rule in body["allOf"]
            if "if" in rule
        }
        bounds = {"minimum": 8, "maximum": 128, "multipleOf": 8}  # the active v2: 64 px
        assert rules[json.dumps({"enum": [None, "default"]})] == bounds
        assert rules[json.dumps({"const": "v2"})] == bounds
        assert rules[json.dumps({"const": "v3"})] == {**bounds, "maximum": 64}  # 32 px


def test_the_admin_page_activates_behind_the_gate_and_activate_anyway_is_audited(
    client: FlaskClient, admin_token: str, engine: Engine, versions: dict[str, uuid.UUID]
) -> None:
    from tests.web.test_admin_pages import log_in, post

    log_in(client, admin_token)
    html = client.get("/admin/models").get_data(as_text=True)
    # An eval with only the contract's fields (no floor, adherence or reference) shows.
    assert "FID 10.00 at N = 256" in html and "retired" in html
    assert post(client, f"/admin/models/{versions['v3']}/activate").status_code == 303
    html = client.get("/admin/models").get_data(as_text=True)
    assert "Not activated: model version &#39;v3&#39; regresses" in html
    assert not is_active(engine, versions["v3"])
    assert post(client, f"/admin/models/{versions['v3']}/activate", force="1").status_code == 303
    assert is_active(engine, versions["v3"])
    (event,) = audit(engine, "model.activate")
    assert event.detail["forced"] is True


def test_the_form_offers_the_models_with_their_defaults_and_submits_the_chosen_one(
    client: FlaskClient, engine: Engine, versions: dict[str, uuid.UUID]
) -> None:
    from tests.web.test_pages import field_errors, submit

    html = client.get("/").get_data(as_text=True)
    options = re.findall(r'<option[^>]*value="([^"]+)"[^>]*>([^<]*)</option>', html)
    assert [v for v, _ in options if v in ("default", "v2", "v3", "shipped", "old")] == [
        "default",
        "v2",
        "v3",
        "shipped",
    ]
    assert ("default", "default (v2)") in options
    found = re.search(r'<script type="application/json" id="model-defaults">(.*?)</script>', html)
    assert found is not None
    defaults = json.loads(found.group(1))
    assert defaults["v3"] == {"steps": 12, "guidance": 5.5, "sampler": "dpmpp-2m"}
    assert defaults["default"]["steps"] == 31

    r = submit(client, model="v3", steps="12")
    assert r.status_code == 303, r.get_data(as_text=True)
    with session_scope(engine) as session:
        (job,) = session.scalars(select(Job))
        assert (job.model_version_id, job.model_pick) == (versions["v3"], "named")
    r = submit(client, model="old")
    assert r.status_code == 422
    assert field_errors(r.get_data(as_text=True), "model") == [
        "model &#39;old&#39; is retired; GET /api/v1/models lists them"
    ]
    assert counts(engine) == (1, 0)
