"""Image-to-image and inpainting (core.diffusion.editing) on the tiny pipeline: the start step of
each strength, exact pixels outside a mask, one image per seed whatever shares its batch, for
every sampler, and clear errors for bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.diffusion.editing import feathered, start_index
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.samplers import SAMPLERS

SIZE = 32
STEPS = 6


def picture(color: tuple[int, int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = color
    return Image.fromarray(pixels)


def left_half_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 255
    return Image.fromarray(mask)


def arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def test_the_service_and_the_pipeline_default_to_one_strength() -> None:
    """core.services.uploads stores the default for API jobs; the pipeline applies it to direct
    callers and the CLI (each defines it: services may not import the torch side)."""
    from core.diffusion.pipeline import DEFAULT_STRENGTH
    from core.services.uploads import DEFAULT_STRENGTH as SERVICE_DEFAULT

    assert DEFAULT_STRENGTH == SERVICE_DEFAULT == 0.75


def test_a_strength_runs_that_share_of_the_steps() -> None:
    assert [start_index(20, s) for s in (1.0, 0.8, 0.5, 0.6, 0.01)] == [0, 4, 10, 8, 19]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            start_index(20, bad)


def test_image_to_image_steps_only_from_its_start(tiny_pipeline: LatentDiffusion) -> None:
    """At strength s the model is called round(s·S) times, at the sampler's last timesteps."""
    seen: list[int] = []
    unet = tiny_pipeline.unet
    original = unet.forward

    def counting(x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        seen.append(int(t[0]))
        return original(x, t, *rest)

    unet.forward = counting  # type: ignore[method-assign,assignment]
    try:
        tiny_pipeline.generate(
            ["a red circle"], steps=10, guidance=1.0, seeds=[1], size=SIZE,
            init_images=[picture((200, 0, 0))], strength=0.5,
        )  # fmt: skip
    finally:
        unet.forward = original  # type: ignore[method-assign]
    assert len(seen) == 5
    full = tiny_pipeline.prepare(["x"], steps=10, seeds=[1], size=SIZE).timesteps
    assert seen == full[5:]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_one_seed_gives_one_image_whatever_shares_its_batch(
    tiny_pipeline: LatentDiffusion, sampler: str
) -> None:
    """Alone, or beside text-to-image and edits at other strengths and with masks: the same
    pixels, bit for bit on the CPU."""
    red, blue = picture((200, 0, 0), 1), picture((0, 0, 200), 2)
    kwargs: dict[str, Any] = dict(steps=STEPS, guidance=3.0, sampler=sampler, size=SIZE)
    batch = tiny_pipeline.generate(
        ["a red circle", "a blue square", "a green star", "a red square"],
        seeds=[11, 12, 13, 14],
        init_images=[red, None, blue, blue],
        strength=[0.5, None, 0.8, 1.0],
        masks=[None, None, None, left_half_mask()],
        **kwargs,
    )
    alone = [
        tiny_pipeline.generate(
            ["a red circle"], seeds=[11], init_images=[red], strength=0.5, **kwargs
        ),
        tiny_pipeline.generate(["a blue square"], seeds=[12], **kwargs),
        tiny_pipeline.generate(
            ["a green star"], seeds=[13], init_images=[blue], strength=0.8, **kwargs
        ),
        tiny_pipeline.generate(
            ["a red square"],
            seeds=[14],
            init_images=[blue],
            strength=1.0,
            masks=[left_half_mask()],
            **kwargs,
        ),
    ]
    for together, (single,) in zip(arrays(batch), alone, strict=True):
        assert np.array_equal(together, np.asarray(single))
    # and the text-to-image row is the one a plain text-to-image batch makes
    (plain,) = tiny_pipeline.generate(["a blue square"], seeds=[12], **kwargs)
    assert np.array_equal(arrays(batch)[1], np.asarray(plain))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_inpainting_keeps_every_pixel_outside_the_mask(
    tiny_pipeline: LatentDiffusion, sampler: str
) -> None:
    init = picture((0, 200, 0), 3)
    (out,) = tiny_pipeline.generate(
        ["a red circle"], steps=STEPS, sampler=sampler, seeds=[5], size=SIZE,
        init_images=[init], masks=[left_half_mask()],
    )  # fmt: skip
    got, want = np.asarray(out), np.asarray(init)
    assert np.array_equal(got[:, SIZE // 2 :], want[:, SIZE // 2 :])
    assert not np.array_equal(got[:, : SIZE // 2 - 2], want[:, : SIZE // 2 - 2])
    assert out.info["seed"] == 5


def test_the_feathered_mask_is_zero_outside_and_one_deep_inside() -> None:
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[:, :8] = 1
    f = feathered(mask, radius=2)
    assert (f[:, 8:] == 0).all() and (f[:, :6] == 1).all()
    assert ((f[:, 6:8] > 0) & (f[:, 6:8] < 1)).all()


def test_an_init_image_of_another_size_is_resized(tiny_pipeline: LatentDiffusion) -> None:
    big = picture((200, 0, 0)).resize((96, 96))
    (out,) = tiny_pipeline.generate(
        ["a red circle"], steps=2, seeds=[1], size=SIZE, init_images=[big], strength=0.5
    )
    assert out.size == (SIZE, SIZE)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"masks": [left_half_mask()]}, "a mask needs an init image"),
        ({"init_images": [picture((1, 2, 3))], "strength": 0.0}, "strength must be greater"),
        ({"init_images": [picture((1, 2, 3))], "strength": 1.5}, "strength must be greater"),
        ({"init_images": [None], "strength": [0.5]}, "strength applies only"),
        ({"init_images": [picture((1, 2, 3)), None]}, "init_images must hold one entry"),
        ({"init_images": ["not an image"]}, "must be PIL images"),
        (
            {
                "init_images": [picture((1, 2, 3))],
                "masks": [left_half_mask().resize((SIZE * 2, SIZE * 2))],
            },
            "a mask must be the size of its init image",
        ),
    ],
)
def test_bad_edit_inputs_name_the_parameter(
    tiny_pipeline: LatentDiffusion, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_pipeline.generate(["a red circle"], steps=2, seeds=[1], size=SIZE, **kwargs)
