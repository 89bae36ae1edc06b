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
from torch.nn import functional as F

from core.diffusion.autoencoder import Autoencoder, AutoencoderConfig
from core.diffusion.checkpoint import (
    CheckpointError,
    load_checkpoint,
    prefixed,
    save_checkpoint,
    unprefixed,
)
from core.diffusion.data.captioned import tensor_to_images
from core.diffusion.data.shapes import BACKGROUNDS, COLORS
from core.diffusion.samplers import SAMPLER_SPACING, get_sampler
from core.diffusion.schedule import NoiseSchedule, ScheduleConfig, inference_timesteps
from core.diffusion.text import TextConditioning, TextEncoder, TextEncoderConfig, WordTokenizer
from core.diffusion.unet import UNet, UNetConfig

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**63 - 1
OnStep = Callable[[int, int, torch.Tensor], None]


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder reads; the rest was dropped."""


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int = 20
    guidance: float = 4.0
    sampler: str = "dpmpp-2m"


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
            "sampling_defaults": vars(self.defaults),
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
                defaults=SamplingDefaults(**config.get("sampling_defaults", {})),
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint config is incomplete or malformed: {e!r}") from None

    @classmethod
    def load(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> LatentDiffusion:
        dev = torch.device(device) if device is not None else pick_device()
        tensors, config = load_checkpoint(directory, "cpu")
        model = cls.from_config(config)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise CheckpointError(f"{directory}: weights do not match the config: {e}") from None
        return model.to(dev).eval()

    # --- latents -----------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) → images (B, 3, H, W) in [−1, 1]."""
        z = latents / self.latent_scale_factor
        return run_batch_invariant(self.autoencoder.decode, z).clamp(-1, 1)

    @torch.no_grad()
    def latent_rgb_map(self) -> torch.Tensor:
        """A (F, 3) map from a scaled latent pixel's features (1, z, z_i·z_j) to the RGB of its
        image patch: quadratic in z, linear in the fitted weights.

        The "approx cheap" live preview of AUTOMATIC1111, fitted once for this autoencoder by least
        squares on images of coloured blocks. On shapes images it is about half as far from the
        decoder's output as the best flat colour (tests/core/test_pipeline.py). Deterministic.
        """
        if self._latent_rgb is None:
            g = torch.Generator("cpu").manual_seed(0)
            f = self.autoencoder.config.downsample_factor
            side = 16 * f
            # Images of blocks in the colours of the built-in shapes data (its shapes and
            # backgrounds), encoded; each latent pixel is paired with its patch's colour.
            palette = torch.tensor([*COLORS.values(), *BACKGROUNDS.values()]) / 127.5 - 1
            pick = torch.randint(len(palette), (64, 4, 4), generator=g)
            blocks = palette[pick].permute(0, 3, 1, 2)  # (B, 3, 4, 4)
            images = F.interpolate(blocks, size=(side, side), mode="nearest").to(self.device)
            z = self.autoencoder.encode(images).mean * self.latent_scale_factor  # (B, C, h, w)
            rgb = F.avg_pool2d(images, f)  # (B, 3, h, w)
            x = _preview_features(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu().double())
            y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).cpu().double()
            self._latent_rgb = torch.linalg.lstsq(x, y).solution
        return self._latent_rgb

    def fast_preview(self, latents: torch.Tensor, size: int = 64) -> list[Image.Image]:
        """A cheap preview of scaled latents: the linear map, upscaled; no decoder pass."""
        w = self.latent_rgb_map()
        z = latents.detach().cpu().double().permute(0, 2, 3, 1)  # (B, h, w, C)
        rgb = _preview_features(z) @ w  # (B, h, w, 3)
        images = tensor_to_images(rgb.permute(0, 3, 1, 2).float().clamp(-1, 1))
        return [im.resize((size, size), Image.Resampling.BILINEAR) for im in images]

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
        eta: float = 0.0,
    ) -> list[Image.Image]:
        """Makes one RGB image per prompt.

        - ``negative_prompts``: one per prompt; "" (the default) is the unconditional prompt.
        - ``guidance``: the classifier-free guidance scale, one for all or one per image;
          1 disables guidance, 0 ignores the prompt.
        - ``seeds``: one per image (random when omitted); each image's seed is in ``img.info``.
        - ``on_step(step, total, denoised)`` runs after every step with the current x0 estimate
          in latent space (decode it with :meth:`preview`); ``should_stop()`` is polled between
          steps and raises :class:`~core.diffusion.samplers.SamplingCanceled`.

        Raises ValueError, naming the parameter, for any bad input. A prompt over the text
        encoder's token limit is cut and a :class:`PromptTruncatedWarning` is issued.
        """
        n = len(prompts)
        steps = self.defaults.steps if steps is None else steps
        sampler_name = self.defaults.sampler if sampler is None else sampler
        scales = _per_image(self.defaults.guidance if guidance is None else guidance, n, "guidance")
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * n
        seeds = list(seeds) if seeds is not None else [random_seed() for _ in range(n)]
        size = self.image_size if size is None else size
        self._validate(prompts, negatives, steps, scales, seeds, size, eta)
        sample = get_sampler(sampler_name)
        extra = {"eta": eta} if sampler_name == "ddim" else {}

        cond = self.text_encoder.encode(list(prompts))
        for prompt, cut in zip(prompts, cond.truncated, strict=True):
            if cut:
                warnings.warn(
                    f"prompt was cut to {self.text_encoder.tokenizer.max_length} tokens: "
                    f"{prompt[:60]!r}…",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
        needs_uncond = any(g != 1.0 for g in scales)
        uncond = self.text_encoder.encode(negatives) if needs_uncond else None
        denoise = GuidedDenoiser(self.unet, self.schedule, cond, uncond, scales)

        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        c = self.autoencoder.config.latent_channels
        h = size // self.autoencoder.config.downsample_factor
        device = self.device

        def noise(like: torch.Tensor) -> torch.Tensor:
            # One generator per image, drawn on the CPU: the same seed gives the same noise on any
            # device and whatever else is in the batch.
            return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators]).to(
                device
            )

        x = noise(torch.empty(n, c, h, h))
        timesteps = inference_timesteps(
            self.schedule.num_train_timesteps,
            steps,
            SAMPLER_SPACING[sampler_name],  # type: ignore[arg-type]
        )

        def callback(info: dict[str, Any]) -> None:
            if on_step is not None:
                on_step(info["i"] + 1, info["total"], info["denoised"])

        latents = sample(
            denoise,
            x,
            self.schedule,
            timesteps,
            noise,
            callback=callback,
            should_stop=should_stop,
            **extra,
        )
        images = tensor_to_images(self.decode(latents))
        for img, seed in zip(images, seeds, strict=True):
            img.info["seed"] = seed
        return images

    def _validate(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str],
        steps: int,
        scales: list[float],
        seeds: Sequence[int],
        size: int,
        eta: float,
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
        if not 0 <= eta <= 1:
            raise ValueError("eta must be between 0 and 1")


def _preview_features(z: torch.Tensor) -> torch.Tensor:
    """(…, C) latent pixels → (…, 1 + C + C(C+1)/2): a constant, z, and every z_i·z_j."""
    i, j = torch.triu_indices(z.shape[-1], z.shape[-1])
    return torch.cat([torch.ones_like(z[..., :1]), z, z[..., i] * z[..., j]], -1)


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
    ``u + g·(c − u)``, per image; where g = 1 the conditional output is used as is, so an image
    is identical whether or not its batch needed the unconditional pass.
    """

    def __init__(
        self,
        unet: UNet,
        schedule: NoiseSchedule,
        cond: TextConditioning,
        uncond: TextConditioning | None,
        scales: list[float],
    ) -> None:
        self.unet = unet
        self.schedule = schedule
        self.uncond = uncond
        if uncond is None:
            self.context, self.mask = cond.states, cond.mask
        else:
            self.context = torch.cat([uncond.states, cond.states])  # (2B, L, D)
            self.mask = torch.cat([uncond.mask, cond.mask])
        device = cond.states.device
        self.scales = torch.tensor(scales, device=device).view(-1, 1, 1, 1)

    def __call__(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if self.uncond is None:
            t_b = torch.full((b,), t, device=x.device)
            out = run_batch_invariant(self.unet, x, t_b, self.context, self.mask)
        else:
            both = self.unet(
                torch.cat([x, x]), torch.full((2 * b,), t, device=x.device), self.context, self.mask
            )
            u, c = both.chunk(2)
            out = torch.where(self.scales == 1.0, c, u + self.scales * (c - u))
        return self.schedule.split_prediction(out, x, t)
