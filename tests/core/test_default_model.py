"""The shipped default model loads with no flags and follows simple prompts."""

from __future__ import annotations

import numpy as np

from core.cli import DEFAULT_CHECKPOINT, resolve_checkpoint
from core.diffusion.data.captioned import images_to_tensor
from core.diffusion.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITION_CENTERS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    layout_is_clear,
)
from core.diffusion.eval import DEFAULT_CLASSIFIER
from core.diffusion.eval.classifier import AttributeClassifier, Scene
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


def _two_object_prompts(count: int) -> list[Scene]:
    """Fixed two-object scenes: every color, shape, size and position, seen and held-out pairs,
    drawn from a seeded stream so the set never changes."""
    rng = np.random.default_rng(2024)
    scenes: list[Scene] = []
    while len(scenes) < count:
        objs = tuple(
            ShapeObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                color=tuple(COLORS)[int(rng.integers(len(COLORS)))],
                size=SIZES[int(rng.integers(len(SIZES)))],
                position=POSITIONS[int(p)],
            )
            for p in rng.choice(len(POSITIONS), size=2, replace=False)
        )
        if layout_is_clear(objs):
            scenes.append(Scene.of(objs, tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]))
    return scenes


def test_the_shipped_model_binds_each_objects_words_to_that_object() -> None:
    """24 two-object prompts at fixed seeds, read by the shipped classifier: each object's
    shape, color and size at its position, and nothing else, in at least 70% of the images.
    A guard against shipping a checkpoint that mixes up which object gets which attributes."""
    model = LatentDiffusion.load(DEFAULT_CHECKPOINT, device="cpu")
    classifier = AttributeClassifier.load(DEFAULT_CLASSIFIER)
    scenes = _two_object_prompts(24)
    images = model.generate([s.caption for s in scenes], seeds=list(range(len(scenes))))
    read = classifier.read(images_to_tensor([np.asarray(im) for im in images]))
    right = sum(r == s for r, s in zip(read, scenes, strict=True))
    assert right >= 0.7 * len(scenes), f"{right} of {len(scenes)} two-object prompts right"
