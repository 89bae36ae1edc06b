"""Property-based tests of REST API v1 against its own OpenAPI document, over HTTP.

The app runs in a real HTTP server (werkzeug's, threaded) on the real PostgreSQL. For every
operation in the document, once with a user token and once with an admin token, generated
requests (valid ones, and invalid ones where the operation takes input) go through every check
Schemathesis has (``--checks all``): no 5xx; status code, content type, headers and body as
documented; invalid input refused; valid input accepted (2xx, or a documented 401/403/404/409/
429); authentication not ignored. The rules that span fields or depend on the serving model are
in the document (a request seed is at most 2**62, so seed + i never overflows; the sizes of the
serving model are written in as the document is served), so a client generated from it knows
them.

Then Schemathesis's stateful phase over three flows (jobs, batches, admin): sequences of calls
that follow the document's links, through the same checks, so that the routes taking an id (a
job, its event stream, its webhook delivery, a batch, a training run) get ids the server made,
not only random ones that 404.

Schemathesis's own pytest plugin reads a private pytest attribute that pytest 9.2 removed, so the
operations are driven through ``APIOperation.as_strategy`` with Hypothesis's ``@given``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS
from sqlalchemy.engine import Engine
from werkzeug.serving import make_server

from core.db import Base, make_engine, session_scope
from core.runtime.settings import Settings
from core.services.tokens import create_token
from tests.services import postgres_schema
from tests.web.conftest import RecordingPublisher, bearer, make_settings

EXAMPLES_PER_OPERATION = 15
STATEFUL_SCENARIOS = 25
STATEFUL_STEPS = 12
# An event stream stays open while its job waits: Schemathesis reads what it has sent until the
# stream is this long silent (the server's heartbeat is slower).
STREAM_READ_SECONDS = 0.5


def _document() -> dict[str, Any]:
    """The served document, from an app that never touches its (in-memory) database."""
    from web import create_app

    settings = Settings.from_env(
        {}, database_url="sqlite://", storage_url="file:///nonexistent", secret_key="x"
    )
    app = create_app(settings, publisher=RecordingPublisher())
    document: dict[str, Any] = app.test_client().get("/api/v1/openapi.json").get_json()
    return document


OPERATIONS = [
    (method.upper(), path)
    for path, item in _document()["paths"].items()
    for method in item
    if method in ("get", "post", "put", "patch", "delete")
]


def test_every_endpoint_of_the_api_is_in_the_document() -> None:
    assert sorted(OPERATIONS) == [
        ("DELETE", "/api/v1/admin/models/default/canary"),
        ("GET", "/api/v1/admin/audit"),
        ("GET", "/api/v1/admin/training-runs"),
        ("GET", "/api/v1/admin/training-runs/{run_id}"),
        ("GET", "/api/v1/admin/webhooks/failing"),
        ("GET", "/api/v1/batches"),
        ("GET", "/api/v1/batches/{batch_id}"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/{job_id}"),
        ("GET", "/api/v1/jobs/{job_id}/events"),
        ("GET", "/api/v1/jobs/{job_id}/webhooks"),
        ("GET", "/api/v1/me"),
        ("GET", "/api/v1/models"),
        ("GET", "/api/v1/webhooks/secret"),
        ("POST", "/api/v1/admin/models/default/activate"),
        ("POST", "/api/v1/admin/models/{version_id}/activate"),
        ("POST", "/api/v1/admin/models/{version_id}/retire"),
        ("POST", "/api/v1/admin/tokens/{token_id}/revoke"),
        ("POST", "/api/v1/admin/training-runs"),
        ("POST", "/api/v1/admin/training-runs/{run_id}/cancel"),
        ("POST", "/api/v1/batches"),
        ("POST", "/api/v1/batches/{batch_id}/cancel"),
        ("POST", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs/{job_id}/cancel"),
        ("POST", "/api/v1/jobs/{job_id}/webhooks/{delivery_id}/replay"),
        ("POST", "/api/v1/uploads"),
        ("POST", "/api/v1/webhooks/secret/rotate"),
        ("PUT", "/api/v1/admin/models/default/canary"),
        ("PUT", "/api/v1/admin/tokens/{token_id}/weight"),
    ]


@dataclass
class LiveApi:
    base_url: str
    tokens: dict[str, str]  # role -> plaintext token
    engine: Engine  # to make more tokens


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    from web import create_app

    tmp_path = tmp_path_factory.mktemp("schemathesis")
    with postgres_schema() as url:
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        tokens = {}
        with session_scope(engine) as session:
            for role in ("user", "admin"):
                tokens[role] = create_token(session, role, f"schemathesis {role}")[1]
        # Generated submissions must not run into the limits and caps; they have their tests.
        lifted = make_settings(
            url,
            tmp_path,
            rate_limit="1000000/minute",
            global_rate_limit="1000000/minute",
            max_active_jobs_per_owner=1_000_000,
            max_queued_jobs=1_000_000,
            # A stream the client stopped reading ends at the next heartbeat it cannot send.
            sse_heartbeat_seconds=1.0,
        )
        app = create_app(lifted, publisher=RecordingPublisher())
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield LiveApi(f"http://127.0.0.1:{server.server_port}", tokens, engine)
        finally:
            server.shutdown()
            thread.join(timeout=10)
            hub = app.extensions.get("dq_event_hub")  # made by the first event stream
            if hub is not None:
                hub.close()  # before its tables go with the schema
            engine.dispose()


def _schema(api: LiveApi, token: str) -> Any:
    # Credentials for the document's BearerAuth scheme: Schemathesis sends them with every
    # request, and its auth check also sends each operation without them and with a wrong
    # token, expecting 401. The stateful runs follow the document's own links only, none that
    # Schemathesis would infer.
    config = schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"BearerAuth": {"bearer": token}}},
            "phases": {"stateful": {"inference": {"algorithms": []}}},
        }
    )
    return schemathesis.openapi.from_url(f"{api.base_url}/api/v1/openapi.json", config=config)


@pytest.mark.parametrize("role", ["user", "admin"])
# Revoking last: the admin's run of it may revoke the user token (the admin's own is refused).
@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS, key=lambda op: "revoke" in op[1]))
def test_operation_conforms_to_the_document(
    live_api: LiveApi, role: str, method: str, path: str
) -> None:
    operation = _schema(live_api, live_api.tokens[role])[path][method]
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    definition = operation.definition.raw
    takes_input = bool(definition.get("parameters") or definition.get("requestBody"))
    if takes_input:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    calls = []
    every_check = CHECKS.get_all()

    @given(case=st.one_of(strategies))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: Any) -> None:
        checks = every_check
        if _sends_images(path, case) or _fine_tunes(path, case):
            # What an image holds (that it decodes, its size beside its mask's, that an upload
            # id is yours) is beyond a schema, and so is what a fine-tune may change (its base's
            # architecture and size): such a request may be refused with 422 although the
            # document admits it; tests/web/test_uploads.py and test_finetune_api.py check
            # each refusal.
            checks = [c for c in every_check if c.__name__ != "positive_data_acceptance"]
        response = case.call_and_validate(base_url=live_api.base_url, checks=checks)
        calls.append(response.status_code)

    run()
    # An operation without input has one request to make; Hypothesis makes it and stops.
    assert len(calls) >= (EXAMPLES_PER_OPERATION if takes_input else 1)
    assert not any(code >= 500 for code in calls)
    if role == "user" and path.startswith("/api/v1/admin/"):
        assert set(calls) <= {401, 403, 404, 405, 422}, calls


def _sends_images(path: str, case: Any) -> bool:
    """An upload, or a job or batch that names an init image, a mask or a strength."""
    if path == "/api/v1/uploads":
        return True
    body = case.body if isinstance(case.body, dict) else {}
    return any(body.get(name) is not None for name in ("init_image", "mask", "strength"))


def _fine_tunes(path: str, case: Any) -> bool:
    """A training run that starts from a base version."""
    body = case.body if isinstance(case.body, dict) else {}
    return path == "/api/v1/admin/training-runs" and body.get("base_version") is not None


def test_every_integer_parameter_is_bounded_within_64_bits() -> None:
    parameters = [
        (path, parameter["name"], parameter["schema"])
        for path, item in _document()["paths"].items()
        for operation in item.values()
        for parameter in operation.get("parameters", [])
        if parameter["schema"].get("type") == "integer"
    ]
    assert ("/api/v1/jobs/{job_id}/webhooks/{delivery_id}/replay", "delivery_id") in {
        (path, name) for path, name, _ in parameters
    }
    for path, name, schema in parameters:
        assert -(2**63) <= schema["minimum"] <= schema["maximum"] <= 2**63 - 1, (path, name)


def test_every_link_leads_to_an_operation_and_fills_its_path_parameters() -> None:
    document = _document()
    links = [
        (f"{method} {path} {status}", name, link)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for status, response in operation["responses"].items()
        for name, link in response.get("links", {}).items()
    ]
    assert len(links) >= 20
    for source, name, link in links:
        ref = link["operationRef"]
        assert ref.startswith("#/paths/"), (source, name)
        pointer, _, method = ref.removeprefix("#/paths/").rpartition("/")
        target = unquote(pointer).replace("~1", "/").replace("~0", "~")
        operation = document["paths"][target][method]
        wanted = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert set(link["parameters"]) == wanted, (source, name)
        assert all(v.startswith("$response.body#/") for v in link["parameters"].values())


@dataclass(frozen=True)
class Flow:
    """A stateful run: the operations taking part (a regular expression over their paths), who
    calls them, and the operations that must answer 2xx at least once, given ids the server made."""

    paths: str
    role: str
    reaches: frozenset[tuple[str, str]]
    # Made before the run, where Schemathesis starts no chain: it does not begin one at a POST
    # whose body names a resource (a run's autoencoder version) that no operation makes.
    seeds: tuple[tuple[str, dict[str, Any]], ...] = ()


JOB = "/api/v1/jobs/{job_id}"
FLOWS = {
    "jobs": Flow(
        r"^/api/v1/jobs",
        "user",
        frozenset(
            {
                ("GET", JOB),
                ("POST", f"{JOB}/cancel"),
                ("GET", f"{JOB}/events"),
                ("GET", f"{JOB}/webhooks"),
                ("POST", f"{JOB}/webhooks/{{delivery_id}}/replay"),
            }
        ),
    ),
    "batches": Flow(
        r"^/api/v1/(batches|jobs/\{job_id\}$)",
        "user",
        frozenset(
            {
                ("GET", "/api/v1/batches/{batch_id}"),
                ("POST", "/api/v1/batches/{batch_id}/cancel"),
                ("GET", JOB),
            }
        ),
    ),
    "admin": Flow(
        r"^/api/v1/(admin/|models$)",
        "admin",
        frozenset(
            {
                ("GET", "/api/v1/admin/training-runs/{run_id}"),
                ("POST", "/api/v1/admin/training-runs/{run_id}/cancel"),
            }
        ),
        seeds=(
            ("/api/v1/admin/training-runs", {"kind": "denoiser", "dataset": {"kind": "shapes"}}),
        ),
    ),
}
HOOK = "https://hooks.example.com/dq"


@pytest.mark.parametrize("flow", list(FLOWS))
def test_linked_sequences_conform_to_the_document(live_api: LiveApi, flow: str) -> None:
    spec = FLOWS[flow]
    with session_scope(live_api.engine) as session:  # its own: an admin's run may revoke any
        token = create_token(session, spec.role, f"schemathesis stateful {flow}")[1]
    for path, body in spec.seeds:
        r = requests.post(f"{live_api.base_url}{path}", json=body, headers=bearer(token))
        assert r.status_code == 202, r.text
    schema = _schema(live_api, token).include(path_regex=spec.paths)
    every_check = CHECKS.get_all()
    calls: list[tuple[str, str, int]] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            # Jobs with a webhook, so that a canceled one has a delivery to replay.
            body = case.body
            positive = case.meta is None or case.meta.generation.mode.is_positive
            if case.operation.path == "/api/v1/jobs" and isinstance(body, dict) and positive:
                body["webhook"] = body.get("webhook") or HOOK
                body.pop("webhook_events_filter", None)
            if case.operation.path in ("/api/v1/jobs", "/api/v1/batches") and positive:
                # Text-to-image: what makes an image usable is beyond the schema (see
                # _sends_images), and these runs are about the ids the answers link.
                for name in ("init_image", "mask", "strength"):
                    if isinstance(body, dict):
                        body.pop(name, None)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            kwargs: dict[str, Any] = {"base_url": live_api.base_url}
            if case.operation.path.endswith("/events"):
                kwargs["timeout"] = STREAM_READ_SECONDS
            return kwargs

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            operation = case.operation
            calls.append((operation.method.upper(), operation.path, response.status_code))
            case.validate_response(
                response, checks=every_check, transport_kwargs=kwargs, recorder=self.recorder
            )

    # A step draws from earlier responses, and the server may have moved on when Hypothesis draws
    # a scenario again (FlakyStrategyDefinition). What ran was checked; the assertions below say
    # whether it was enough.
    with contextlib.suppress(FlakyStrategyDefinition):
        Workflow.run(
            settings=settings(
                max_examples=STATEFUL_SCENARIOS,
                stateful_step_count=STATEFUL_STEPS,
                # Each scenario once, against a server whose state moves on: nothing to replay
                # or shrink (as in Schemathesis's own stateful phase).
                phases=[Phase.generate],
                # The same scenarios on every run, so that what they reach cannot flake.
                derandomize=True,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
        )
    assert not any(code >= 500 for _, _, code in calls)
    reached = {(method, path) for method, path, code in calls if 200 <= code < 300}
    assert spec.reaches <= reached, sorted(spec.reaches - reached)
