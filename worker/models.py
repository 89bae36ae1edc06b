"""Model versions loaded once per worker process and kept, as many as fit in a memory budget.

A job names the version it runs on (the one active when it was submitted; None is the default
model shipped with the code). A version's files live in object storage under its
``checkpoint_key``; they are fetched once into DQ_MODEL_CACHE_DIR. When an admin activates another
version, new jobs name it and the worker loads it beside the old one: no restart.

The cache keeps versions in least-recently-used order within DQ_WORKER_MODEL_MEMORY_MB, each
counted by the bytes of its parameters and buffers as loaded (so a half-precision model counts
half); a version that alone exceeds the budget is still kept, alone. What it holds
(:meth:`ModelCache.held`) is what a claim prefers (``core.queue.fairness``, model affinity) and
what the worker's presence row says (``worker.heartbeat``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db.models import ModelVersion
from core.services.model_versions import DEFAULT_MODEL_DIR
from core.storage import Storage
from core.storage.checkpoints import fetch_checkpoint

if TYPE_CHECKING:
    from core.diffusion.pipeline import LatentDiffusion

log = logging.getLogger(__name__)


class ModelUnavailable(Exception):
    """The job's model version cannot be loaded; the message is for the user."""


def model_bytes(model: Any) -> int:
    """The bytes of a module's parameters and buffers, in the dtypes and on the device they are
    loaded in: what keeping it costs."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """Loaded pipelines, least recently used out first once their bytes pass ``memory_bytes``;
    the one just loaded always stays."""

    def __init__(
        self,
        engine: Engine,
        storage: Storage,
        cache_dir: str | Path,
        device: str | None = None,
        memory_bytes: int = 2048 * 2**20,
        precision: str = "fp32",
    ):
        self.engine = engine
        self.storage = storage
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.precision = precision  # DQ_PRECISION, resolved for the device at each load
        self.running_precision: str | None = None  # what the loaded models run in
        self.memory_bytes = memory_bytes
        # Most recently used last, with each model's bytes.
        self._models: OrderedDict[uuid.UUID | None, tuple[LatentDiffusion, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # models loaded by this process (the benchmark counts them)
        # Called after each load, outside the lock: the heartbeat tells the other workers at
        # once what this one holds now (model affinity reads it), not at its next beat.
        self.on_load: Callable[[], None] | None = None

    def get(self, version_id: uuid.UUID | None) -> LatentDiffusion:
        with self._lock:
            entry = self._models.get(version_id)
            if entry is not None:
                self._models.move_to_end(version_id)
                return entry[0]
        model = self._load(version_id)
        size = model_bytes(model)
        with self._lock:
            self.loads += 1
            self._models[version_id] = (model, size)
            self._models.move_to_end(version_id)
            total = sum(n for _, n in self._models.values())
            while total > self.memory_bytes and len(self._models) > 1:
                evicted, (_, freed) = self._models.popitem(last=False)
                total -= freed
                log.info(
                    "model %s evicted from the cache (%.1f MB; %.1f MB of %.0f MB held)",
                    evicted or "default",
                    freed / 2**20,
                    total / 2**20,
                    self.memory_bytes / 2**20,
                )
        if self.on_load is not None:
            try:
                self.on_load()
            except Exception:  # a nicety for other workers' claims; never fails a job
                log.debug("could not say which models this worker holds", exc_info=True)
        return model

    def held(self) -> list[uuid.UUID | None]:
        """The versions loaded now (None: the shipped default), most recently used last."""
        with self._lock:
            return list(self._models)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._models.values())

    def _load(self, version_id: uuid.UUID | None) -> LatentDiffusion:
        from core.diffusion.checkpoint import CheckpointError
        from core.diffusion.pipeline import LatentDiffusion
        from core.storage import ObjectNotFound

        if version_id is None:
            directory, name = DEFAULT_MODEL_DIR, "the default model"
        else:
            with Session(self.engine) as session:
                version = session.get(ModelVersion, version_id)
                if version is None:
                    raise ModelUnavailable(f"model version {version_id} no longer exists")
                name, prefix = f"model version {version.name!r}", version.checkpoint_key
            try:
                directory = fetch_checkpoint(self.storage, prefix, self.cache_dir / str(version_id))
            except ObjectNotFound as e:
                # Other storage errors propagate: they are transient, and the job is retried.
                raise ModelUnavailable(f"{name} has no checkpoint in storage: {e}") from None
        try:
            model = LatentDiffusion.load(directory, device=self.device, precision=self.precision)
        except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
            raise ModelUnavailable(f"{name} cannot be loaded: {e}") from None
        model.latent_rgb_map()  # fit the live-preview map now, not during the first job
        self.running_precision = model.precision
        log.info("loaded %s from %s on %s in %s", name, directory, model.device, model.precision)
        return model
