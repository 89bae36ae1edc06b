"""Finishing touches on the OpenAPI document that apiflask writes from the schemas.

- Error responses are ``application/problem+json`` (RFC 9457), as the app sends them.
- Limits that come from the settings are written in with their values on this deployment.
- Path parameters that Flask matches as UUIDs say so (``format: uuid``).
- Every operation carries its tag (Jobs or Admin), which apiflask leaves out once ``TAGS``
  describes the tags, so the docs page groups the operations.
"""

from __future__ import annotations

import re
from typing import Any

from werkzeug.routing import Map, UUIDConverter

from core.settings import Settings

DESCRIPTION = """\
Text-to-image generation jobs and, for admins, training runs and model versions.

Authenticate with `Authorization: Bearer <token>`; an operator makes tokens with
`dq token create --role user|admin`. Submissions are rate limited per token (429 with
Retry-After). Every error is an RFC 9457 problem (`application/problem+json`) whose `detail` is
a sentence to show a person; a 422 also lists the fields at fault in `errors`.
"""


def _uuid_parameters(url_map: Map) -> set[tuple[str, str]]:
    """(OpenAPI path, parameter name) of every ``<uuid:…>`` converter."""
    found = set()
    for rule in url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for name, converter in rule._converters.items():
            if isinstance(converter, UUIDConverter):
                found.add((path, name))
    return found


def operation_tag(path: str) -> str:
    return "Admin" if path.startswith("/api/v1/admin/") else "Jobs"


def finish_spec(spec: dict[str, Any], settings: Settings, url_map: Map) -> dict[str, Any]:
    uuids = _uuid_parameters(url_map)
    for path_name, path in spec.get("paths", {}).items():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            operation.setdefault("tags", [operation_tag(path_name)])
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and (path_name, parameter["name"]) in uuids:
                    parameter["schema"] = {"type": "string", "format": "uuid"}
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[:1] in ("4", "5") and "application/json" in content:
                    content["application/problem+json"] = content.pop("application/json")
    schemas = spec.get("components", {}).get("schemas", {})
    job_in = schemas.get("JobIn", {}).get("properties", {})
    if job_in:
        job_in["prompt"]["maxLength"] = settings.max_prompt_chars
        job_in["negative_prompt"]["maxLength"] = settings.max_prompt_chars
        job_in["steps"]["maximum"] = settings.max_steps
        job_in["num_images"]["maximum"] = settings.max_images_per_job
    return spec
