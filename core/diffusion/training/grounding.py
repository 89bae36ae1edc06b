"""Grounding: pulls each object's words' cross-attention onto that object's pixels.

The shapes renderer knows every object's mask and which caption words name it, so training can
supervise the UNet's text cross-attention directly, as TokenCompose (Wang et al., CVPR 2024)
does with segmentation masks. Two terms, each averaged over the cross-attention layers, with
the heads of a layer averaged first:

- **token axis** (the one that matters for binding): at the pixels of object k, of the
  attention that goes to either object's words, the share that goes to k's own,
  −log(own / (own + other)). Only two-object images have an "other"; this term is what tells
  the model which of two colors belongs where.
- **spatial axis** (TokenCompose's L_token): each of k's words spends its attention, normalised
  over positions, inside k's mask, −log(mass inside).

A word belongs to object k when it names k's size, color, shape or position (see
``ShapesSample.word_objects``); every other token (a, in, the background, padding) is free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.diffusion.data.shapes import ShapesSample, object_masks

EPS = 1e-6
MASK_THRESHOLD = 0.05  # a grid cell belongs to an object's region above this coverage


def word_owner_tokens(
    samples: Sequence[ShapesSample], kept: Sequence[bool], length: int, objects: int = 2
) -> torch.Tensor:
    """(B, L, K) one-hot: token j of caption b names object k. Token 0 is ``<bos>``, so word w
    is token w+1; words past the tokenizer's room are cut like the tokens, and a dropped caption
    (``kept`` False, trained as "") names nothing."""
    out = torch.zeros(len(samples), length, objects)
    for b, (sample, keep) in enumerate(zip(samples, kept, strict=True)):
        if not keep:
            continue
        for w, k in enumerate(sample.word_objects[: length - 2]):
            if k >= 0:
                out[b, w + 1, k] = 1.0
    return out


def sample_masks(samples: Sequence[ShapesSample], objects: int = 2) -> torch.Tensor:
    """(B, K, H, W) object coverage; a missing object's mask is all zeros."""
    size = samples[0].image.shape[0]
    out = np.zeros((len(samples), objects, size, size), dtype=np.float32)
    for b, sample in enumerate(samples):
        masks = object_masks(sample)
        out[b, : len(masks)] = masks
    return torch.from_numpy(out)


def grounding_losses(
    maps: Sequence[torch.Tensor], masks: torch.Tensor, owners: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The token-axis and spatial-axis losses (see the module doc), each a scalar.

    ``maps``: each cross-attention layer's probabilities (B, heads, h·w, L) on a square grid;
    ``masks``: (B, K, H, W) object coverage at image resolution; ``owners``: (B, L, K) which
    tokens name which object (:func:`word_owner_tokens`).
    """
    owners = owners.to(maps[0].device, maps[0].dtype)
    token_terms, spatial_terms = [], []
    for probs in maps:
        a = probs.mean(dim=1)  # (B, N, L): heads averaged
        side = round(a.shape[1] ** 0.5)
        m = F.adaptive_avg_pool2d(masks.to(a), side).flatten(2)  # (B, K, N)
        # Object k is "present" with words when both its mask and its tokens exist.
        present = (m.sum(-1) > 0) & (owners.sum(1) > 0)  # (B, K)
        on_object = a @ owners  # (B, N, K): attention mass on each object's words
        own = on_object.transpose(1, 2)  # (B, K, N)
        both = on_object.sum(-1, keepdim=True).transpose(1, 2)  # (B, 1, N)
        pairs = present.all(dim=1, keepdim=True) & present  # only where there is an "other"
        w = m * pairs[..., None]
        nll = -torch.log((own + EPS) / (both + EPS))
        token_terms.append((w * nll).sum() / w.sum().clamp_min(EPS))
        # Spatial axis: for each token, its attention over positions, and how much lands in
        # its object's mask.
        per_token = a / a.sum(dim=1, keepdim=True).clamp_min(EPS)  # (B, N, L), columns sum to 1
        region = (m > MASK_THRESHOLD).to(a)  # the cells the object touches at all
        inside = torch.einsum("bnl,bkn->blk", per_token, region)  # (B, L, K)
        mass = (inside * owners).sum(-1)  # (B, L): for owned tokens, the mass in their object
        is_owned = owners.sum(-1) > 0
        if is_owned.any():
            spatial_terms.append(-torch.log(mass[is_owned] + EPS).mean())
        else:
            spatial_terms.append(a.sum() * 0.0)
    return {
        "token": torch.stack(token_terms).mean(),
        "spatial": torch.stack(spatial_terms).mean(),
    }


def mask_centers(masks: torch.Tensor) -> torch.Tensor:
    """(B, K, 2) each object's mask centroid (x, y), scaled to [−1, 1]; 0 for a missing one."""
    h, w = masks.shape[-2:]
    ys = (torch.arange(h, dtype=masks.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=masks.dtype) + 0.5) / w * 2 - 1
    total = masks.sum(dim=(2, 3)).clamp_min(EPS)
    cx = (masks.sum(dim=2) * xs).sum(-1) / total
    cy = (masks.sum(dim=3) * ys).sum(-1) / total
    return torch.stack([cx, cy], dim=-1)


def location_loss(
    predicted: torch.Tensor, owners: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Text-side grounding: mean squared error between the (x, y) read off each object word's
    state (``predicted``, (B, L, 2)) and the centroid of the mask of the object it names. It
    asks the text encoder to carry, in every word of an object, where that object is: what a
    cross-attention key needs for a pixel to find its own object's color and shape."""
    owners = owners.to(predicted)
    target = owners @ mask_centers(masks).to(predicted)  # (B, L, 2); 0 for unowned tokens
    owned = owners.sum(-1)  # (B, L)
    err = (predicted - target).pow(2).sum(-1)
    return (err * owned).sum() / owned.sum().clamp_min(1.0)


def layout_loss(
    layout: torch.Tensor, owners: torch.Tensor, masks: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """Text-side grounding of the text encoder's layout head (``TextEncoderConfig.layout``):
    :func:`location_loss` on its (x, y), plus the binary cross-entropy of its owned logit
    against whether each real token names an object (padding is left out)."""
    owned = (owners.sum(-1) > 0).to(layout)  # (B, L)
    real = token_mask.to(layout)
    bce = F.binary_cross_entropy_with_logits(layout[..., 2], owned, reduction="none")
    owned_term = (bce * real).sum() / real.sum().clamp_min(1.0)
    return location_loss(layout[..., :2], owners, masks) + owned_term
