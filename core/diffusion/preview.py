"""The cheap live preview: a fitted map from latent pixels to RGB, no decoder pass.

This is the "approx cheap" preview of AUTOMATIC1111: each latent pixel's features
``(1, z, z_i·z_j)`` (quadratic in z) times a (F, 3) matrix fitted once for an autoencoder, by
least squares on images of coloured blocks in the colours of the built-in shapes data. On shapes
images it is about half as far from the decoder's output as the best flat colour
(tests/core/test_pipeline.py). Deterministic.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch.nn import functional as F

from core.diffusion.autoencoder import Autoencoder
from core.diffusion.data.captioned import tensor_to_images
from core.diffusion.data.shapes import BACKGROUNDS, COLORS


def preview_features(z: torch.Tensor) -> torch.Tensor:
    """(…, C) latent pixels → (…, 1 + C + C(C+1)/2): a constant, z, and every z_i·z_j."""
    i, j = torch.triu_indices(z.shape[-1], z.shape[-1])
    return torch.cat([torch.ones_like(z[..., :1]), z, z[..., i] * z[..., j]], -1)


@torch.no_grad()
def fit_latent_rgb_map(autoencoder: Autoencoder, latent_scale_factor: float) -> torch.Tensor:
    """The (F, 3) map from a scaled latent pixel's features to the RGB of its image patch."""
    device = next(autoencoder.parameters()).device
    g = torch.Generator("cpu").manual_seed(0)
    f = autoencoder.config.downsample_factor
    side = 16 * f
    # Images of blocks in the colours of the built-in shapes data (its shapes and backgrounds),
    # encoded; each latent pixel is paired with its patch's colour.
    palette = torch.tensor([*COLORS.values(), *BACKGROUNDS.values()]) / 127.5 - 1
    pick = torch.randint(len(palette), (64, 4, 4), generator=g)
    blocks = palette[pick].permute(0, 3, 1, 2)  # (B, 3, 4, 4)
    images = F.interpolate(blocks, size=(side, side), mode="nearest").to(device)
    z = autoencoder.encode(images).mean * latent_scale_factor  # (B, C, h, w)
    rgb = F.avg_pool2d(images, f)  # (B, 3, h, w)
    x = preview_features(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu().double())
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).cpu().double()
    return torch.linalg.lstsq(x, y).solution


def latents_to_preview(
    latents: torch.Tensor, rgb_map: torch.Tensor, size: int = 64
) -> list[Image.Image]:
    """Scaled latents (B, C, h, w) → B preview images of ``size`` pixels."""
    z = latents.detach().cpu().double().permute(0, 2, 3, 1)  # (B, h, w, C)
    rgb = preview_features(z) @ rgb_map  # (B, h, w, 3)
    images = tensor_to_images(rgb.permute(0, 3, 1, 2).float().clamp(-1, 1))
    return [im.resize((size, size), Image.Resampling.BILINEAR) for im in images]
