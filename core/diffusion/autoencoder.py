"""A small KL-regularised convolutional autoencoder (Latent Diffusion's "KL-f4", scaled down).

The encoder maps an image in [−1, 1] of shape (B, 3, H, W) to a diagonal Gaussian over a
(B, 4, H/f, W/f) latent; the decoder maps a latent back to pixels. It is trained on images alone,
with no captions. The diffusion model works on ``latent_scale_factor · z``, where the factor is
1/std of the latents over training data (Rombach et al. 2022, §G), so the latents have unit
variance like the noise they are mixed with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AutoencoderConfig:
    channels: tuple[int, ...] = (32, 64)  # one entry per level; each level halves the size
    latent_channels: int = 4
    groups: int = 8
    kl_weight: float = 1e-6
    latent_scale_factor: float = 1.0  # set from data after training; see compute_latent_scale

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> AutoencoderConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


class ConvResBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus a (1×1-projected) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


@dataclass(frozen=True)
class LatentDistribution:
    mean: torch.Tensor  # (B, C, h, w)
    logvar: torch.Tensor  # (B, C, h, w), clamped to a sane range

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn where the generator lives (the training loop's is on the CPU), then moved, so a
        # run's randomness is one reproducible stream whatever the device.
        gen_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=gen_device)
        return self.mean + (0.5 * self.logvar).exp() * eps.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per element, averaged: ½(μ² + σ² − 1 − log σ²)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1 - self.logvar).mean()


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or AutoencoderConfig()
        ch = c.channels
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        c_prev = ch[0]
        for c_level in ch:
            enc += [ConvResBlock(c_prev, c_level, c.groups), nn.Conv2d(c_level, c_level, 3, 2, 1)]
            c_prev = c_level
        enc += [
            ConvResBlock(c_prev, c_prev, c.groups),
            nn.GroupNorm(c.groups, c_prev),
            nn.SiLU(),
            nn.Conv2d(c_prev, 2 * c.latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [
            nn.Conv2d(c.latent_channels, ch[-1], 3, padding=1),
            ConvResBlock(ch[-1], ch[-1], c.groups),
        ]
        c_prev = ch[-1]
        for c_level in reversed(ch):
            dec += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_prev, c_level, 3, padding=1),
                ConvResBlock(c_level, c_level, c.groups),
            ]
            c_prev = c_level
        dec += [nn.GroupNorm(c.groups, c_prev), nn.SiLU(), nn.Conv2d(c_prev, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, LatentDistribution]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """L1 + MSE reconstruction plus a light KL term (LDM's KL-regularised autoencoder)."""
        recon, posterior = self(x, generator)
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl()
        total = l1 + mse + self.config.kl_weight * kl
        return total, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def compute_latent_scale(autoencoder: Autoencoder, images: torch.Tensor) -> float:
    """1/std of sampled latents over ``images``: LDM's scale factor, measured on our data."""
    z = autoencoder.encode(images).sample(torch.Generator().manual_seed(0))
    return float(1.0 / z.float().std())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [−1, 1] (peak-to-peak range 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()
