"""Training runs as admins submit, list, watch and cancel them. Requests are validated here,
without torch, so that the web app can answer a bad hyperparameter with a 422 naming it; the
worker trains them (``worker/training.py``).

A run's config is the committed TOML (``configs/<kind>.toml``) with the run's overrides on top:
``{"train": {...}, "model" | "text" | "unet" | "schedule": {...}}``. The keys allowed here mirror
the dataclasses of ``core.diffusion.training.config`` (a test keeps the two in step).
"""

from __future__ import annotations

import math
import re
import tomllib
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.models import (
    JobStatus,
    ModelKind,
    ModelVersion,
    TrainingMetric,
    TrainingRun,
    utcnow,
)
from core.db.transitions import transition_run
from core.runtime.settings import Settings
from core.services.audit import record
from core.services.model_versions import (
    DEFAULT_MODEL_NAME,
    SHIPPED_MODEL_NAME,
    default_model_config,
)
from core.storage import InvalidKey, validate_key

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# train.<key>: (type, lowest, highest, whether the lowest is excluded)
TRAIN_KEYS: dict[str, tuple[type, float, float, bool]] = {
    "steps": (int, 1, 10_000_000, False),
    "batch_size": (int, 1, 4096, False),
    "lr": (float, 0, 1, True),
    "min_lr_ratio": (float, 0, 1, False),
    "warmup_steps": (int, 0, 10_000_000, False),
    "weight_decay": (float, 0, 1, False),
    "grad_clip": (float, 0, 1e6, True),
    "ema_decay": (float, 0, 0.999999, False),
    "checkpoint_every": (int, 1, 10_000_000, False),
    "seed": (int, 0, 2**63 - 1, False),
    "caption_dropout": (float, 0, 0.99, False),
    "min_snr_gamma": (float, 0, 1000, False),
    "grounding_token": (float, 0, 1000, False),
    "grounding_spatial": (float, 0, 1000, False),
    "text_grounding": (float, 0, 1000, False),
    "text_pretrain_steps": (int, 0, 10_000_000, False),
    "threads": (int, 0, 1024, False),
}
# Architecture tables and their keys, per kind; values are checked by the worker when it builds
# the model, and a bad one fails the run with the model's own message.
MODEL_TABLES: dict[ModelKind, dict[str, set[str]]] = {
    ModelKind.AUTOENCODER: {
        "model": {"channels", "latent_channels", "groups", "kl_weight", "latent_scale_factor"},
    },
    ModelKind.DENOISER: {
        "text": {"width", "layers", "heads", "max_length", "dropout"},
        "unet": {
            "in_channels",
            "channels",
            "blocks_per_level",
            "attention_levels",
            "heads",
            "context_width",
            "groups",
            "dropout",
        },
        "schedule": {"kind", "num_train_timesteps", "beta_start", "beta_end", "prediction"},
    },
}
SHAPES_KEYS = {"kind", "seed", "image_size", "held_out", "max_objects"}
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class TrainingRequestError(ValueError):
    """A bad field of a training request. ``status`` is the HTTP answer: 422 for a value no
    request may have, 404 for a reference to nothing, 409 for a reference to the wrong thing."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def base_config(kind: ModelKind) -> dict[str, Any]:
    """The committed default config of a kind, as nested dicts."""
    with open(CONFIG_DIR / f"{kind.value}.toml", "rb") as f:
        return tomllib.load(f)


def fine_tune_config() -> dict[str, Any]:
    """The committed config of fine-tuning runs (``configs/finetune.toml``)."""
    with open(CONFIG_DIR / "finetune.toml", "rb") as f:
        return tomllib.load(f)


def _number(value: Any, field: str, spec: tuple[type, float, float, bool]) -> int | float:
    typ, lo, hi, open_lo = spec
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingRequestError(field, "must be a number")
    if typ is int and not isinstance(value, int):
        # As in JSON Schema, 3.0 is the integer 3.
        if not (math.isfinite(value) and value.is_integer()):
            raise TrainingRequestError(field, "must be an integer")
        value = int(value)
    if not math.isfinite(value) or value > hi or value < lo or (open_lo and value == lo):
        bound = f"above {lo:g}" if open_lo else f"at least {lo:g}"
        raise TrainingRequestError(field, f"must be {bound} and at most {hi:g}")
    return value


def validate_dataset(dataset: Any, settings: Settings) -> dict[str, Any]:
    """The built-in shapes data, an ``s3://bucket/prefix``, or a path under DQ_DATA_ROOT."""
    if not isinstance(dataset, dict) or "kind" not in dataset:
        raise TrainingRequestError("dataset", 'must be an object with a "kind"')
    kind = dataset["kind"]
    if kind == "shapes":
        unknown = set(dataset) - SHAPES_KEYS
        if unknown:
            raise TrainingRequestError(f"dataset.{sorted(unknown)[0]}", "is not a shapes option")
        out: dict[str, Any] = {"kind": "shapes"}
        if "seed" in dataset:
            out["seed"] = _number(dataset["seed"], "dataset.seed", (int, 0, 2**31, False))
        if "image_size" in dataset:
            size = _number(dataset["image_size"], "dataset.image_size", (int, 16, 256, False))
            if size % 16:
                raise TrainingRequestError("dataset.image_size", "must be a multiple of 16")
            out["image_size"] = size
        if "max_objects" in dataset:
            out["max_objects"] = _number(
                dataset["max_objects"], "dataset.max_objects", (int, 1, 2, False)
            )
        if "held_out" in dataset:
            pairs = dataset["held_out"]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(w, str) for w in p)
                for p in pairs
            ):
                raise TrainingRequestError(
                    "dataset.held_out",
                    'must be a list of [color, shape] pairs such as ["orange", "square"]',
                )
            out["held_out"] = pairs
        return out
    if kind == "s3":
        uri = dataset.get("uri")
        if (
            set(dataset) != {"kind", "uri"}
            or not isinstance(uri, str)
            or not uri.startswith("s3://")
        ):
            raise TrainingRequestError("dataset.uri", "must be s3://BUCKET/PREFIX")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not BUCKET.fullmatch(bucket):
            raise TrainingRequestError("dataset.uri", f"{bucket!r} is not a valid bucket name")
        try:
            validate_key(prefix, prefix=True)
        except InvalidKey as e:
            raise TrainingRequestError("dataset.uri", str(e)) from None
        return {"kind": "s3", "uri": f"s3://{bucket}/{prefix}"}
    if kind == "path":
        path = dataset.get("path")
        if set(dataset) != {"kind", "path"} or not isinstance(path, str) or not path:
            raise TrainingRequestError("dataset.path", "must be a path relative to the data root")
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts or "\\" in path or "\x00" in path:
            raise TrainingRequestError(
                "dataset.path", f"must stay under the data root ({settings.data_root})"
            )
        return {"kind": "path", "path": pure.as_posix()}
    raise TrainingRequestError("dataset.kind", "must be shapes, s3 or path")


def _scalar(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value))


def _option_value(value: Any) -> bool:
    """A model option: a number, a boolean, a string, or a flat list of numbers and booleans
    (``channels = [64, 128]``, ``attention_levels = [false, true]``)."""
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, list):
        return all(_scalar(item) for item in value)
    return _scalar(value)


WORD = re.compile(r"^\w{1,64}$")


def _finetune_table(values: Any) -> dict[str, Any]:
    """``config.finetune``: only ``init_words``, {new word: "base words"} (the rest of the
    fine-tune is set by base_version and freeze_text_encoder)."""
    if not isinstance(values, dict) or set(values) - {"init_words"}:
        raise TrainingRequestError("config.finetune", 'may hold only "init_words"')
    words = values.get("init_words", {})
    if not isinstance(words, dict) or len(words) > 64:
        raise TrainingRequestError(
            "config.finetune.init_words", 'must map new words to base words, {"pink": "red"}'
        )
    for word, init in words.items():
        if (
            not WORD.fullmatch(word)
            or not isinstance(init, str)
            or not init.split()
            or not all(WORD.fullmatch(w) for w in init.split())
        ):
            raise TrainingRequestError(
                f"config.finetune.init_words.{word}", "must name base words, space separated"
            )
    return {"init_words": dict(words)}


def validate_config(kind: ModelKind, config: Any) -> dict[str, Any]:
    """Overrides of the committed config: {"train": {...}, and the kind's model tables}."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise TrainingRequestError("config", "must be an object")
    tables = MODEL_TABLES[kind]
    out: dict[str, Any] = {}
    for table, values in config.items():
        if table == "finetune" and kind is ModelKind.DENOISER:
            out[table] = _finetune_table(values)
            continue
        if table != "train" and table not in tables:
            allowed = ", ".join(["train", *sorted(tables)])
            raise TrainingRequestError(
                f"config.{table}", f"is not a table of a {kind.value} config ({allowed})"
            )
        if not isinstance(values, dict):
            raise TrainingRequestError(f"config.{table}", "must be an object")
        checked: dict[str, Any] = {}
        for key, value in values.items():
            field = f"config.{table}.{key}"
            if table == "train":
                if key not in TRAIN_KEYS:
                    raise TrainingRequestError(field, "is not a training hyperparameter")
                checked[key] = _number(value, field, TRAIN_KEYS[key])
            else:
                if key not in tables[table]:
                    raise TrainingRequestError(field, f"is not a {table} option")
                if not _option_value(value):
                    raise TrainingRequestError(
                        field, "must be a number, a string, a boolean or a list of numbers"
                    )
                checked[key] = value
        out[table] = checked
    return out


def resolve_base(session: Session, base_version: Any) -> tuple[ModelVersion | None, dict[str, Any]]:
    """The version a fine-tune starts from and its model config, named as a job names its
    model: a version's name; ``default``, what default traffic runs on (the active denoiser
    version, else the shipped model); ``shipped``, the shipped model (None). Unknown, retired or
    not a denoiser: a 422 naming ``base_version``."""
    if not isinstance(base_version, str) or not base_version.strip():
        raise TrainingRequestError("base_version", 'must be a version name, "default" or "shipped"')
    if base_version == DEFAULT_MODEL_NAME:
        active = session.scalar(
            select(ModelVersion).where(
                ModelVersion.kind == ModelKind.DENOISER, ModelVersion.is_active.is_(True)
            )
        )
        return (active, dict(active.config or {})) if active else (None, default_model_config())
    if base_version == SHIPPED_MODEL_NAME:
        return None, default_model_config()
    version = session.scalar(select(ModelVersion).where(ModelVersion.name == base_version))
    if version is None:
        raise TrainingRequestError("base_version", f"there is no model version {base_version!r}")
    if version.kind is not ModelKind.DENOISER:
        raise TrainingRequestError(
            "base_version",
            f"{base_version!r} is an {version.kind.value}; a fine-tune starts "
            "from a denoiser version",
        )
    if getattr(version, "retired_at", None) is not None:
        raise TrainingRequestError("base_version", f"{base_version!r} is retired")
    return version, dict(version.config or {})


def _check_fine_tune(
    overrides: dict[str, Any], data: dict[str, Any], base_config: dict[str, Any], base: str
) -> None:
    """What a fine-tune cannot change: the architecture is the base's, and so is its size."""
    for table in MODEL_TABLES[ModelKind.DENOISER]:
        if table in overrides:
            raise TrainingRequestError(
                f"config.{table}", f"a fine-tune keeps the architecture of {base!r}"
            )
    if overrides.get("train", {}).get("text_pretrain_steps"):
        raise TrainingRequestError(
            "config.train.text_pretrain_steps", "a fine-tune keeps its base's text encoder"
        )
    size = int(base_config.get("image_size", 64))
    if data.get("image_size", size) != size:
        raise TrainingRequestError(
            "dataset.image_size", f"must be {size}, the image size of {base!r}"
        )


def submit_training_run(
    session: Session,
    settings: Settings,
    *,
    kind: ModelKind | str,
    dataset: Any,
    config: Any = None,
    created_by: str,
    autoencoder_version_id: uuid.UUID | None = None,
    activate: bool = False,
    base_version: str | None = None,
    freeze_text_encoder: bool = False,
) -> TrainingRun:
    """Add a queued training run, and its ``run.create`` audit row by ``created_by``; the
    caller commits, then publishes it (:func:`core.queue.dispatch.publish_run`).

    With ``base_version`` (a denoiser version's name, or ``default``) the run fine-tunes that
    model from ``configs/finetune.toml`` instead of training from scratch; its config records
    the base as ``finetune.base`` and the version's id as ``base_version_id``."""
    try:
        kind = ModelKind(kind)
    except ValueError:
        raise TrainingRequestError("kind", "must be autoencoder or denoiser") from None
    data = validate_dataset(dataset, settings)
    overrides = validate_config(kind, config)
    if not isinstance(activate, bool):
        raise TrainingRequestError("activate", "must be true or false")
    if not isinstance(freeze_text_encoder, bool):
        raise TrainingRequestError("freeze_text_encoder", "must be true or false")
    finetune = overrides.pop("finetune", {})
    base_id: uuid.UUID | None = None
    if base_version is None:
        if freeze_text_encoder or finetune:
            field = "freeze_text_encoder" if freeze_text_encoder else "config.finetune"
            raise TrainingRequestError(field, "needs base_version: only a fine-tune has one")
    else:
        if kind is not ModelKind.DENOISER:
            raise TrainingRequestError("base_version", "only a denoiser run starts from a base")
        if autoencoder_version_id is not None:
            raise TrainingRequestError(
                "autoencoder_version_id", "a fine-tune uses its base's autoencoder"
            )
        base, base_model = resolve_base(session, base_version)
        base_id = base.id if base is not None else None
        _check_fine_tune(overrides, data, base_model, base_version)
        finetune = {
            **finetune,
            "base": base.name if base is not None else SHIPPED_MODEL_NAME,
            "freeze_text_encoder": freeze_text_encoder,
        }
    if autoencoder_version_id is not None:
        if kind is not ModelKind.DENOISER:
            raise TrainingRequestError("autoencoder_version_id", "only a denoiser run takes one")
        ae = session.get(ModelVersion, autoencoder_version_id)
        if ae is None:
            raise TrainingRequestError(
                "autoencoder_version_id", f"no model version {autoencoder_version_id}", 404
            )
        if ae.kind is not ModelKind.AUTOENCODER:
            raise TrainingRequestError(
                "autoencoder_version_id", f"version {ae.name!r} is a {ae.kind.value}", 409
            )
    committed = fine_tune_config() if finetune else base_config(kind)
    steps = overrides.get("train", {}).get("steps", committed["train"]["steps"])
    extra: dict[str, Any] = {}
    if finetune:
        extra = {"finetune": finetune, "base_version_id": str(base_id) if base_id else None}
    run = TrainingRun(
        id=uuid.uuid4(),
        status=JobStatus.QUEUED,
        kind=kind,
        config={**overrides, **extra, "activate": activate},
        dataset=data,
        autoencoder_version_id=autoencoder_version_id,
        created_by=created_by,
        total_steps=int(steps),
        created_at=utcnow(),
    )
    session.add(run)
    session.flush()
    record(
        session,
        created_by,
        "run.create",
        f"run:{run.id}",
        detail={
            "kind": kind.value,
            "dataset": data,
            "steps": run.total_steps,
            **({"base_version": base_version} if finetune else {}),
        },
    )
    return run


# --- looking runs up -----------------------------------------------------------------------


class RunNotFound(LookupError):
    pass


class RunFinished(ValueError):
    """The run already ended; there is nothing to cancel."""


def get_run(session: Session, run_id: uuid.UUID) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise RunNotFound(f"There is no training run {run_id}.")
    return run


def list_runs(
    session: Session, status: JobStatus | None = None, limit: int = 20, offset: int = 0
) -> tuple[list[TrainingRun], int]:
    """A page of runs, newest first, and the count under the same filter."""
    where: list[Any] = [] if status is None else [TrainingRun.status == status]
    total = session.scalar(select(func.count()).select_from(TrainingRun).where(*where)) or 0
    rows = session.scalars(
        select(TrainingRun)
        .where(*where)
        .order_by(TrainingRun.created_at.desc(), TrainingRun.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total


def metric_series(session: Session, run_id: uuid.UUID) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as {name: [(step, value), …]}, by step."""
    series: dict[str, list[tuple[int, float]]] = {}
    rows = session.execute(
        select(TrainingMetric.name, TrainingMetric.step, TrainingMetric.value)
        .where(TrainingMetric.run_id == run_id)
        .order_by(TrainingMetric.name, TrainingMetric.step)
    )
    for name, step, value in rows:
        series.setdefault(name, []).append((step, value))
    return series


def cancel_run(session: Session, run: TrainingRun) -> TrainingRun:
    """Cancel a queued run at once; ask a running one to stop (the worker checks between steps).
    Canceling a canceled run is a no-op; a run that succeeded or failed raises RunFinished."""
    if transition_run(
        session, run.id, JobStatus.CANCELED, expected=JobStatus.QUEUED, finished_at=utcnow()
    ):
        session.refresh(run)
        return run
    session.refresh(run)
    if run.status is JobStatus.RUNNING:
        run.cancel_requested = True
        session.flush()
    elif run.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise RunFinished(f"The training run already {run.status.value}; nothing to cancel.")
    return run
