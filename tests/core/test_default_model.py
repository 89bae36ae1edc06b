"""The shipped default model loads with no flags and follows simple prompts."""

from __future__ import annotations

import numpy as np

from core.cli import DEFAULT_CHECKPOINT, resolve_checkpoint
from core.diffusion.data.shapes import COLORS, POSITION_CENTERS
from core.diffusion.pipeline import LatentDiffusion


def test_default_checkpoint_is_used_without_flags_and_generates_a_batch() -> None:
    assert resolve_checkpoint(None) == DEFAULT_CHECKPOINT
    model = LatentDiffusion.load(DEFAULT_CHECKPOINT, device="cpu")
    prompts = ["a large red circle in the top left", "a large blue square in the bottom right"]
    images = model.generate(prompts, seeds=[0, 1], steps=20)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    # The named color sits at the named position: the model follows the prompt, not just runs.
    for img, color, pos in zip(images, ("red", "blue"), ("top left", "bottom right"), strict=True):
        x, y = (int(v) for v in POSITION_CENTERS[pos])
        patch = np.asarray(img)[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(0)
        assert np.abs(patch - np.array(COLORS[color])).max() < 60, (color, patch)
