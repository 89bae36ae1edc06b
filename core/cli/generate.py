"""``dq generate``: images for a prompt, written as PNG files that carry their prompt and seed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click

from core.cli._common import (
    PRECISION_HELP,
    fail,
    resolve_checkpoint,
    resolve_precision_option,
)


@click.command()
@click.argument("prompt")
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="Model directory (default: the shipped model).",
)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option(
    "--sampler", default=None, help="ddpm, ddim, dpmpp-2m or dpmpp-3m (default: the model's)."
)
@click.option(
    "--guidance", type=float, default=None, help="Classifier-free guidance scale; 1 turns it off."
)
@click.option(
    "--guidance-interval",
    type=(float, float),
    default=None,
    metavar="LO HI",
    help="Guide only at noise levels t/T from LO to HI (default: the model's; 0 1: every step).",
)
@click.option(
    "--seed", type=int, default=None, help="Seed of the first image; the rest use seed+1, seed+2, …"
)
@click.option("-n", "--num-images", type=click.IntRange(1, 64), default=1, help="How many images.")
@click.option("--size", type=int, default=None, help="Image side in pixels (default: the model's).")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default="out.png",
    help="PNG file; with -n > 1, OUT-<i>.png.",
)
@click.option(
    "--init-image",
    type=click.Path(dir_okay=False),
    default=None,
    help="Start from this image (PNG, JPEG or WebP) instead of noise: image-to-image.",
)
@click.option(
    "--strength",
    type=float,
    default=None,
    help="With --init-image: how much of the schedule to run, in (0, 1] (default 0.75; 1 with "
    "--mask).",
)
@click.option(
    "--mask",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --init-image: white repaints, black keeps the init image's pixels (inpainting).",
)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--precision", default="auto", show_default=True, help=PRECISION_HELP)
def generate(
    prompt: str,
    negative_prompt: str,
    checkpoint: str | None,
    steps: int | None,
    sampler: str | None,
    guidance: float | None,
    guidance_interval: tuple[float, float] | None,
    seed: int | None,
    num_images: int,
    size: int | None,
    output: str,
    init_image: str | None,
    strength: float | None,
    mask: str | None,
    device: str | None,
    precision: str,
) -> None:
    """Generate images for PROMPT and write them as PNG; with --init-image, edit that image."""
    import torch
    from PIL import PngImagePlugin

    from core.diffusion.pipeline import (
        LatentDiffusion,
        PromptTruncatedWarning,
        pick_device,
        random_seed,
    )

    out = Path(output)
    if out.suffix.lower() != ".png":
        raise fail(f"output must be a .png file, not {out.name!r}")
    if not out.parent.is_dir():
        raise fail(f"output directory {out.parent} does not exist")
    if init_image is None and (mask is not None or strength is not None):
        raise fail("--mask and --strength need --init-image")
    init = _read(init_image, "--init-image", "RGB")
    mask_image = _read(mask, "--mask", "L")
    if init is not None and mask_image is not None and init.size != mask_image.size:
        raise fail(
            f"--mask is {mask_image.size[0]}×{mask_image.size[1]} pixels; its image is "
            f"{init.size[0]}×{init.size[1]}"
        )
    try:
        dev = torch.device(device) if device is not None else pick_device()
        resolved = resolve_precision_option(precision, dev)
        model = LatentDiffusion.load(resolve_checkpoint(checkpoint), device=dev, precision=resolved)
    except RuntimeError as e:  # e.g. an unknown or absent device
        raise fail(f"cannot use device {device!r}: {e}") from None
    first = random_seed() if seed is None else seed
    seeds = [first + i for i in range(num_images)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        images = model.generate(
            [prompt] * num_images,
            [negative_prompt] * num_images,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seeds=seeds,
            size=size,
            guidance_interval=guidance_interval,
            init_images=None if init is None else [init] * num_images,
            strength=strength,
            masks=None if mask_image is None else [mask_image] * num_images,
        )
    for w in caught:
        if issubclass(w.category, PromptTruncatedWarning):
            click.echo(f"dq: note: {w.message}", err=True)
            break
    paths = (
        [out]
        if num_images == 1
        else [out.with_name(f"{out.stem}-{i}.png") for i in range(num_images)]
    )
    for img, path, s in zip(images, paths, seeds, strict=True):
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", prompt)
        info.add_text("seed", str(s))
        img.save(path, pnginfo=info)
        click.echo(f"{path}  seed={s}")


def _read(path: str | None, option: str, mode: str) -> Any:
    """The image at ``path`` checked as the API checks uploads, or None; one line on failure."""
    if path is None:
        return None
    from core.runtime.settings import Settings
    from core.services.images import read_image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise fail(f"{option}: cannot read {path}: {e.strerror}") from None
    return read_image(data, option, max_bytes=Settings.from_env().max_upload_bytes, mode=mode)
