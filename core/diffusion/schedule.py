"""Noise schedules and the forward process q(x_t | x_0).

Notation follows DDPM (Ho et al. 2020): β_t is the per-step noise variance, α_t = 1 − β_t and
ᾱ_t = Π_{s≤t} α_s. Timesteps are 0-based, t ∈ {0, …, T−1}, as in diffusers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

ScheduleKind = Literal["linear", "cosine"]
Prediction = Literal["epsilon", "v_prediction"]
Spacing = Literal["trailing", "leading", "linspace"]


@dataclass(frozen=True)
class ScheduleConfig:
    kind: ScheduleKind = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4  # DDPM §4: β from 1e-4 to 0.02
    beta_end: float = 0.02
    prediction: Prediction = "epsilon"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def linear_betas(num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # Computed in float32 exactly as DDPM's reference (and diffusers) does, so ᾱ agrees to the bit.
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2),
    # and β_t = 1 − ᾱ_t/ᾱ_{t−1}, clipped at 0.999 to avoid the singularity at t = T.
    def f(t: float) -> float:
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


class NoiseSchedule:
    """Holds β, ᾱ and the derived quantities every sampler and the loss need."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        c = self.config
        if c.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if c.kind == "linear":
            betas = linear_betas(c.num_train_timesteps, c.beta_start, c.beta_end)
        elif c.kind == "cosine":
            betas = cosine_betas(c.num_train_timesteps)
        else:
            raise ValueError(f"unknown schedule kind {c.kind!r}; use 'linear' or 'cosine'")
        if c.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"unknown prediction {c.prediction!r}; use 'epsilon' or 'v_prediction'"
            )
        self.betas = betas  # (T,)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t, (T,)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t, with ᾱ_{−1} = 1: the clean end of the chain that samplers step onto last."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM eq. 4, the closed form of the forward process)."""
        a = self._per_sample(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022, §4)."""
        a = self._per_sample(self.alphas_cumprod, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def split_prediction(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turns the network's output at timestep t into (x0 estimate, ε estimate)."""
        a = self.alpha_bar(t)
        sa, s1a = math.sqrt(a), math.sqrt(1 - a)
        if self.config.prediction == "epsilon":
            eps = model_output
            x0 = (x_t - s1a * eps) / sa  # invert DDPM eq. 4
        else:
            x0 = sa * x_t - s1a * model_output
            eps = s1a * x_t + sa * model_output
        return x0, eps

    @staticmethod
    def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))


def inference_timesteps(num_train: int, num_steps: int, spacing: Spacing = "trailing") -> list[int]:
    """The descending timesteps a sampler visits.

    "trailing" starts at t = T−1 so that the first step sees (almost) pure noise (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2); "leading" is
    DDIM's original spacing and "linspace" DPM-Solver's. Each matches diffusers' spacing of the
    same name.
    """
    if num_steps < 1:
        raise ValueError("steps must be at least 1")
    if num_steps > num_train:
        raise ValueError(f"steps must be at most {num_train}, the number of training timesteps")
    if spacing == "trailing":
        ratio = num_train / num_steps
        ts = [round(num_train - i * ratio) - 1 for i in range(num_steps)]
    elif spacing == "leading":
        ratio = num_train // num_steps
        ts = [i * ratio for i in range(num_steps)][::-1]
    elif spacing == "linspace":
        grid = torch.linspace(0, num_train - 1, num_steps + 1, dtype=torch.float64)
        ts = [round(float(v)) for v in grid.flip(0)[:-1]]
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    return ts
