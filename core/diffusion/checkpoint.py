"""Checkpoints: a directory with ``model.safetensors`` and ``model.json``. Nothing is unpickled.

safetensors holds raw tensors behind a JSON header, so loading one cannot run code; the JSON
beside it holds every config needed to rebuild the modules. A file that looks like a pickle
(``torch.save`` writes a zip of pickles, plain pickle starts with the PROTO opcode) is refused
with a clear message before anything reads it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "diffusion-queue"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "model.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, of the wrong kind, or not in safetensors format."""


def save_checkpoint(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Writes both files through temporary names, so a crash never leaves a half checkpoint."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    tmp_w, tmp_c = d / (WEIGHTS + ".tmp"), d / (CONFIG + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp_w))
    tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, d / WEIGHTS)
    os.replace(tmp_c, d / CONFIG)
    return d


def _refuse_pickle(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path} is a pickle (torch.save) file; diffusion-queue loads only safetensors, "
            "because unpickling can run arbitrary code"
        )
    if len(head) < 8:
        raise CheckpointError(f"{path} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > path.stat().st_size - 8:
        raise CheckpointError(f"{path} is not a safetensors file (bad header)")


def read_config(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused)" if pickles else ""
        raise CheckpointError(f"{d} has no {CONFIG}; it is not a diffusion-queue checkpoint{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a diffusion-queue checkpoint config")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format version {config.get('format_version')}; "
            f"this build reads version {FORMAT_VERSION}"
        )
    return config


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    d = Path(directory)
    config = read_config(d)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{d} has no {WEIGHTS}")
    _refuse_pickle(weights)
    try:
        tensors = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights} could not be read as safetensors: {e}") from None
    return tensors, config


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
