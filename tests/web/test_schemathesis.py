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

Schemathesis's own pytest plugin reads a private pytest attribute that pytest 9.2 removed, so the
operations are driven through ``APIOperation.as_strategy`` with Hypothesis's ``@given``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS
from werkzeug.serving import make_server

from core.db import Base, make_engine, session_scope
from core.runtime.settings import Settings
from core.services.tokens import create_token
from tests.services import postgres_schema
from tests.web.conftest import RecordingPublisher, make_settings

EXAMPLES_PER_OPERATION = 100


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
        ("GET", "/api/v1/models"),
        ("GET", "/api/v1/webhooks/secret"),
        ("POST", "/api/v1/admin/models/default/activate"),
        ("POST", "/api/v1/admin/models/{version_id}/activate"),
        ("POST", "/api/v1/admin/tokens/{token_id}/revoke"),
        ("POST", "/api/v1/admin/training-runs"),
        ("POST", "/api/v1/admin/training-runs/{run_id}/cancel"),
        ("POST", "/api/v1/batches"),
        ("POST", "/api/v1/batches/{batch_id}/cancel"),
        ("POST", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs/{job_id}/cancel"),
        ("POST", "/api/v1/jobs/{job_id}/webhooks/{delivery_id}/replay"),
        ("POST", "/api/v1/webhooks/secret/rotate"),
        ("PUT", "/api/v1/admin/tokens/{token_id}/weight"),
    ]


@dataclass
class LiveApi:
    base_url: str
    tokens: dict[str, str]  # role -> plaintext token


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
        engine.dispose()
        # Generated submissions must not run into the limits and caps; they have their tests.
        lifted = make_settings(
            url,
            tmp_path,
            rate_limit="1000000/minute",
            global_rate_limit="1000000/minute",
            max_active_jobs_per_owner=1_000_000,
            max_queued_jobs=1_000_000,
        )
        app = create_app(lifted, publisher=RecordingPublisher())
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield LiveApi(f"http://127.0.0.1:{server.server_port}", tokens)
        finally:
            server.shutdown()
            thread.join(timeout=10)


def _schema(api: LiveApi, role: str) -> Any:
    # Credentials for the document's BearerAuth scheme: Schemathesis sends them with every
    # request, and its auth check also sends each operation without them and with a wrong
    # token, expecting 401.
    config = schemathesis.Config.from_dict(
        {"auth": {"openapi": {"BearerAuth": {"bearer": api.tokens[role]}}}}
    )
    return schemathesis.openapi.from_url(f"{api.base_url}/api/v1/openapi.json", config=config)


@pytest.mark.parametrize("role", ["user", "admin"])
# Revoking last: the admin's run of it may revoke the user token (the admin's own is refused).
@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS, key=lambda op: "revoke" in op[1]))
def test_operation_conforms_to_the_document(
    live_api: LiveApi, role: str, method: str, path: str
) -> None:
    operation = _schema(live_api, role)[path][method]
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
        response = case.call_and_validate(base_url=live_api.base_url, checks=every_check)
        calls.append(response.status_code)

    run()
    # An operation without input has one request to make; Hypothesis makes it and stops.
    assert len(calls) >= (EXAMPLES_PER_OPERATION if takes_input else 1)
    assert not any(code >= 500 for code in calls)
    if role == "user" and path.startswith("/api/v1/admin/"):
        assert set(calls) <= {401, 403, 404, 405, 422}, calls
