"""Which model serves: the active denoiser version, or the default model shipped with the code;
which model a request picks (a version by name, or ``default`` with its canary share); the
servable versions; retiring a version and registering one imported by an operator.

This module reads model configs as JSON and never imports torch, so the web app can show a
model's defaults (steps, guidance, sampler, size) and validate a request against them.
Activation with the eval gate, and the canary, are in :mod:`core.services.model_rollout`.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.db.models import ModelKind, ModelVersion, utcnow
from core.storage import Storage

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "diffusion" / "default_model"
# What a job that ran on the shipped model shows as its model, and what a request names to get
# the model that serves by default (the active version; the shipped model when none is).
DEFAULT_MODEL_NAME = "default"
# What a request names to get the shipped model even while a version is active.
SHIPPED_MODEL_NAME = "shipped"
RESERVED_NAMES = frozenset((DEFAULT_MODEL_NAME, SHIPPED_MODEL_NAME))
# A version's name: it is part of its storage prefix (models/<name>/…) and of the API.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# How a job's version was picked (jobs.model_pick).
PICK_NAMED, PICK_DEFAULT, PICK_CANARY = "named", "default", "canary"


@dataclass(frozen=True)
class ServingModel:
    """The model a new job will run on, and the sampling defaults it declares."""

    version_id: uuid.UUID | None  # None: the shipped default model
    name: str
    steps: int
    guidance: float
    sampler: str
    image_size: int
    size_multiple: int
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.version_id) if self.version_id else None,
            "name": self.name,
            "defaults": {
                "steps": self.steps,
                "guidance": self.guidance,
                "sampler": self.sampler,
                "guidance_interval": list(self.guidance_interval),
            },
            "image_size": self.image_size,
        }


def _from_config(version_id: uuid.UUID | None, name: str, config: dict[str, Any]) -> ServingModel:
    defaults = config.get("sampling_defaults", {})
    ae = config.get("autoencoder", {})
    # As LatentDiffusion.size_multiple: the autoencoder's and the UNet's downsampling.
    downsample = 2 ** len(ae.get("channels", [0, 0]))
    unet_levels = len(config.get("unet", {}).get("channels", [0, 0]))
    return ServingModel(
        version_id=version_id,
        name=name,
        steps=int(defaults.get("steps", 20)),
        guidance=float(defaults.get("guidance", 4.0)),
        sampler=str(defaults.get("sampler", "dpmpp-2m")),
        image_size=int(config.get("image_size", 64)),
        size_multiple=downsample * 2 ** (unet_levels - 1),
        guidance_interval=_interval(defaults.get("guidance_interval")),
    )


def _interval(raw: Any) -> tuple[float, float]:
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        lo, hi = sorted(float(v) for v in raw)
        return (lo, hi)
    return (0.0, 1.0)


def default_model_config() -> dict[str, Any]:
    path = DEFAULT_MODEL_DIR / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"the shipped default model is missing: {path}")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def serving_model(session: Session) -> ServingModel:
    """The active denoiser version, or the shipped default when none is active."""
    active = session.scalar(
        select(ModelVersion).where(
            ModelVersion.kind == ModelKind.DENOISER, ModelVersion.is_active.is_(True)
        )
    )
    if active is not None:
        return _from_config(active.id, active.name, active.config)
    return _from_config(None, DEFAULT_MODEL_NAME, default_model_config())


def model_for_job(session: Session, version_id: uuid.UUID | None) -> ServingModel:
    if version_id is None:
        return _from_config(None, DEFAULT_MODEL_NAME, default_model_config())
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise LookupError(f"model version {version_id} does not exist")
    return _from_config(version.id, version.name, version.config)


def activate_version(session: Session, version_id: uuid.UUID) -> ModelVersion:
    """Make ``version_id`` the one active version of its kind (workers pick it up for new jobs).

    The partial unique index guarantees at most one active version per kind even if two admins
    race; the loser's transaction fails with an IntegrityError.
    """
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise LookupError(f"model version {version_id} does not exist")
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == version.kind, ModelVersion.id != version.id)
        .values(is_active=False)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    version.is_active = True
    version.activated_at = utcnow()
    session.flush()
    return version


def deactivate_all(session: Session, kind: ModelKind = ModelKind.DENOISER) -> None:
    """Serve the shipped default model again."""
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == kind)
        .values(is_active=False)
        .execution_options(synchronize_session="fetch")
    )


# --- a request's model ----------------------------------------------------------------------


class ModelRequestError(ValueError):
    """A request names no servable model; the message is for the caller (field ``model``)."""


class ModelStateError(ValueError):
    """The version is in the wrong state for what was asked (retired, active, the canary …)."""


@dataclass(frozen=True)
class ModelPick:
    """The model a new job runs on, and how it was picked (PICK_NAMED, _DEFAULT, _CANARY)."""

    model: ServingModel
    how: str


def shipped_model() -> ServingModel:
    return _from_config(None, DEFAULT_MODEL_NAME, default_model_config())


def canary_slot(pick_key: uuid.UUID) -> int:
    """0-99, fixed by the job's (or batch's) id: a job goes to a canary of p percent when its
    slot is below p. Deterministic per job, uniform over ids, and free of any query."""
    return int.from_bytes(hashlib.sha256(pick_key.bytes).digest()[:8], "big") % 100


def resolve_model(session: Session, requested: str | None, pick_key: uuid.UUID) -> ModelPick:
    """The model for a request naming ``requested`` (None or ``default``: the serving default,
    or its canary for the canary's share of ``pick_key``s; ``shipped``: the shipped model; else
    a version's name). One query, the one serving_model made before: at most the active
    version, the canary and the named one. ModelRequestError when the name serves nothing."""
    if requested is not None and not isinstance(requested, str):
        raise ModelRequestError("must be a model version's name, or default")
    if requested == SHIPPED_MODEL_NAME:
        return ModelPick(shipped_model(), PICK_NAMED)
    name = None if requested in (None, DEFAULT_MODEL_NAME) else requested
    if name is not None and not VERSION_NAME.fullmatch(name):
        raise ModelRequestError(f"there is no model {name[:130]!r}; GET /api/v1/models lists them")
    wanted = [ModelVersion.is_active.is_(True), ModelVersion.canary_percent > 0]
    if name is not None:
        wanted.append(ModelVersion.name == name)
    rows = session.scalars(
        select(ModelVersion).where(ModelVersion.kind == ModelKind.DENOISER, or_(*wanted))
    ).all()
    if name is not None:
        version = next((v for v in rows if v.name == name), None)
        if version is None:
            raise ModelRequestError(f"there is no model {name!r}; GET /api/v1/models lists them")
        if version.retired_at is not None:
            raise ModelRequestError(f"model {name!r} is retired; GET /api/v1/models lists them")
        return ModelPick(_from_config(version.id, version.name, version.config), PICK_NAMED)
    canary = next((v for v in rows if v.canary_percent > 0 and v.retired_at is None), None)
    if canary is not None and canary_slot(pick_key) < canary.canary_percent:
        return ModelPick(_from_config(canary.id, canary.name, canary.config), PICK_CANARY)
    active = next((v for v in rows if v.is_active), None)
    if active is not None:
        return ModelPick(_from_config(active.id, active.name, active.config), PICK_DEFAULT)
    return ModelPick(shipped_model(), PICK_DEFAULT)


def servable_versions(session: Session) -> list[ModelVersion]:
    """Denoiser versions a request may name (not retired): the active one first, then newest."""
    return list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.kind == ModelKind.DENOISER, ModelVersion.retired_at.is_(None))
            .order_by(ModelVersion.is_active.desc(), ModelVersion.created_at.desc())
        )
    )


def serving_of(version: ModelVersion) -> ServingModel:
    return _from_config(version.id, version.name, version.config)


def config_model(config: dict[str, Any]) -> ServingModel:
    """A checkpoint config's defaults as a request would get them (raises on a malformed one)."""
    return _from_config(None, "", config)


_SHIPPED_CHECKPOINT: dict[str, Any] = {}


def shipped_checkpoint() -> dict[str, Any]:
    """The shipped model's weights file: its bytes and parameters, read from its safetensors
    header once (no torch)."""
    if not _SHIPPED_CHECKPOINT:
        _SHIPPED_CHECKPOINT.update(safetensors_summary(DEFAULT_MODEL_DIR / "model.safetensors"))
    return dict(_SHIPPED_CHECKPOINT)


# The bytes per element of safetensors' dtypes.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class CheckpointFileError(ValueError):
    """A weights file that is not a well-formed safetensors file (a pickle is refused)."""


def safetensors_summary(path: Path) -> dict[str, Any]:
    """Check a safetensors file from its header alone, without torch: not a pickle (a zip of
    pickles starts with PK, a plain pickle with the PROTO opcode), a JSON header whose every
    tensor has a known dtype and a byte range that matches its shape and lies in the file.
    Returns {"bytes", "parameters", "tensors", "prefixes"} (the key prefixes before the first
    dot, e.g. unet)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointFileError(
                f"{path} is a pickle (torch.save) file; diffusion-queue loads only safetensors, "
                "because unpickling can run arbitrary code"
            )
        if len(head) < 8:
            raise CheckpointFileError(f"{path} is not a safetensors file (too short)")
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, 100_000_000):
            raise CheckpointFileError(f"{path} is not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointFileError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path} is not a safetensors file (bad header)")
    data_bytes = size - 8 - header_len
    parameters, prefixes = 0, set()
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            start, end = (int(v) for v in entry["data_offsets"])
            width = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(f"{path}: tensor {key!r} has a malformed entry") from None
        if not 0 <= start <= end <= data_bytes or end - start != count * width:
            raise CheckpointFileError(f"{path}: tensor {key!r} lies outside the file")
        parameters += count
        prefixes.add(key.split(".", 1)[0])
    return {
        "bytes": size,
        "parameters": parameters,
        "tensors": sum(1 for k in header if k != "__metadata__"),
        "prefixes": sorted(prefixes),
    }


# --- the operator's versions ---------------------------------------------------------------


def find_version(session: Session, ref: str | uuid.UUID) -> ModelVersion:
    """A version by id or name; LookupError naming it otherwise."""
    version = None
    if isinstance(ref, uuid.UUID):
        version = session.get(ModelVersion, ref)
    else:
        try:
            version = session.get(ModelVersion, uuid.UUID(ref))
        except ValueError:
            version = session.scalar(select(ModelVersion).where(ModelVersion.name == ref))
    if version is None:
        raise LookupError(f"there is no model version {str(ref)[:130]!r}")
    return version


def retire_version(session: Session, version: ModelVersion) -> bool:
    """Retire ``version``: no new job may name it and it can no longer be activated (jobs
    already queued on it still run). Refuses the active version and the canary (activate
    another, or end the canary, first). Returns False when it was retired already."""
    if version.retired_at is not None:
        return False
    if version.is_active:
        raise ModelStateError(
            f"model version {version.name!r} is the active one; activate another version (or "
            "the shipped default) before retiring it"
        )
    if version.canary_percent > 0:
        raise ModelStateError(
            f"model version {version.name!r} is the canary; end the canary before retiring it"
        )
    version.retired_at = utcnow()
    session.flush()
    return True


MODEL_FILES = ("model.json", "model.safetensors")


def check_version_name(session: Session, name: str) -> None:
    if not VERSION_NAME.fullmatch(name):
        raise ModelRequestError(
            f"name {name[:130]!r} is not valid: use 1-128 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise ModelRequestError(f"name {name!r} is reserved; choose another")
    if session.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
        raise ModelRequestError(f"a model version named {name!r} exists already")


def register_import(
    session: Session,
    storage: Storage,
    name: str,
    config: Mapping[str, Any],
    files: Mapping[str, bytes],
    checkpoint: Mapping[str, Any],
) -> ModelVersion:
    """Upload a checked checkpoint (``files``: model.json and model.safetensors) under
    ``models/<name>/imported`` and add its version, inactive. The objects go first: a failed
    upload leaves no row, and a row never names missing files."""
    check_version_name(session, name)
    prefix = f"models/{name}/imported"
    for file_name in MODEL_FILES:
        storage.put(f"{prefix}/{file_name}", files[file_name])
    version = ModelVersion(
        id=uuid.uuid4(),
        name=name,
        kind=ModelKind.DENOISER,
        checkpoint_key=prefix,
        config=dict(config),
        metrics={"checkpoint": dict(checkpoint)},
        created_at=utcnow(),
    )
    session.add(version)
    session.flush()
    return version
