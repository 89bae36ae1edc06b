"""What the evaluation's parts share: adherence counts, image seeds, images as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.diffusion.data.captioned import images_to_tensor


@dataclass(frozen=True)
class Adherence:
    matched: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.matched / self.total if self.total else None


def image_seed(seed: int, index: int) -> int:
    return seed * 1_000_000 + index


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    return images_to_tensor([np.asarray(im.convert("RGB")) for im in images])
