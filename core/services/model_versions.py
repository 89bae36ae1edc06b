"""Which model serves: the active denoiser version, or the default model shipped with the code.

This module reads model configs as JSON and never imports torch, so the web app can show a
model's defaults (steps, guidance, sampler, size) and validate a request against them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.models import ModelKind, ModelVersion, utcnow

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "diffusion" / "default_model"
DEFAULT_MODEL_NAME = "default"


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
