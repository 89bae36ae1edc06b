"""Property-based tests of REST API v1 against its own OpenAPI document, served in-process.

For every operation in the document, 200 generated requests (valid ones, and invalid ones where
the operation takes input) must get no 5xx and no response that breaks the document: status code,
content type, headers and body all as documented, and invalid input refused. Every default check
of Schemathesis runs but one: "schema-valid data is accepted" cannot hold, because some rules
span fields or depend on the serving model (seed + num_images stays below 2**63; size is a
multiple of the model's; a dataset's options depend on its kind), and core answers those with a
422 that names the field.

Schemathesis's own pytest plugin reads a private pytest attribute that pytest 9.2 removed, so the
operations are driven through ``APIOperation.as_strategy`` with Hypothesis's ``@given``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy.engine import Engine

from core.db import session_scope
from core.settings import Settings
from core.tokens import create_token
from tests.web.conftest import RecordingPublisher, make_settings

EXAMPLES_PER_OPERATION = 200


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
        ("GET", "/api/v1/admin/training-runs"),
        ("GET", "/api/v1/admin/training-runs/{run_id}"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/{job_id}"),
        ("GET", "/api/v1/models"),
        ("POST", "/api/v1/admin/models/default/activate"),
        ("POST", "/api/v1/admin/models/{version_id}/activate"),
        ("POST", "/api/v1/admin/training-runs"),
        ("POST", "/api/v1/admin/training-runs/{run_id}/cancel"),
        ("POST", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs/{job_id}/cancel"),
    ]


@pytest.fixture
def api_schema(db_url: str, tmp_path: Path, engine: Engine) -> Any:
    from web import create_app

    app = create_app(
        # Generated submissions must not run into the rate limit; it has its own test.
        make_settings(db_url, tmp_path, rate_limit="1000000/minute"),
        publisher=RecordingPublisher(),
    )
    with session_scope(engine) as session:
        _, token = create_token(session, "admin", "schemathesis")
    # Credentials for the document's BearerAuth scheme: Schemathesis sends them with every
    # request, and its auth check also sends each operation without them and with a wrong
    # token, expecting 401.
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"BearerAuth": {"bearer": token}}}})
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app, config=config)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_operation_conforms_to_the_document(api_schema: Any, method: str, path: str) -> None:
    operation = api_schema[path][method]
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    definition = operation.definition.raw
    takes_input = bool(definition.get("parameters") or definition.get("requestBody"))
    if takes_input:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    calls = []

    @given(case=st.one_of(strategies))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        calls.append(response.status_code)

    run()
    # An operation without input has one request to make; Hypothesis makes it and stops.
    assert len(calls) >= (EXAMPLES_PER_OPERATION if takes_input else 1)
    assert not any(code >= 500 for code in calls)
