"""The REST API's request and response bodies as marshmallow schemas: apiflask validates requests
with them and writes the OpenAPI document from them.

Requests are strict JSON: a string is not a number, 1 is not true, unknown fields are refused.
Limits that come from the settings (DQ_MAX_STEPS, DQ_MAX_IMAGES_PER_JOB, DQ_MAX_PROMPT_CHARS)
and from the serving model (size) are checked by ``core.services.jobs``; :func:`web.openapi` writes
their current values into the served document.
"""

from __future__ import annotations

import math
from typing import Any

from apiflask import Schema
from apiflask.fields import (
    UUID,
    Boolean,
    DateTime,
    Dict,
    File,
    Float,
    Integer,
    List,
    Nested,
    String,
)
from apiflask.validators import Length, OneOf, Range, Regexp
from marshmallow import ValidationError

from core.db.models import JobStatus, ModelKind
from core.services.jobs import MAX_GUIDANCE, MAX_REQUEST_SEED, SAMPLER_NAMES
from core.services.training_runs import MODEL_TABLES, TRAIN_KEYS
from core.services.webhooks import EVENTS as WEBHOOK_EVENTS
from core.services.webhooks import MAX_URL_LENGTH, WEBHOOK_URL_PATTERN

STATUSES = [s.value for s in JobStatus]
# The longest init_image or mask a job's JSON may carry (a data: URL of up to 12 MB).
EDIT_INPUT_CHARS = 16 * 1024 * 1024
MAX_MODEL_NAME = 128  # ModelVersion.name


class JsonNumber(Float):
    """A JSON number: ints and floats, not "4.0" or true."""

    def __init__(self, **kwargs: Any):
        super().__init__(error_messages={"invalid": "must be a number"}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class JsonInteger(Integer):
    """A JSON integer: not 2.5, "2" or true. As in JSON Schema, 3.0 is the integer 3 (some
    clients' JSON encoders write whole numbers that way)."""

    def __init__(self, **kwargs: Any):
        super().__init__(strict=True, error_messages={"invalid": "must be an integer"}, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return int(super()._validated(value))


class JsonBoolean(Boolean):
    """true or false, not 1 or "yes"."""

    def __init__(self, **kwargs: Any):
        super().__init__(error_messages={"invalid": "must be true or false"}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class JsonText(String):
    """A string that the database can store: valid Unicode (no lone surrogates such as the JSON
    escape \\ud800) without NUL characters."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        _check_text(text, self)
        return text


class JsonObject(Dict):
    """A JSON object whose every string is storable and every number finite (PostgreSQL's JSON
    refuses NaN, and JSON itself has no such token)."""

    def __init__(self, **kwargs: Any):
        super().__init__(error_messages={"invalid": "must be a JSON object"}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        result = super()._deserialize(value, attr, data, **kwargs)
        _check_json(result, self)
        return result


def _check_text(text: str, field: Any) -> None:
    if "\x00" in text:
        raise ValidationError("must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("must be valid Unicode text (no lone surrogates)") from None


def _check_json(value: Any, field: Any) -> None:
    if isinstance(value, str):
        _check_text(value, field)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValidationError("must not contain NaN or infinity")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, field)
            _check_json(item, field)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, field)


def _range(lo: float, hi: float | None = None) -> Range:
    if hi is None:
        return Range(min=lo, error="must be at least {min}")
    return Range(min=lo, max=hi, error="must be from {min} to {max}")


# --- errors -------------------------------------------------------------------------------


class FieldError(Schema):
    field = String(required=True, metadata={"description": "e.g. steps, or dataset.uri"})
    message = String(required=True)


class Problem(Schema):
    """An RFC 9457 problem: what went wrong, in a sentence a person understands."""

    type = String(required=True, metadata={"description": "A URI naming the kind of problem."})
    title = String(required=True, metadata={"description": "The HTTP status phrase."})
    status = Integer(required=True)
    detail = String(required=True, metadata={"description": "What went wrong and what to do."})
    instance = String(metadata={"description": "The path that was requested."})
    errors = List(Nested(FieldError), metadata={"description": "For 422: the fields at fault."})
    request_id = String(
        metadata={
            "description": "The answer's X-Request-ID, as the server's logs name it: quote it "
            "when reporting a problem."
        }
    )


# --- jobs -----------------------------------------------------------------------------------


class JobIn(Schema):
    prompt = JsonText(
        required=True,
        validate=Regexp(r"\s*\S", error="must not be empty"),  # match() anchors at the start
        metadata={"description": "What the image should show.", "example": "a red circle"},
    )
    negative_prompt = JsonText(
        load_default="", metadata={"description": "What the image should not show."}
    )
    steps = JsonInteger(
        allow_none=True,
        validate=_range(1),
        metadata={"description": "Denoising steps; null or absent: the serving model's."},
    )
    guidance = JsonNumber(
        allow_none=True,
        validate=_range(0, MAX_GUIDANCE),
        metadata={"description": "Classifier-free guidance scale; 1 turns it off."},
    )
    sampler = String(
        allow_none=True,
        validate=OneOf(SAMPLER_NAMES, error="must be one of {choices}"),
        metadata={"description": "null or absent: the serving model's default."},
    )
    seed = JsonInteger(
        allow_none=True,
        validate=_range(0, MAX_REQUEST_SEED),
        metadata={
            "description": "Seed of the first image (image i uses seed + i); random if null."
        },
    )
    num_images = JsonInteger(load_default=1, validate=_range(1))
    guidance_interval = List(
        JsonNumber(validate=_range(0, 1)),
        allow_none=True,
        validate=Length(min=2, max=2, error="must be two numbers from 0 to 1"),
        metadata={
            "description": "Two noise levels t/T from 0 (clean) to 1 (pure noise), either order: "
            "guidance applies only between them, and steps outside run the conditional pass "
            "alone (faster). null: the serving model's default.",
            "example": [0.0, 0.6],
        },
    )
    init_image = JsonText(
        allow_none=True,
        validate=Length(max=EDIT_INPUT_CHARS, error="must be at most {max} characters"),
        metadata={
            "description": "Start from this image instead of noise (image-to-image): the id of "
            "an upload of yours (POST /api/v1/uploads), or an inline "
            "data:image/png;base64,… URL (png, jpeg or webp). It is resized to the job's size.",
        },
    )
    mask = JsonText(
        allow_none=True,
        validate=Length(max=EDIT_INPUT_CHARS, error="must be at most {max} characters"),
        metadata={
            "description": "With init_image, the same size as it: white is repainted, black keeps "
            "the init image's pixels exactly (inpainting). An upload id or a data: URL.",
        },
    )
    strength = JsonNumber(
        allow_none=True,
        validate=Range(
            min=0, max=1, min_inclusive=False, error="must be greater than 0 and at most 1"
        ),
        metadata={
            "description": "With init_image: how much of the schedule the image goes through, "
            "in (0, 1]; null: 0.75, or 1 with a mask.",
        },
    )
    size = JsonInteger(
        allow_none=True,
        validate=_range(1),
        metadata={"description": "Side in pixels, a multiple of the model's; null: the model's."},
    )
    model = JsonText(
        allow_none=True,
        validate=Length(min=1, max=MAX_MODEL_NAME, error="must be {min} to {max} characters"),
        metadata={
            "description": "The model to run on: a version's name (GET /api/v1/models lists "
            "them), default (the active version, or its canary for the canary's share of jobs) "
            "or shipped (the model shipped with the code). null or absent: default. Parameters "
            "left out take this model's defaults. An unknown or retired name is a 422.",
            "example": "default",
        },
    )
    webhook = JsonText(
        allow_none=True,
        validate=Length(max=MAX_URL_LENGTH, error="must be at most {max} characters"),
        metadata={
            "description": "Where to POST signed webhooks (Standard Webhooks; the key is at "
            "GET /api/v1/webhooks/secret): https to a host name whose every address is public. "
            "422 when it resolves to a loopback, private, link-local or metadata address. Plain "
            "http, IP addresses and single-label hosts only where the server's "
            "DQ_WEBHOOK_ALLOW_HTTP or DQ_WEBHOOK_ALLOWED_NETWORKS allow them.",
            "format": "uri",
            "pattern": WEBHOOK_URL_PATTERN,
            "example": "https://example.com/hooks/dq",
        },
    )
    webhook_events_filter = List(
        String(validate=OneOf(WEBHOOK_EVENTS, error="must be one of {choices}")),
        allow_none=True,
        validate=Length(min=1, error="must name at least one event"),
        metadata={
            "description": "Which events to send (null or absent: all); ignored without a webhook.",
            "example": ["completed", "failed"],
        },
    )


class IdempotencyHeaders(Schema):
    idempotency_key = String(
        data_key="Idempotency-Key",
        validate=Length(min=1, max=255, error="must be {min} to {max} characters"),
        metadata={
            "description": "Retry-safe submission: the same key with the same body returns the "
            "same job; with a different body, 409."
        },
    )


class PageQuery(Schema):
    # Query strings are text: "20" is read as 20 here, unlike in a JSON body.
    status = String(validate=OneOf(STATUSES, error="must be one of {choices}"))
    limit = Integer(load_default=20, validate=_range(1, 100))
    offset = Integer(load_default=0, validate=_range(0, 1_000_000))


class Progress(Schema):
    step = Integer(required=True)
    total = Integer(required=True)
    preview_url = String(
        required=True, allow_none=True, metadata={"description": "While the job runs."}
    )


class ImageOut(Schema):
    url = String(required=True, metadata={"description": "Presigned on S3; expires in an hour."})
    width = Integer(required=True)
    height = Integer(required=True)
    seed = Integer(required=True)


class UploadRef(Schema):
    id = UUID(required=True)
    url = String(required=True, metadata={"description": "Presigned on S3; expires in an hour."})


class UploadOut(Schema):
    id = UUID(
        required=True,
        metadata={"description": "Name it as init_image or mask of a job of yours."},
    )
    url = String(required=True, metadata={"description": "Presigned on S3; expires in an hour."})
    width = Integer(required=True)
    height = Integer(required=True)
    bytes = Integer(required=True, metadata={"description": "Of the PNG kept."})
    created_at = DateTime(required=True)


class UploadIn(Schema):
    file = File(
        required=True,
        metadata={
            "description": "A PNG, JPEG or WebP image (one frame, at most 4096 pixels a side); "
            "kept as a PNG without metadata."
        },
    )


class JobParams(Schema):
    prompt = String(required=True)
    negative_prompt = String(required=True)
    steps = Integer(required=True)
    guidance = Float(required=True)
    guidance_interval = List(Float(), required=True, metadata={"description": "[lo, hi] in t/T."})
    sampler = String(required=True)
    seed = Integer(required=True, metadata={"description": "The seed actually used."})
    num_images = Integer(required=True)
    size = Integer(required=True)
    model = String(
        required=True,
        metadata={"description": "The version it runs on; default: the shipped model."},
    )
    model_pick = String(
        required=True,
        allow_none=True,
        validate=OneOf(["named", "default", "canary"]),
        metadata={
            "description": "How the version was picked: named by the request, the default, or "
            "the canary's share of default traffic; null for jobs from before picks were kept."
        },
    )
    init_image = Nested(
        UploadRef,
        required=True,
        allow_none=True,
        metadata={"description": "The upload it started from; null for text-to-image."},
    )
    mask = Nested(
        UploadRef,
        required=True,
        allow_none=True,
        metadata={"description": "The mask of what was repainted; null for none."},
    )
    strength = Float(required=True, allow_none=True)


class JobOut(Schema):
    id = UUID(required=True)
    status = String(required=True, validate=OneOf(STATUSES))
    progress = Nested(Progress, required=True)
    queue_position = Integer(
        required=True,
        allow_none=True,
        metadata={
            "description": "Jobs ahead of this one; null once it is no longer queued. Counted "
            "up to 1000 jobs ahead, estimated beyond (see queue_position_exact)."
        },
    )
    queue_position_exact = Boolean(
        required=True,
        metadata={
            "description": "Whether queue_position was counted (true) or, more than 1000 jobs "
            "back, estimated from the owners' places in the fair order (false)."
        },
    )
    estimated_start = DateTime(
        required=True,
        allow_none=True,
        metadata={
            "description": "When the job is expected to start (when it started, once running), "
            "from measured throughput and live workers; null once it has finished."
        },
    )
    estimated_finish = DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "When the job is expected to finish; null once it has finished."},
    )
    created_at = DateTime(required=True)
    started_at = DateTime(required=True, allow_none=True)
    finished_at = DateTime(required=True, allow_none=True)
    params = Nested(JobParams, required=True)
    images = List(Nested(ImageOut), required=True)
    error = String(required=True, allow_none=True)
    webhook = String(required=True, allow_none=True, metadata={"description": "As submitted."})
    webhook_events_filter = List(
        String(),
        required=True,
        allow_none=True,
        metadata={"description": "The events sent; null: all (or no webhook)."},
    )


class JobPage(Schema):
    jobs = List(Nested(JobOut), required=True)
    total = Integer(required=True, metadata={"description": "Jobs matching the filter."})
    limit = Integer(required=True)
    offset = Integer(required=True)


class PollHeaders(Schema):
    if_none_match = String(
        data_key="If-None-Match",
        validate=Length(max=1000, error="must be at most {max} characters"),
        metadata={"description": "The ETag of the last answer: 304 while nothing has changed."},
    )


class PollResponseHeaders(Schema):
    etag = String(data_key="ETag", required=True, metadata={"description": "For If-None-Match."})
    retry_after = Integer(
        data_key="Retry-After",
        metadata={
            "description": "Seconds to wait before the next poll; absent once the job has ended."
        },
    )
    cache_control = String(data_key="Cache-Control", required=True)


class LocationHeader(Schema):
    location = String(
        data_key="Location", required=True, metadata={"description": "Where to poll."}
    )


# --- models ---------------------------------------------------------------------------------


class ModelDefaults(Schema):
    steps = Integer(required=True)
    guidance = Float(required=True)
    sampler = String(required=True)
    guidance_interval = List(Float(), required=True, metadata={"description": "[lo, hi] in t/T."})


class CallerLimits(Schema):
    max_steps = Integer(
        required=True, metadata={"description": "Most denoising steps a job may ask for."}
    )
    max_images_per_job = Integer(required=True)
    max_prompt_chars = Integer(required=True)
    max_active_jobs = Integer(
        required=True, metadata={"description": "Queued and running jobs you may have at once."}
    )
    rate_limit = String(
        required=True, metadata={"description": "Submissions allowed, e.g. 60/minute."}
    )


class MeOut(Schema):
    owner = String(required=True, metadata={"description": "The owner string of your jobs."})
    role = String(required=True, validate=OneOf(["user", "admin"]))
    limits = Nested(CallerLimits, required=True)


class ServingOut(Schema):
    id = UUID(required=True, allow_none=True, metadata={"description": "null: shipped default."})
    name = String(required=True)
    defaults = Nested(ModelDefaults, required=True)
    image_size = Integer(required=True)


class ModelSizes(Schema):
    default = Integer(required=True, metadata={"description": "Side in pixels when none is given."})
    min = Integer(required=True)
    max = Integer(required=True)
    multiple = Integer(required=True, metadata={"description": "Every size is a multiple of it."})


class ServableModelOut(Schema):
    name = String(
        required=True,
        metadata={
            "description": "What a request's model names (shipped: the "
            "model shipped with the code)."
        },
    )
    id = UUID(required=True, allow_none=True, metadata={"description": "null: the shipped model."})
    is_active = Boolean(
        required=True,
        metadata={
            "description": "Whether default runs on it (the shipped model "
            "is active when no version is)."
        },
    )
    canary_percent = Integer(
        required=True, metadata={"description": "Its share of default traffic as the canary."}
    )
    defaults = Nested(ModelDefaults, required=True)
    sizes = Nested(ModelSizes, required=True)
    parameters = Integer(
        required=True, allow_none=True, metadata={"description": "Weights, where known."}
    )
    checkpoint_bytes = Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Of model.safetensors, where known."},
    )
    eval = Dict(
        required=True,
        allow_none=True,
        metadata={"description": "Its quick eval (fid, n, adherence …), where it has one."},
    )
    created_at = DateTime(required=True, allow_none=True)


class CanaryOut(Schema):
    version = String(required=True, metadata={"description": "The canary version's name."})
    id = UUID(required=True)
    percent = Integer(required=True, metadata={"description": "Its share of default traffic."})


class ModelVersionOut(Schema):
    id = UUID(required=True)
    name = String(required=True)
    kind = String(required=True, validate=OneOf([k.value for k in ModelKind]))
    is_active = Boolean(required=True)
    metrics = Dict(required=True, metadata={"description": "Evaluation metrics of the version."})
    eval = Dict(
        required=True,
        allow_none=True,
        metadata={
            "description": "The quick eval its training run ended with: fid and n (256), "
            "adherence (shapes data; else null), reference (what it was measured against), "
            "floor (real against real, shapes data). An autoencoder's has kind "
            "'reconstruction': fid is its reconstruction FID and psnr_db its PSNR, both of "
            "images against their reconstructions. null: none (an imported version, a version "
            "trained before its kind had a quick eval).",
        },
    )
    base_version = String(
        required=True,
        allow_none=True,
        metadata={"description": "The version it was fine-tuned from; null: trained from scratch."},
    )
    created_at = DateTime(required=True)
    activated_at = DateTime(required=True, allow_none=True)
    retired_at = DateTime(required=True, allow_none=True)
    canary_percent = Integer(required=True)


class ModelsOut(Schema):
    serving = Nested(ServingOut, required=True)
    default = String(
        required=True, metadata={"description": "The model that default names (the canary aside)."}
    )
    canary = Nested(
        CanaryOut,
        required=True,
        allow_none=True,
        metadata={"description": "The version taking a share of default traffic; null: none."},
    )
    models = List(
        Nested(ServableModelOut),
        required=True,
        metadata={"description": "Every model a request may name, with its defaults and sizes."},
    )
    versions = List(
        Nested(ModelVersionOut),
        required=True,
        metadata={"description": "Every version of every kind, retired ones included."},
    )


# --- training runs --------------------------------------------------------------------------


# The dataset references as core.services.training_runs checks them, as regular expressions without
# look-around (JSON Schema's dialects differ; these read the same in each). An object key's
# segments are letters, digits, ".", "_" and "-", never "." or ".." (core.storage.validate_key).
_KEY_FIRST = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_KEY_SEGMENT = (
    r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)"
)
S3_URI = rf"^s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](?:/(?:{_KEY_FIRST}(?:/{_KEY_SEGMENT})*/?)?)?$"
# A relative path: no leading "/", no "\\", no NUL, no ".." part.
_PATH_SEGMENT = r"(?:[^/\\\x00.][^/\\\x00]*|\.[^/\\\x00.][^/\\\x00]*|\.\.[^/\\\x00]+|\.)"
DATA_PATH = rf"^{_PATH_SEGMENT}(?:/+{_PATH_SEGMENT})*/*$"


def _dataset_document() -> dict[str, Any]:
    """The dataset variants, for the document (core.services.training_runs.validate_dataset checks
    them)."""

    def variant(kind: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"kind": {"type": "string", "enum": [kind]}, **properties},
            "required": ["kind", *required],
            "additionalProperties": False,
        }

    return {
        "oneOf": [
            variant(
                "shapes",
                {
                    "seed": {"type": "integer", "minimum": 0, "maximum": 2**31},
                    "image_size": {
                        "type": "integer",
                        "minimum": 16,
                        "maximum": 256,
                        "multipleOf": 16,
                    },
                    "max_objects": {"type": "integer", "minimum": 1, "maximum": 2},
                    "held_out": {
                        "type": "array",
                        "description": 'Color-shape pairs to leave out, e.g. ["orange", "square"].',
                        "items": {
                            "type": "array",
                            "items": {"type": "string", "pattern": "^[^\\x00]*$"},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                    },
                },
                [],
            ),
            variant(
                "s3",
                {"uri": {"type": "string", "pattern": S3_URI, "maxLength": 5 + 63 + 1 + 512}},
                ["uri"],
            ),
            variant(
                "path",
                {
                    "path": {
                        "type": "string",
                        "pattern": DATA_PATH,
                        "description": "Relative, under DQ_DATA_ROOT.",
                    }
                },
                ["path"],
            ),
        ]
    }


OPTION_VALUE = {
    "anyOf": [
        {"type": "number"},
        {"type": "boolean"},
        {"type": "string", "pattern": "^[^\\x00]*$"},
        {"type": "array", "items": {"type": ["number", "boolean"]}},
    ]
}
"""A model option's value, as core.services.training_runs checks it."""


def _table_document(options: set[str]) -> dict[str, Any]:
    """A model table of the config (core.services.training_runs.MODEL_TABLES): its options by
    name."""
    return {
        "type": "object",
        "properties": {name: OPTION_VALUE for name in sorted(options)},
        "additionalProperties": False,
    }


def run_kind_rules() -> list[dict[str, Any]]:
    """The rules of a training request that depend on its kind, for the document: only a
    denoiser takes an autoencoder version, and each kind takes only its own model tables."""
    rules = []
    for kind, tables in MODEL_TABLES.items():
        others = sorted({t for ts in MODEL_TABLES.values() for t in ts} - set(tables))
        then: dict[str, Any] = {
            "properties": {"config": {"properties": {table: False for table in others}}}
        }
        if kind is ModelKind.AUTOENCODER:
            then["properties"]["autoencoder_version_id"] = {"type": "null"}
            then["properties"]["base_version"] = {"type": "null"}  # only a denoiser fine-tunes
        rules.append(
            {
                "if": {"properties": {"kind": {"const": kind.value}}, "required": ["kind"]},
                "then": then,
            }
        )
    # Without a base, nothing of a fine-tune: no frozen text encoder, no [finetune] table.
    has_base = {"properties": {"base_version": {"type": "string"}}, "required": ["base_version"]}
    rules.append(
        {
            "if": {"not": has_base},
            "then": {
                "properties": {
                    "freeze_text_encoder": {"const": False},
                    "config": {"properties": {"finetune": False}},
                }
            },
        }
    )
    return rules


def _train_document() -> dict[str, Any]:
    """The training hyperparameters and their ranges, from
    core.services.training_runs.TRAIN_KEYS."""
    properties = {}
    for key, (kind, lo, hi, open_lo) in TRAIN_KEYS.items():
        bound = {"exclusiveMinimum": lo} if open_lo else {"minimum": lo}
        properties[key] = {"type": "integer" if kind is int else "number", **bound, "maximum": hi}
    return {"type": "object", "properties": properties, "additionalProperties": False}


class TrainingRunIn(Schema):
    kind = String(
        required=True,
        validate=OneOf([k.value for k in ModelKind], error="must be one of {choices}"),
    )
    dataset = JsonObject(
        required=True,
        metadata={
            "description": "The data: the built-in shapes with its options, an s3:// prefix, or "
            "a folder under DQ_DATA_ROOT; never an arbitrary URL.",
            "example": {"kind": "shapes", "seed": 0},
            **_dataset_document(),
        },
    )
    config = JsonObject(
        allow_none=True,
        metadata={
            "description": "Overrides of the committed config (configs/KIND.toml): the "
            '"train" hyperparameters and, per kind, the model tables (autoencoder: model; '
            "denoiser: text, unet, schedule).",
            "example": {"train": {"steps": 1000, "lr": 0.0002}},
            "properties": {
                "train": _train_document(),
                **{
                    table: _table_document(options)
                    for tables in MODEL_TABLES.values()
                    for table, options in tables.items()
                },
                "finetune": {
                    "type": "object",
                    "description": "With base_version: init_words, each new caption word's "
                    'starting embedding as the mean of base words ({"pink": "red purple"}).',
                    "properties": {
                        "init_words": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    )
    autoencoder_version_id = UUID(
        allow_none=True, metadata={"description": "Denoiser runs: train on this autoencoder."}
    )
    activate = JsonBoolean(
        load_default=False, metadata={"description": "Serve the resulting version at once."}
    )
    base_version = String(
        allow_none=True,
        metadata={
            "description": "Denoiser runs: fine-tune this model instead of training from "
            "scratch, from configs/finetune.toml; the architecture is the base's. Named as a "
            "job's model: a denoiser version's name, default (what default traffic runs on) or "
            "shipped (the model shipped with the code).",
            "example": "default",
        },
    )
    freeze_text_encoder = JsonBoolean(
        load_default=False,
        metadata={
            "description": "With base_version: train the UNet alone (and the embeddings of "
            "caption words the base does not know)."
        },
    )


class MetricPoint(Schema):
    step = Integer(required=True)
    value = Float(required=True, allow_none=True, metadata={"description": "null: NaN or inf"})


class TrainingRunOut(Schema):
    id = UUID(required=True)
    status = String(required=True, validate=OneOf(STATUSES))
    kind = String(required=True)
    dataset = Dict(required=True)
    config = Dict(required=True)
    step = Integer(required=True)
    total_steps = Integer(required=True)
    cancel_requested = Boolean(required=True)
    created_by = String(required=True)
    created_at = DateTime(required=True)
    started_at = DateTime(required=True, allow_none=True)
    finished_at = DateTime(required=True, allow_none=True)
    error = String(required=True, allow_none=True)
    model_version_id = UUID(
        required=True, allow_none=True, metadata={"description": "The version it produced."}
    )
    metrics = Dict(
        keys=String(),
        values=List(Nested(MetricPoint)),
        metadata={"description": "Detail only: every metric's series, by name."},
    )
    samples_url = String(
        allow_none=True, metadata={"description": "Detail only: the sample grid, once written."}
    )


class RunPage(Schema):
    runs = List(Nested(TrainingRunOut), required=True)
    total = Integer(required=True)
    limit = Integer(required=True)
    offset = Integer(required=True)
