"""The text-to-image pipeline: text encoder, denoiser, schedule and decoder, and ``generate``.

``generate`` is the one way to make images; the CLI, the worker and the evaluation all call it.
Each image has its own seed and its own random generator, and every tensor shape is the same
whatever the batch holds, so an image is bit-identical whether it is made alone or beside other
prompts (on the CPU; see docs for CUDA). The worker's batching across jobs relies on that.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.diffusion.autoencoder import Autoencoder, AutoencoderConfig
from core.diffusion.checkpoint import (
    CheckpointError,
    load_checkpoint,
    prefixed,
    save_checkpoint,
    unprefixed,
)
from core.diffusion.data.captioned import images_to_tensor, tensor_to_images
from core.diffusion.editing import (
    Edits,
    composite,
    image_array,
    latent_mask,
    mask_array,
    run_staggered,
    start_index,
)
from core.diffusion.precision import DTYPES, dtype_of, resolve_precision
from core.diffusion.preview import fit_latent_rgb_map, latents_to_preview
from core.diffusion.samplers import NoiseFn, SamplerSpec, get_sampler
from core.diffusion.schedule import NoiseSchedule, ScheduleConfig, inference_timesteps
from core.diffusion.text import TextConditioning, TextEncoder, TextEncoderConfig, WordTokenizer
from core.diffusion.unet import UNet, UNetConfig

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**63 - 1
# Image-to-image's strength when none is given (with a mask: 1).
DEFAULT_STRENGTH = 0.75
# XORed into an image's seed for the generator of an inpainted image's known-region noise.
KNOWN_REGION_SEED = 0x9E3779B97F4A7C15
OnStep = Callable[[int, int, torch.Tensor], None]


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder reads; the rest was dropped."""


Interval = tuple[float, float]


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int = 20
    guidance: float = 4.0
    sampler: str = "dpmpp-2m"
    # Noise levels t/(T−1) at which guidance applies; (0, 1) is every step.
    guidance_interval: Interval = (0.0, 1.0)


@dataclass
class GenerationPlan:
    """What :meth:`LatentDiffusion.prepare` makes and :meth:`LatentDiffusion.sample` runs."""

    seeds: list[int]
    sampler: SamplerSpec
    denoise: GuidedDenoiser
    timesteps: list[int]
    x: torch.Tensor  # the starting noise, one row per image
    noise: NoiseFn
    # Image editing (core.diffusion.editing): None for text-to-image.
    edits: Edits | None = None
    noise_for: Callable[[list[int]], NoiseFn] | None = None


def _defaults(raw: dict[str, Any]) -> SamplingDefaults:
    values = dict(raw)
    if "guidance_interval" in values:
        lo, hi = values["guidance_interval"]
        values["guidance_interval"] = (float(lo), float(hi))
    return SamplingDefaults(**values)


def pick_device() -> torch.device:
    """CUDA when present, otherwise the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def load_autoencoder(directory: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Loads the autoencoder out of an autoencoder checkpoint or a full pipeline checkpoint."""
    tensors, config = load_checkpoint(directory, device)
    if "autoencoder" not in config:
        raise CheckpointError(f"{directory} holds no autoencoder")
    ae = Autoencoder(AutoencoderConfig.from_dict(config["autoencoder"]))
    ae.load_state_dict(unprefixed("autoencoder", tensors))
    return ae.to(device).eval()


def save_autoencoder(
    directory: str | Path, ae: Autoencoder, extra: dict[str, Any] | None = None
) -> Path:
    config = {"kind": "autoencoder", "autoencoder": ae.config.to_dict(), **(extra or {})}
    return save_checkpoint(directory, prefixed("autoencoder", ae.state_dict()), config)


class LatentDiffusion(nn.Module):
    """Everything needed to turn a prompt into an image, saved and loaded as one checkpoint."""

    def __init__(
        self,
        autoencoder: Autoencoder,
        text_encoder: TextEncoder,
        unet: UNet,
        schedule: NoiseSchedule,
        image_size: int = 64,
        defaults: SamplingDefaults | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.unet = unet
        self.schedule = schedule
        self.image_size = image_size
        self.defaults = defaults or SamplingDefaults()
        self._latent_rgb: torch.Tensor | None = None  # see latent_rgb_map()

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def latent_scale_factor(self) -> float:
        return self.autoencoder.config.latent_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the autoencoder's and the UNet's downsampling."""
        return self.autoencoder.config.downsample_factor * 2 ** (len(self.unet.config.channels) - 1)

    # --- checkpoints -------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        return {
            "kind": "latent-diffusion",
            "image_size": self.image_size,
            "autoencoder": self.autoencoder.config.to_dict(),
            "text_encoder": self.text_encoder.config.to_dict(),
            "tokenizer": self.text_encoder.tokenizer.to_dict(),
            "unet": self.unet.config.to_dict(),
            "schedule": self.schedule.config.to_dict(),
            "sampling_defaults": {
                **vars(self.defaults),
                "guidance_interval": list(self.defaults.guidance_interval),
            },
        }

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        tensors = {
            **prefixed("autoencoder", self.autoencoder.state_dict()),
            **prefixed("text_encoder", self.text_encoder.state_dict()),
            **prefixed("unet", self.unet.state_dict()),
        }
        return save_checkpoint(directory, tensors, {**self.config_dict(), **(extra or {})})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LatentDiffusion:
        if config.get("kind") != "latent-diffusion":
            raise CheckpointError(
                f"checkpoint kind is {config.get('kind')!r}; generation needs a 'latent-diffusion' "
                "checkpoint (train one with `dq train denoiser`)"
            )
        try:
            tokenizer = WordTokenizer.from_dict(config["tokenizer"])
            text_encoder = TextEncoder(TextEncoderConfig(**config["text_encoder"]), tokenizer)
            return cls(
                Autoencoder(AutoencoderConfig.from_dict(config["autoencoder"])),
                text_encoder,
                UNet(UNetConfig.from_dict(config["unet"])),
                NoiseSchedule(ScheduleConfig(**config["schedule"])),
                image_size=int(config["image_size"]),
                defaults=_defaults(config.get("sampling_defaults", {})),
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint config is incomplete or malformed: {e!r}") from None

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> LatentDiffusion:
        """The checkpoint in ``directory`` on ``device`` (CUDA when present), its UNet and text
        encoder at ``precision`` (:mod:`core.diffusion.precision`; ``auto`` picks for the
        device). Raises :class:`~core.diffusion.precision.PrecisionError` for a precision the
        device cannot run, before reading any weights."""
        dev = torch.device(device) if device is not None else pick_device()
        resolved = resolve_precision(precision, dev)
        tensors, config = load_checkpoint(directory, "cpu")
        model = cls.from_config(config)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise CheckpointError(f"{directory}: weights do not match the config: {e}") from None
        return model.to(dev).set_precision(resolved).eval()

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: the precision of the UNet and the text encoder."""
        dtype = self.unet.conv_in.weight.dtype
        return next(name for name, d in DTYPES.items() if d == dtype)

    def set_precision(self, precision: str) -> LatentDiffusion:
        """Casts the UNet's and the text encoder's weights to a resolved precision, once; the
        autoencoder stays fp32. Sampling casts only activations, at the UNet's boundary
        (:class:`GuidedDenoiser`)."""
        dtype = dtype_of(precision)
        self.unet.to(dtype)
        self.text_encoder.to(dtype)
        return self

    # --- latents -----------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) → images (B, 3, H, W) in [−1, 1]."""
        z = latents / self.latent_scale_factor
        return run_batch_invariant(self.autoencoder.decode, z).clamp(-1, 1)

    def latent_rgb_map(self) -> torch.Tensor:
        """The live preview's map from latent pixels to RGB (:mod:`core.diffusion.preview`),
        fitted for this autoencoder on first use."""
        if self._latent_rgb is None:
            self._latent_rgb = fit_latent_rgb_map(self.autoencoder, self.latent_scale_factor)
        return self._latent_rgb

    def fast_preview(self, latents: torch.Tensor, size: int = 64) -> list[Image.Image]:
        """A cheap preview of scaled latents: the fitted map, upscaled; no decoder pass."""
        return latents_to_preview(latents, self.latent_rgb_map(), size)

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decodes an x0 estimate from ``on_step`` into images for a live preview."""
        return tensor_to_images(self.decode(latents.to(self.device)))

    # --- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        steps: int | None = None,
        guidance: float | Sequence[float] | None = None,
        sampler: str | None = None,
        seeds: Sequence[int] | None = None,
        on_step: OnStep | None = None,
        should_stop: Callable[[], bool] | None = None,
        size: int | None = None,
        guidance_interval: Interval | Sequence[Interval] | None = None,
        init_images: Sequence[Image.Image | None] | None = None,
        strength: float | Sequence[float | None] | None = None,
        masks: Sequence[Image.Image | None] | None = None,
    ) -> list[Image.Image]:
        """Makes one RGB image per prompt: :meth:`prepare`, then :meth:`sample`.

        - ``negative_prompts``: one per prompt; "" (the default) is the unconditional prompt.
        - ``guidance``: the classifier-free guidance scale, one for all or one per image;
          1 disables guidance, 0 ignores the prompt.
        - ``guidance_interval``: ``(lo, hi)``, one for all or one per image: guidance applies
          only at noise levels t/(T−1) within it (Kynkäänniemi et al. 2024); elsewhere the
          image's step runs the conditional row alone. (0, 1) guides every step.
        - ``seeds``: one per image (random when omitted); each image's seed is in ``img.info``.
        - ``init_images``: one per prompt (None where an image starts from noise): image-to-image
          from it, resized to ``size`` when it is another size (:mod:`core.diffusion.editing`).
        - ``strength``: in (0, 1], one for all or one per image: how much of the sampler's
          schedule an init image goes through (0.75 by default; 1 with a mask).
        - ``masks``: one per prompt (None for none), each for an image with an init image:
          white repaints, black keeps the init image's pixels exactly (inpainting).
        - ``on_step(step, total, denoised)`` runs after every step with the current x0 estimate
          in latent space (decode it with :meth:`preview`); ``should_stop()`` is polled between
          steps and raises :class:`~core.diffusion.samplers.SamplingCanceled`.

        Raises ValueError, naming the parameter, for any bad input. A prompt over the text
        encoder's token limit is cut and a :class:`PromptTruncatedWarning` is issued.
        """
        plan = self.prepare(
            prompts,
            negative_prompts,
            steps,
            guidance,
            sampler,
            seeds,
            size,
            guidance_interval,
            init_images=init_images,
            strength=strength,
            masks=masks,
            _caller_depth=4,
        )
        return self.sample(plan, on_step, should_stop)

    @torch.no_grad()
    def prepare(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        steps: int | None = None,
        guidance: float | Sequence[float] | None = None,
        sampler: str | None = None,
        seeds: Sequence[int] | None = None,
        size: int | None = None,
        guidance_interval: Interval | Sequence[Interval] | None = None,
        *,
        init_images: Sequence[Image.Image | None] | None = None,
        strength: float | Sequence[float | None] | None = None,
        masks: Sequence[Image.Image | None] | None = None,
        _caller_depth: int = 3,  # for warnings: the frame of whoever called us
    ) -> GenerationPlan:
        """Everything before the first denoising step: defaults filled in and checked, seeds,
        the text encoder's states, the guided denoiser, the timesteps and the starting noise."""
        n = len(prompts)
        steps = self.defaults.steps if steps is None else steps
        spec = get_sampler(self.defaults.sampler if sampler is None else sampler)
        scales = _per_image(self.defaults.guidance if guidance is None else guidance, n, "guidance")
        intervals = _intervals(
            self.defaults.guidance_interval if guidance_interval is None else guidance_interval, n
        )
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * n
        seeds = list(seeds) if seeds is not None else [random_seed() for _ in range(n)]
        size = self.image_size if size is None else size
        self._validate(prompts, negatives, steps, scales, seeds, size)
        inits, strengths, mask_images = _edit_inputs(n, init_images, strength, masks)

        cond = self.text_encoder.encode(list(prompts))
        for prompt, cut in zip(prompts, cond.truncated, strict=True):
            if cut:
                warnings.warn(
                    f"prompt was cut to {self.text_encoder.tokenizer.max_length} tokens: "
                    f"{prompt[:60]!r}…",
                    PromptTruncatedWarning,
                    stacklevel=_caller_depth,
                )
        needs_uncond = any(g != 1.0 for g in scales)
        uncond = self.text_encoder.encode(negatives) if needs_uncond else None
        denoise = GuidedDenoiser(self.unet, self.schedule, cond, uncond, scales, intervals)

        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        device = self.device

        def noise_for(rows: list[int]) -> NoiseFn:
            return lambda like: _draw(generators, rows, like, device)

        c = self.autoencoder.config.latent_channels
        h = size // self.autoencoder.config.downsample_factor
        timesteps = inference_timesteps(self.schedule.num_train_timesteps, steps, spec.spacing)
        everyone = list(range(n))
        x = noise_for(everyone)(torch.empty(n, c, h, h))
        edits = None
        if any(image is not None for image in inits):
            edits = self._edits(inits, strengths, mask_images, seeds, steps, size, (c, h))
        return GenerationPlan(
            seeds=seeds,
            sampler=spec,
            denoise=denoise,
            timesteps=timesteps,
            x=x,
            noise=noise_for(everyone),
            edits=edits,
            noise_for=noise_for,
        )

    def _edits(
        self,
        inits: list[Image.Image | None],
        strengths: list[float],
        mask_images: list[Image.Image | None],
        seeds: list[int],
        steps: int,
        size: int,
        latent_shape: tuple[int, int],
    ) -> Edits:
        """The init images encoded (the posterior's mean, scaled), the masks at latent
        resolution, each image's start step, and the generators of the known region's noise."""
        n = len(inits)
        c, h = latent_shape
        device = self.device
        has_init = [image is not None for image in inits]
        has_mask = [m is not None for m in mask_images]
        init_pixels = [None if im is None else image_array(im, size) for im in inits]
        mask_pixels = [None if m is None else mask_array(m, size) for m in mask_images]
        rows = [i for i in range(n) if has_init[i]]
        encoded = run_batch_invariant(
            lambda x: self.autoencoder.encode(x).mean,
            images_to_tensor([init_pixels[i] for i in rows]).to(device),  # type: ignore[misc]
        )
        init = torch.zeros(n, c, h, h, device=device)
        init[rows] = encoded * self.latent_scale_factor
        mask = None
        if any(has_mask):
            pixel = torch.ones(n, 1, size, size, device=device)
            for i, m in enumerate(mask_pixels):
                if m is not None:
                    pixel[i, 0] = torch.from_numpy(m).to(device)
            mask = latent_mask(pixel, self.autoencoder.config.downsample_factor)
        known = [torch.Generator("cpu").manual_seed(s ^ KNOWN_REGION_SEED) for s in seeds]
        return Edits(
            starts=[start_index(steps, strengths[i]) if has_init[i] else 0 for i in range(n)],
            init=init,
            mask=mask,
            init_pixels=init_pixels,
            mask_pixels=mask_pixels,
            known_noise=lambda picked, like: _draw(known, picked, like, device),
        )

    @torch.no_grad()
    def sample(
        self,
        plan: GenerationPlan,
        on_step: OnStep | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image.Image]:
        """Runs a plan's sampler from its noise to latents, and decodes them."""

        def callback(info: dict[str, Any]) -> None:
            if on_step is not None:
                on_step(info["i"] + 1, info["total"], info["denoised"])

        if plan.edits is None or plan.noise_for is None:
            latents = plan.sampler.sample(
                plan.denoise,
                plan.x,
                self.schedule,
                plan.timesteps,
                plan.noise,
                callback=callback,
                should_stop=should_stop,
            )
        else:
            latents = run_staggered(
                plan.sampler.steps,
                plan.denoise.rows,
                plan.x,
                self.schedule,
                plan.timesteps,
                plan.noise_for,
                plan.edits,
                on_step,
                should_stop,
            )
        images = tensor_to_images(self.decode(latents))
        for img, seed in zip(images, plan.seeds, strict=True):
            img.info["seed"] = seed
        if plan.edits is not None:
            for i, (init, mask) in enumerate(
                zip(plan.edits.init_pixels, plan.edits.mask_pixels, strict=True)
            ):
                if init is not None and mask is not None:
                    images[i] = composite(images[i], init, mask)
        return images

    def _validate(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str],
        steps: int,
        scales: list[float],
        seeds: Sequence[int],
        size: int,
    ) -> None:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string")
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        for p in prompts:
            _check_prompt(p, "prompt", allow_empty=False)
        if len(negatives) != len(prompts):
            raise ValueError("negative_prompts must hold one entry per prompt")
        for p in negatives:
            _check_prompt(p, "negative_prompt", allow_empty=True)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError("steps must be an integer of at least 1")
        if steps > self.schedule.num_train_timesteps:
            raise ValueError(f"steps must be at most {self.schedule.num_train_timesteps}")
        for g in scales:
            if not math.isfinite(g) or g < 0:
                raise ValueError("guidance must be a finite number of at least 0")
        if len(seeds) != len(prompts):
            raise ValueError("seeds must hold one seed per prompt")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}")
        m = self.size_multiple
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size < m
            or size % m
            or size > 1024
        ):
            raise ValueError(f"size must be a multiple of {m} from {m} to 1024")


def _draw(
    generators: Sequence[torch.Generator], rows: Sequence[int], like: torch.Tensor, device: Any
) -> torch.Tensor:
    """N(0, I) noise shaped like ``like``, one row from each of these images' generators, drawn
    on the CPU: the same seed gives the same noise on any device and whatever else is in the
    batch."""
    return torch.stack([torch.randn(like.shape[1:], generator=generators[r]) for r in rows]).to(
        device
    )


def _edit_inputs(
    n: int,
    init_images: Sequence[Image.Image | None] | None,
    strength: float | Sequence[float | None] | None,
    masks: Sequence[Image.Image | None] | None,
) -> tuple[list[Image.Image | None], list[float], list[Image.Image | None]]:
    """One init image, strength and mask per image, checked."""
    inits: list[Image.Image | None] = list(init_images) if init_images is not None else [None] * n
    mask_list: list[Image.Image | None] = list(masks) if masks is not None else [None] * n
    if len(inits) != n:
        raise ValueError("init_images must hold one entry (an image or None) per prompt")
    if len(mask_list) != n:
        raise ValueError("masks must hold one entry (an image or None) per prompt")
    for image in (*inits, *mask_list):
        if image is not None and not isinstance(image, Image.Image):
            raise ValueError("init_images and masks must be PIL images or None")
    for init, mask in zip(inits, mask_list, strict=True):
        if mask is not None and init is None:
            raise ValueError("a mask needs an init image")
        if mask is not None and init is not None and mask.size != init.size:
            raise ValueError(
                f"a mask must be the size of its init image: {mask.size} != {init.size}"
            )
    if strength is None or isinstance(strength, (int, float)):
        given: list[float | None] = [None if strength is None else float(strength)] * n
    elif isinstance(strength, Sequence) and not isinstance(strength, str) and len(strength) == n:
        given = list(strength)
    else:
        raise ValueError("strength must be a number or one number (or None) per prompt")
    out = []
    for value, init, mask in zip(given, inits, mask_list, strict=True):
        if init is None and value is not None and not isinstance(strength, (int, float)):
            raise ValueError("strength applies only to an image with an init image")
        if value is None:
            value = 1.0 if mask is not None else DEFAULT_STRENGTH
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("strength must be a number")
        if not 0.0 < value <= 1.0:
            raise ValueError("strength must be greater than 0 and at most 1")
        out.append(float(value))
    return inits, out, mask_list


def _check_prompt(p: object, name: str, allow_empty: bool) -> None:
    if not isinstance(p, str):
        raise ValueError(f"{name} must be a string")
    if not allow_empty and not p.strip():
        raise ValueError(f"{name} must not be empty")
    if len(p) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(p)} characters long; the limit is {MAX_PROMPT_CHARS}")


def _per_image(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{name} must be a number or one number per prompt")
    if len(value) != n:
        raise ValueError(f"{name} must hold one value per prompt")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number")
        out.append(float(v))
    return out


def _intervals(value: Interval | Sequence[Interval], n: int) -> list[Interval]:
    """One (lo, hi) guidance interval per image, checked: 0 ≤ lo ≤ hi ≤ 1."""
    items: list[Any]
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        items = [value] * n
    elif isinstance(value, Sequence) and len(value) == n:
        items = list(value)
    else:
        raise ValueError("guidance_interval must be (lo, hi) or one (lo, hi) per prompt")
    out = []
    for item in items:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError("guidance_interval must be (lo, hi) or one (lo, hi) per prompt")
        lo, hi = item
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (lo, hi)) or not (
            0 <= lo <= hi <= 1
        ):
            raise ValueError("guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1")
        out.append((float(lo), float(hi)))
    return out


def run_batch_invariant(fn: Callable[..., torch.Tensor], *batched: torch.Tensor) -> torch.Tensor:
    """Calls ``fn`` on tensors that share a leading batch dimension, never with a batch of one.

    oneDNN picks a different convolution kernel for a single image than for two or more, and the
    two round differently; from two rows up each row's result is the same whatever the batch
    size (tests/core/test_pipeline.py checks this). A lone row is therefore run twice.
    """
    if batched[0].shape[0] != 1:
        return fn(*batched)
    return fn(*(torch.cat([b, b]) for b in batched))[:1]


class GuidedDenoiser:
    """``denoise(x, t) -> (x0, ε)``: the UNet, classifier-free guidance and the parameterisation.

    Guidance (Ho & Salimans 2022, eq. 6) mixes the conditional and unconditional outputs,
    ``u + g·(c − u)``, per image. An image gets the unconditional row only at the steps where it
    is guided: g ≠ 1 and the noise level t/(T−1) inside its guidance interval. Elsewhere its
    conditional output is used as is, so the UNet's batch holds B rows plus one per guided
    image, and an image is identical whatever else its batch needed.

    The UNet may run in half precision (:mod:`core.diffusion.precision`): the latents are cast
    to its dtype on the way in and its output back to fp32 on the way out, so the guidance
    combination, the parameterisation and the sampler's state stay fp32.
    """

    def __init__(
        self,
        unet: UNet,
        schedule: NoiseSchedule,
        cond: TextConditioning,
        uncond: TextConditioning | None,
        scales: list[float],
        intervals: list[Interval] | None = None,
    ) -> None:
        self.unet = unet
        self.schedule = schedule
        self.cond = cond
        self.uncond = uncond
        self.scale_list = scales
        self.intervals = intervals or [(0.0, 1.0)] * len(scales)
        device = cond.states.device
        self.scales = torch.tensor(scales, device=device).view(-1, 1, 1, 1)
        self.dtype = unet.conv_in.weight.dtype  # the UNet's: its input is cast to it
        self._subsets: dict[tuple[int, ...], GuidedDenoiser] = {}

    def rows(self, x: torch.Tensor, t: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``denoise`` for the images ``rows`` of the batch only (x holds those rows)."""
        if rows == list(range(len(self.scale_list))):
            return self(x, t)
        key = tuple(rows)
        sub = self._subsets.get(key)
        if sub is None:
            idx = torch.tensor(rows, device=self.cond.states.device)
            sub = GuidedDenoiser(
                self.unet,
                self.schedule,
                TextConditioning(self.cond.states[idx], self.cond.mask[idx], []),
                None
                if self.uncond is None
                else TextConditioning(self.uncond.states[idx], self.uncond.mask[idx], []),
                [self.scale_list[r] for r in rows],
                [self.intervals[r] for r in rows],
            )
            self._subsets[key] = sub
        return sub(x, t)

    def guided_rows(self, t: int) -> list[int]:
        """The images guided at timestep ``t``."""
        if self.uncond is None:
            return []
        level = t / max(self.schedule.num_train_timesteps - 1, 1)
        return [
            i
            for i, (g, (lo, hi)) in enumerate(zip(self.scale_list, self.intervals, strict=True))
            if g != 1.0 and lo <= level <= hi
        ]

    def __call__(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        rows = self.guided_rows(t)
        x_in = x.to(self.dtype)  # a no-op at fp32; so is each .float() below
        if not rows:
            t_b = torch.full((b,), t, device=x.device)
            out = run_batch_invariant(self.unet, x_in, t_b, self.cond.states, self.cond.mask)
            out = out.float()
        else:
            assert self.uncond is not None
            idx = torch.tensor(rows, device=x.device)
            k = len(rows)
            both = self.unet(
                torch.cat([x_in[idx], x_in]),
                torch.full((k + b,), t, device=x.device),
                torch.cat([self.uncond.states[idx], self.cond.states]),
                torch.cat([self.uncond.mask[idx], self.cond.mask]),
            ).float()  # the guidance combination in fp32, whatever the UNet ran in
            u, c = both[:k], both[k:]
            g = self.scales[idx]
            out = c.clone()
            out[idx] = u + g * (c[idx] - u)
        return self.schedule.split_prediction(out, x, t)
