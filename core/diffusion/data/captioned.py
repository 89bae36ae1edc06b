"""The unit every dataset yields, an RGB image with its caption, and the bridge to tensors.

Datasets in this package work in numpy (H, W, 3) uint8 arrays; the model works in float32
(B, 3, H, W) tensors scaled to [-1, 1], as in DDPM (Ho et al. 2020, §3.3). The two converters here
are the only place in the data package that touches torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image


# eq=False: the generated __eq__ would compare arrays element-wise and fail on bool(); identity
# equality (and hashing) is what a frozen record holding an array can honestly offer.
@dataclass(frozen=True, eq=False)
class CaptionedImage:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str

    def __post_init__(self) -> None:
        image = self.image
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("a captioned image must be an (H, W, 3) numpy array")
        if image.dtype != np.uint8:
            raise ValueError(f"a captioned image must be uint8 RGB, not {image.dtype}")
        if not isinstance(self.caption, str):
            raise ValueError("a caption must be a string")


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack (H, W, 3) uint8 images into a float32 (B, 3, H, W) tensor in [-1, 1]."""
    if len(images) == 0:
        raise ValueError("images_to_tensor needs at least one image")
    shapes = {np.shape(image) for image in images}
    if len(shapes) != 1:
        raise ValueError(f"images must all have the same shape, got {sorted(shapes)}")
    batch = np.stack(images)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError("images must be (H, W, 3) uint8 RGB arrays")
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32)
    return (x / 127.5 - 1.0).contiguous()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """Inverse of :func:`images_to_tensor`: clamp to [-1, 1], rescale, round to uint8 RGB images."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    pixels = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a) for a in array]


class CaptionedDataset(Protocol):
    """What training needs of a dataset: a length and indexed captioned images."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> CaptionedImage: ...
