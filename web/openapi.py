"""Finishing touches on the OpenAPI document that apiflask writes from the schemas.

- Error responses are ``application/problem+json`` (RFC 9457), as the app sends them.
- Limits that come from the settings are written in with their values on this deployment.
- Path parameters say what Flask's converter matches: a UUID (``format: uuid``), or an integer
  id in the range of its column (:mod:`web.converters`).
- Every operation carries its tag (Jobs or Admin), which apiflask leaves out once ``TAGS``
  describes the tags, so the docs page groups the operations.
- Where an id in one response is a path parameter of the next request, the response says so
  with an OpenAPI link (:data:`LINKS`).
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import quote

from werkzeug.routing import Map, UUIDConverter

from core.runtime.settings import Settings
from core.services.batches import PLACEHOLDER_NAME
from core.services.jobs import size_bounds
from core.services.model_versions import DEFAULT_MODEL_NAME, ServingModel
from web.converters import IdConverter
from web.schemas import run_kind_rules

DESCRIPTION = """\
Text-to-image generation jobs and, for admins, training runs and model versions.

Authenticate with `Authorization: Bearer <token>`; an operator makes tokens with
`dq token create --role user|admin`. Submissions are rate limited per token (429 with
Retry-After). Every error is an RFC 9457 problem (`application/problem+json`) whose `detail` is
a sentence to show a person; a 422 also lists the fields at fault in `errors`.
"""


def _class_of(chars: list[int]) -> str:
    return "".join(f"\\u{c:04x}" for c in chars)


# Whitespace as Python's str.strip() sees it (which core.services.jobs uses to call a prompt blank),
# spelled out: the \s of JSON Schema's regular expressions leaves out some of it (\x1c-\x1f).
BLANK = _class_of([c for c in range(0x10000) if chr(c).isspace()])
TEXT_CHAR = r"[^\x00]"
"""A character that the database can store in a prompt (a regular expression; lone surrogates,
which JSON can escape but no regular expression dialect of JSON Schema can name, are refused
too)."""


def _path_parameters(url_map: Map) -> dict[tuple[str, str], dict[str, Any]]:
    """The schema of each (OpenAPI path, parameter name) that a ``<uuid:…>`` or an id converter
    matches."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for rule in url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for name, converter in rule._converters.items():
            if isinstance(converter, UUIDConverter):
                found[path, name] = {"type": "string", "format": "uuid"}
            elif isinstance(converter, IdConverter):
                found[path, name] = {
                    "type": "integer",
                    "minimum": converter.minimum,
                    "maximum": converter.maximum,
                }
    return found


JOB = "/api/v1/jobs/{job_id}"
BATCH = "/api/v1/batches/{batch_id}"
RUN = "/api/v1/admin/training-runs/{run_id}"
WEBHOOKS = f"{JOB}/webhooks"
REPLAY = f"{WEBHOOKS}/{{delivery_id}}/replay"
TOKEN = "/api/v1/admin/tokens/{token_id}"
_ID = "$response.body#/id"

# The routes a job id leads to: name -> (method, path).
_JOB_ROUTES = {
    "GetJob": ("get", JOB),
    "CancelJob": ("post", f"{JOB}/cancel"),
    "FollowJob": ("get", f"{JOB}/events"),
    "GetJobWebhooks": ("get", WEBHOOKS),
}


def _with_job(source: str, *names: str) -> dict[str, tuple[str, str, dict[str, str]]]:
    return {name: (*_JOB_ROUTES[name], {"job_id": source}) for name in names}


# (method, path, status) of a response -> its links: name -> (method, path, parameters) of the
# request it leads to, each parameter a runtime expression over the response. A client follows
# them, and so does Schemathesis's stateful phase, which thus calls the routes that take an id
# with ids the server made (a job with a webhook, once canceled, has a delivery to replay).
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("post", "/api/v1/jobs", "202"): _with_job(_ID, *_JOB_ROUTES),
    ("get", "/api/v1/jobs", "200"): _with_job(
        "$response.body#/jobs/0/id", "GetJob", "GetJobWebhooks"
    ),
    ("get", JOB, "200"): _with_job(_ID, "CancelJob", "FollowJob", "GetJobWebhooks"),
    ("post", f"{JOB}/cancel", "200"): _with_job(_ID, "GetJob", "FollowJob", "GetJobWebhooks"),
    ("get", WEBHOOKS, "200"): {
        "ReplayDelivery": (
            "post",
            REPLAY,
            {"job_id": "$response.body#/job_id", "delivery_id": "$response.body#/deliveries/0/id"},
        )
    },
    ("post", REPLAY, "202"): {
        "GetJobWebhooks": ("get", WEBHOOKS, {"job_id": "$response.body#/job_id"})
    },
    ("post", "/api/v1/batches", "202"): {
        "GetBatch": ("get", BATCH, {"batch_id": _ID}),
        "CancelBatch": ("post", f"{BATCH}/cancel", {"batch_id": _ID}),
        **_with_job("$response.body#/jobs/0/id", "GetJob"),
    },
    ("get", "/api/v1/batches", "200"): {
        "GetBatch": ("get", BATCH, {"batch_id": "$response.body#/batches/0/id"})
    },
    ("get", BATCH, "200"): {
        "CancelBatch": ("post", f"{BATCH}/cancel", {"batch_id": _ID}),
        **_with_job("$response.body#/jobs/0/id", "GetJob"),
    },
    ("post", f"{BATCH}/cancel", "200"): {"GetBatch": ("get", BATCH, {"batch_id": _ID})},
    ("post", "/api/v1/admin/training-runs", "202"): {
        "GetRun": ("get", RUN, {"run_id": _ID}),
        "CancelRun": ("post", f"{RUN}/cancel", {"run_id": _ID}),
    },
    ("get", "/api/v1/admin/training-runs", "200"): {
        "GetRun": ("get", RUN, {"run_id": "$response.body#/runs/0/id"})
    },
    ("get", RUN, "200"): {"CancelRun": ("post", f"{RUN}/cancel", {"run_id": _ID})},
    ("get", "/api/v1/models", "200"): {
        "ActivateVersion": (
            "post",
            "/api/v1/admin/models/{version_id}/activate",
            {"version_id": "$response.body#/versions/0/id"},
        )
    },
    ("post", f"{TOKEN}/revoke", "200"): {
        "SetTokenWeight": ("put", f"{TOKEN}/weight", {"token_id": _ID})
    },
}


def _operation_ref(method: str, path: str) -> str:
    """The operation as a URI reference into this document (a JSON Pointer, RFC 6901)."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return f"#/paths/{quote(pointer, safe='~')}/{method}"


def _links(spec: dict[str, Any]) -> None:
    for (method, path, status), links in LINKS.items():
        response = spec["paths"][path][method]["responses"][status]
        response["links"] = {
            name: {"operationRef": _operation_ref(to_method, to_path), "parameters": parameters}
            for name, (to_method, to_path, parameters) in links.items()
        }


def operation_tag(path: str) -> str:
    return "Admin" if path.startswith("/api/v1/admin/") else "Jobs"


def finish_spec(spec: dict[str, Any], settings: Settings, url_map: Map) -> dict[str, Any]:
    path_parameters = _path_parameters(url_map)
    for path_name, path in spec.get("paths", {}).items():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            operation.setdefault("tags", [operation_tag(path_name)])
            if "requestBody" in operation:  # every body this API takes is required
                operation["requestBody"]["required"] = True
            for parameter in operation.get("parameters", []):
                schema = path_parameters.get((path_name, parameter["name"]))
                if parameter.get("in") == "path" and schema is not None:
                    parameter["schema"] = dict(schema)
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[:1] in ("4", "5") and "application/json" in content:
                    content["application/problem+json"] = content.pop("application/json")
    schemas = spec.get("components", {}).get("schemas", {})
    job_in = schemas.get("JobIn", {}).get("properties", {})
    if job_in:
        job_in["prompt"]["maxLength"] = settings.max_prompt_chars
        # As core.services.jobs checks them: no NUL, and the prompt not blank.
        job_in["prompt"]["minLength"] = 1
        job_in["prompt"]["pattern"] = rf"^{TEXT_CHAR}*[^{BLANK}\x00]{TEXT_CHAR}*$"
        job_in["negative_prompt"]["pattern"] = rf"^{TEXT_CHAR}*$"
        job_in["negative_prompt"]["maxLength"] = settings.max_prompt_chars
        job_in["steps"]["maximum"] = settings.max_steps
        job_in["num_images"]["maximum"] = settings.max_images_per_job
    batch_in = schemas.get("BatchIn")
    if batch_in and job_in:  # web.batches: a job's settings, its prompt rules, and the cap
        shared = ("negative_prompt", "steps", "num_images", "webhook")
        batch_in["properties"].update({k: dict(job_in[k]) for k in shared if k in job_in})
        prompt = {k: job_in["prompt"][k] for k in ("type", "minLength", "maxLength", "pattern")}
        cap = settings.max_batch_items
        batch_in["properties"]["prompts"].update(minItems=1, maxItems=cap, items=prompt)
        batch_in["oneOf"] = [{"required": ["prompts"]}, {"required": ["matrix"]}]
        matrix = schemas["PromptMatrixIn"]["properties"]
        matrix["template"].update(prompt)
        matrix["values"]["propertyNames"] = {"pattern": f"^{PLACEHOLDER_NAME}$"}
        value = {"type": "string", "maxLength": settings.max_prompt_chars}
        value["pattern"] = rf"^{TEXT_CHAR}*$"
        matrix["values"]["additionalProperties"].update(minItems=1, maxItems=cap, items=value)
    run_in = schemas.get("TrainingRunIn")
    if run_in:
        run_in["allOf"] = run_kind_rules()
    _links(spec)
    return spec


def with_serving_model(
    document: dict[str, Any],
    model: ServingModel,
    named: dict[str, ServingModel] | None = None,
    canary: ServingModel | None = None,
) -> dict[str, Any]:
    """The models a request may name and the sizes each takes, written into the document as it
    is served (they change while the app runs, so this is not part of the cached document).

    ``model`` serves ``default``; ``named`` are the other names (``shipped`` and each servable
    version); a request without a model, or with ``default``, must fit the serving model and
    the canary both (it may run on either). Each name's sizes are a rule of JobIn and BatchIn
    (if model is that name, then size is within its bounds)."""
    schemas = document.get("components", {}).get("schemas", {})
    base = schemas.get("TrainingRunIn", {}).get("properties", {}).get("base_version")
    if isinstance(base, dict) and named is not None:  # a fine-tune's base, named as a model
        base["enum"] = [DEFAULT_MODEL_NAME, *named, None]
    job_in = schemas.get("JobIn", {})
    size = job_in.get("properties", {}).get("size")
    if not isinstance(size, dict):
        return document
    smallest, largest = size_bounds(model)
    step = smallest
    if canary is not None:  # a default request may run on the canary: sizes both take
        lo, hi = size_bounds(canary)
        step = math.lcm(smallest, lo)
        smallest, largest = max(smallest, lo) + (-max(smallest, lo)) % step, min(largest, hi)
    size["description"] = (
        f"Side in pixels: a multiple of {step} from {smallest} to {largest} for the serving "
        f"model ({model.name}); null: its own ({model.image_size}). A model named in the "
        "request has its own sizes (GET /api/v1/models)."
    )
    default_bounds = {"minimum": smallest, "maximum": largest, "multipleOf": step}
    rules = []
    if named is not None:
        for name, other in named.items():
            lo, hi = size_bounds(other)
            bounds = {"minimum": lo, "maximum": hi, "multipleOf": lo}
            rules.append(_size_rule({"const": name}, True, bounds))
        model_field = job_in["properties"].get("model")
        if isinstance(model_field, dict):
            model_field["enum"] = [DEFAULT_MODEL_NAME, *named, None]
    if all(rule["then"]["properties"]["size"] == default_bounds for rule in rules):
        # Every model takes the same sizes (the usual case): plain bounds, no rules.
        size.update(default_bounds)
        rules = []
    else:
        rules.insert(0, _size_rule({"enum": [None, DEFAULT_MODEL_NAME]}, False, default_bounds))
    if rules:
        job_in["allOf"] = rules
    batch = schemas.get("BatchIn", {})
    for field in ("size", "model"):  # a batch's jobs take the same models and sizes
        if field in batch.get("properties", {}) and field in job_in["properties"]:
            batch["properties"][field] = dict(job_in["properties"][field])
    if rules and batch:
        batch["allOf"] = [*(r for r in batch.get("allOf", []) if "if" not in r), *rules]
    return document


def _size_rule(model: dict[str, Any], required: bool, bounds: dict[str, int]) -> dict[str, Any]:
    condition: dict[str, Any] = {"properties": {"model": model}}
    if required:
        condition["required"] = ["model"]
    return {"if": condition, "then": {"properties": {"size": bounds}}}
