"""Image editing with the model's own forward process: image-to-image and inpainting.

Image-to-image (SDEdit, Meng et al. 2022). The init image is encoded, and its latent x0 is
noised in closed form to the step where the image starts,

    x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε            (DDPM eq. 4, q(x_t | x0) = N(√ᾱ_t·x0, (1−ᾱ_t)I))

with t the timestep at index S − k of the sampler's S timesteps, k = max(1, round(strength·S)):
the sampler then runs its own last k steps from there, so an image at strength s costs about s
of the steps, and strength 1 starts (almost) from noise. ε is the image's own first draw, the one
a text-to-image run starts from.

Inpainting (RePaint, Lugmayr et al. 2022, eq. 8 without resampling). Before each step at t, the
known region (mask 0) of x_t is replaced by q(x_t | x0) of the init latents with fresh noise,

    x_t ← m ⊙ x_t + (1 − m) ⊙ (√ᾱ_t·x0 + √(1−ᾱ_t)·ε′),

with the mask m brought to latent resolution by max-pooling (a latent pixel is repainted when any
of the image pixels it covers is), and after the last step the known region is x0 itself. The
decoded image is then composited with the init image in pixel space through the mask feathered
inward only (:func:`feathered`), so that every pixel outside the mask is the init image's exactly.

Each image of a batch starts at its own step: :func:`run_staggered` drives one sampler loop
(``core.diffusion.samplers.Steps``) per start step in lockstep, and each model call takes the
rows of every loop that has started. Each image draws its noise from its own generators, so one
seed gives one image whatever shares its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.diffusion.samplers import SamplingCanceled, StepLoop, Steps
from core.diffusion.schedule import NoiseSchedule

# Feathering of the pixel-space composite: how many pixels inside the mask blend from the init
# image into the generated one.
FEATHER_PIXELS = 2


def start_index(steps: int, strength: float) -> int:
    """Index into the sampler's ``steps`` timesteps where an image of this strength starts."""
    if not 0.0 < strength <= 1.0:
        raise ValueError("strength must be in (0, 1]")
    return steps - max(1, min(steps, round(strength * steps)))


def image_array(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image as (size, size, 3) uint8, resized (Lanczos) when it is another size."""
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def mask_array(mask: Image.Image, size: int) -> np.ndarray:
    """A mask as (size, size) float32 of 0 (keep) and 1 (repaint: white, above mid-grey)."""
    grey = mask.convert("L")
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(grey) > 127).astype(np.float32)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask → (B, 1, H/f, W/f): 1 where any covered pixel is repainted."""
    return F.max_pool2d(mask, kernel_size=factor, stride=factor)


def feathered(mask: np.ndarray, radius: int = FEATHER_PIXELS) -> np.ndarray:
    """The mask with its inner edge softened: m ⊙ (1 − box_blur(1 − m)). Zero wherever the mask
    is zero, so blending through it leaves every pixel outside the mask untouched."""
    if radius <= 0:
        return mask
    keep = torch.from_numpy(1.0 - mask)[None, None]
    k = 2 * radius + 1
    blurred = F.avg_pool2d(F.pad(keep, (radius,) * 4, mode="replicate"), k, stride=1)
    return mask * (1.0 - blurred[0, 0].numpy())


def composite(generated: Image.Image, init: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The generated image inside the (feathered) mask, the init image's pixels outside it."""
    f = feathered(mask)[..., None]
    out = np.asarray(generated, dtype=np.float32) * f + init.astype(np.float32) * (1.0 - f)
    pixels = np.where(f > 0, np.clip(np.rint(out), 0, 255), init).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.info.update(generated.info)
    return image


@dataclass
class Edits:
    """What image editing adds to a batch: per image, where it starts (index into the
    timesteps; 0 for text-to-image), its init latents and latent mask (None where it has none),
    the pixel-space init and mask for the composite, and the noise of the known region."""

    starts: list[int]
    init: torch.Tensor | None  # (B, C, h, w) scaled latents; zeros for images without one
    mask: torch.Tensor | None  # (B, 1, h, w) latent mask; ones for images without one
    init_pixels: list[np.ndarray | None]
    mask_pixels: list[np.ndarray | None]
    known_noise: Callable[[list[int], torch.Tensor], torch.Tensor]  # (rows, like) -> ε′
    has_init: list[bool] = field(init=False)
    has_mask: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.has_init = [p is not None for p in self.init_pixels]
        self.has_mask = [p is not None for p in self.mask_pixels]


Denoise = Callable[[torch.Tensor, int, list[int]], tuple[torch.Tensor, torch.Tensor]]
RowNoise = Callable[[list[int]], Callable[[torch.Tensor], torch.Tensor]]


def run_staggered(
    loop: StepLoop,
    denoise: Denoise,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    noise_for: RowNoise,
    edits: Edits,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Every image's sampler loop from its start step, in lockstep: at each of the timesteps,
    one model call over the rows of every loop that has started. Returns the final latents, the
    known region of inpainted images put back exactly."""
    total = len(timesteps)
    groups: dict[int, list[int]] = {}
    for row, start in enumerate(edits.starts):
        groups.setdefault(start, []).append(row)
    running: dict[int, tuple[Steps, torch.Tensor]] = {}  # start -> (loop, x it asked with)
    done: dict[int, torch.Tensor] = {}
    preview = edits.init.clone() if edits.init is not None else torch.zeros_like(x_T)
    for i, t in enumerate(timesteps):
        if i in groups:
            rows = groups[i]
            x = x_T[rows]
            if edits.init is not None:
                init_rows = [k for k, r in enumerate(rows) if edits.has_init[r]]
                if init_rows:
                    picked = [rows[k] for k in init_rows]
                    t_b = torch.full((len(picked),), t, device=x.device)
                    x[init_rows] = schedule.q_sample(edits.init[picked], t_b, x_T[picked])
            steps = loop(x, schedule, timesteps[i:], noise_for(rows))
            x_asked, t_asked = next(steps)
            assert t_asked == t
            running[i] = (steps, x_asked)
        starts = sorted(running)
        if not starts:  # no image starts this early: nothing to run at this step
            if on_step is not None:
                on_step(i + 1, total, preview)
            continue
        for start in starts:
            _paste_known(edits, schedule, groups[start], running[start][1], t)
        rows_all = [r for start in starts for r in groups[start]]
        x_all = torch.cat([running[start][1] for start in starts])
        x0_all, eps_all = denoise(x_all, t, rows_all)
        offset = 0
        for start in starts:
            rows = groups[start]
            steps, _ = running[start]
            x0, eps = x0_all[offset : offset + len(rows)], eps_all[offset : offset + len(rows)]
            offset += len(rows)
            preview[rows] = x0
            try:
                x_next, _ = steps.send((x0, eps))
                running[start] = (steps, x_next)
            except StopIteration as finished:
                done[start] = finished.value
                del running[start]
        if on_step is not None:
            on_step(i + 1, total, preview)
        if should_stop is not None and i + 1 < total and should_stop():
            raise SamplingCanceled(f"canceled after step {i + 1} of {total}")
    latents = torch.empty_like(x_T)
    for start, rows in groups.items():
        latents[rows] = done[start]
    if edits.mask is not None and edits.init is not None:
        masked = [r for r, m in enumerate(edits.has_mask) if m]
        if masked:
            m = edits.mask[masked]
            latents[masked] = m * latents[masked] + (1 - m) * edits.init[masked]
    return latents


def _paste_known(
    edits: Edits, schedule: NoiseSchedule, rows: Sequence[int], x: torch.Tensor, t: int
) -> None:
    """RePaint: the known region of each inpainted row of ``x`` (the loop's own tensor, changed
    in place) becomes q(x_t | x0) of its init latents, with fresh noise."""
    if edits.mask is None or edits.init is None:
        return
    local = [k for k, r in enumerate(rows) if edits.has_mask[r]]
    if not local:
        return
    picked = [rows[k] for k in local]
    t_b = torch.full((len(picked),), t, device=x.device)
    known = schedule.q_sample(edits.init[picked], t_b, edits.known_noise(picked, x[local]))
    m = edits.mask[picked]
    x[local] = m * x[local] + (1 - m) * known
