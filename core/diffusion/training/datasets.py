"""Builds the training dataset a config names and cuts it into deterministic batches.

Batch ``step`` always holds the same samples for a given seed, so a resumed run sees exactly the
data an uninterrupted one would have.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from core.diffusion.data.captioned import CaptionedDataset, CaptionedImage, images_to_tensor
from core.diffusion.data.imagefolder import ImageFolderDataset
from core.diffusion.data.shapes import ShapesDataset
from core.diffusion.training.config import DataConfig


def build_dataset(cfg: DataConfig, split: str = "train") -> CaptionedDataset:
    if cfg.kind == "imagefolder":
        return ImageFolderDataset(cfg.path, image_size=cfg.image_size)
    held_out = tuple((str(c), str(s)) for c, s in cfg.held_out)
    return ShapesDataset(
        seed=cfg.seed,
        split=split,
        held_out=held_out,
        image_size=cfg.image_size,
        max_objects=cfg.max_objects,
        two_object_share=cfg.two_object_share,
    )


@lru_cache(maxsize=2)
def _epoch_order(length: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(length)


def batch_indices(length: int, seed: int, step: int, batch_size: int) -> list[int]:
    """The dataset indices of batch ``step``: a fresh permutation every epoch."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, length)
        out.append(int(_epoch_order(length, seed, epoch)[pos]))
    return out


def load_samples(
    dataset: CaptionedDataset, seed: int, step: int, batch_size: int
) -> list[CaptionedImage]:
    """The samples of batch ``step``."""
    return [dataset[i] for i in batch_indices(len(dataset), seed, step, batch_size)]


def load_batch(
    dataset: CaptionedDataset, seed: int, step: int, batch_size: int
) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, H, W) in [−1, 1] and their captions."""
    samples = load_samples(dataset, seed, step, batch_size)
    return images_to_tensor([s.image for s in samples]), [s.caption for s in samples]
