"""Model checkpoints in object storage: a version's ``<prefix>/model.{json,safetensors}``,
copied to a local directory once, for a worker to load or a fine-tune to start from."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from core.storage.base import Storage

CHECKPOINT_FILES = ("model.json", "model.safetensors")


def fetch_checkpoint(storage: Storage, prefix: str, dest: Path) -> Path:
    """Copy ``<prefix>/model.{json,safetensors}`` from storage into ``dest`` (once): into a
    directory beside it first, renamed into place when complete, so that a copy cut short is
    never taken for a checkpoint."""
    if all((dest / f).is_file() for f in CHECKPOINT_FILES):
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for name in CHECKPOINT_FILES:
            (tmp / name).write_bytes(storage.get(f"{prefix.rstrip('/')}/{name}"))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
