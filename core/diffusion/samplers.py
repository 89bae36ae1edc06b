"""Samplers as pure functions over a noise schedule, in the manner of k-diffusion.

Every sampler has the same signature::

    sample(denoise, x, schedule, timesteps, noise, callback=None, should_stop=None) -> x

- ``denoise(x, t) -> (x0, eps)`` wraps the network, the text conditioning, classifier-free
  guidance and the parameterisation; a sampler never knows about any of them.
- ``timesteps`` is the descending list of timesteps to visit; after the last one the sampler
  lands on the clean end of the chain (ᾱ = 1).
- ``noise(like)`` returns fresh N(0, I) noise shaped like its argument. The pipeline draws it
  from one generator per image, so an image does not depend on what else is in the batch.
- ``callback`` receives ``{"x", "i", "t", "denoised", "total"}`` after every step; ``denoised``
  is the current estimate of x0, which is what a live preview shows.
- ``should_stop()`` is polled between steps; when it returns True, :class:`SamplingCanceled`
  is raised.

Each sampler is written once, as a loop that yields ``(x, t)`` when it needs the model and is
sent ``(x0, eps)`` back (``ddpm_steps``, ``ddim_steps``, ``dpmpp_2m_steps``, ``dpmpp_3m_steps``);
``sample_*`` drive one loop alone (:func:`run_steps`), and image editing drives one loop per
start step in lockstep, sharing each model call (``core.diffusion.editing.run_staggered``).

Each step is also exposed on its own (``ddpm_step``, ``ddim_step``, ``dpmpp_2m_step``,
``dpmpp_3m_step``) so the tests can hold it against diffusers' schedulers for identical model
outputs.

:data:`SAMPLERS` names each one with its timestep spacing; a sampler's own options (DDIM's η)
are bound there with :func:`functools.partial`, so every entry has the one :class:`Sampler`
signature and the pipeline treats them all alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from core.diffusion.schedule import NoiseSchedule, Spacing


class SamplingCanceled(Exception):
    """Raised between steps when ``should_stop()`` asks for it."""


class Denoise(Protocol):
    def __call__(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]: ...


NoiseFn = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]


class Sampler(Protocol):
    """What every entry of :data:`SAMPLERS` is: from x at ``timesteps[0]`` to the clean end."""

    def __call__(
        self,
        denoise: Denoise,
        x: torch.Tensor,
        schedule: NoiseSchedule,
        timesteps: list[int],
        noise: NoiseFn,
        callback: Callback | None = None,
        should_stop: StopFn | None = None,
    ) -> torch.Tensor: ...


def ddpm_step(
    schedule: NoiseSchedule,
    x: torch.Tensor,
    x0: torch.Tensor,
    t: int,
    t_prev: int,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One ancestral step x_t → x_{t_prev} from the posterior q(x_{t_prev} | x_t, x0).

    With a skip from t to t_prev the effective β is 1 − ᾱ_t/ᾱ_{t_prev} (as in diffusers'
    DDPMScheduler with fewer inference steps); with t_prev = t − 1 this is DDPM exactly.
    """
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    beta = 1 - a_t / a_prev
    # DDPM eq. 7: μ̃ = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (
        math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
    ) * x
    if t_prev < 0:
        return mean
    # DDPM eq. 7: β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t, the "fixed small" variance of §3.2.
    variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    return mean + math.sqrt(variance) * noise


def ddim_step(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step (Song et al. 2021, eq. 12); η = 0 is deterministic, η = 1 is DDPM-like."""
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    # DDIM eq. 16: σ_t(η) = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1})
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    # DDIM eq. 12: x_{t−1} = √ᾱ_{t−1}·x0 + √(1−ᾱ_{t−1}−σ²)·ε + σ·z
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev


def _alpha_sigma_lambda(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """α_t = √ᾱ_t, σ_t = √(1−ᾱ_t) and the half log-SNR λ_t = log(α_t/σ_t) of DPM-Solver."""
    a = schedule.alpha_bar(t)
    alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    lam = math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)
    return alpha, sigma, lam


def dpmpp_2m_step(
    schedule: NoiseSchedule,
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    t: int,
    t_prev: int,
    t_last: int | None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step from t to t_prev (Lu et al. 2022, Algorithm 2).

    ``x0_prev`` and ``t_last`` are the data prediction and timestep of the step before; without
    them (the first step) or when landing on ᾱ = 1 (the last step) the update is first order,
    as in diffusers' ``lower_order_final`` with a zero final sigma.
    """
    _alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t)
    alpha_p, sigma_p, lam_p = _alpha_sigma_lambda(schedule, t_prev)
    if sigma_p == 0:
        return x0  # λ = ∞: the first-order update below reduces to the data prediction itself
    h = lam_p - lam_t
    # Algorithm 2, first order: x̃ = (σ_{t_i}/σ_{t_{i−1}})·x − α_{t_i}·(e^{−h} − 1)·D
    d = x0
    if x0_prev is not None and t_last is not None:
        _, _, lam_last = _alpha_sigma_lambda(schedule, t_last)
        r = (lam_t - lam_last) / h
        # Algorithm 2, second order: D = (1 + 1/(2r))·x0_i − (1/(2r))·x0_{i−1}
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (sigma_p / sigma_t) * x - alpha_p * math.expm1(-h) * d


def dpmpp_3m_step(
    schedule: NoiseSchedule,
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    ts: list[int],
    t_prev: int,
) -> torch.Tensor:
    """One DPM-Solver++(3M) step to ``t_prev`` (Lu et al. 2022, the multistep third-order
    update in data prediction, as diffusers' ``multistep_dpm_solver_third_order_update``).

    ``x0s`` are the data predictions at ``ts``, newest last: three give the third-order update,
    two the second-order one (:func:`dpmpp_2m_step`), one the first-order one.
    """
    if len(x0s) < 3:
        x0_prev = x0s[-2] if len(x0s) == 2 else None
        t_last = ts[-2] if len(ts) == 2 else None
        return dpmpp_2m_step(schedule, x, x0s[-1], x0_prev, ts[-1], t_prev, t_last)
    _, sigma_s0, lam_s0 = _alpha_sigma_lambda(schedule, ts[-1])
    _, _, lam_s1 = _alpha_sigma_lambda(schedule, ts[-2])
    _, _, lam_s2 = _alpha_sigma_lambda(schedule, ts[-3])
    alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t_prev)
    if sigma_t == 0:
        return x0s[-1]
    m0, m1, m2 = x0s[-1], x0s[-2], x0s[-3]
    h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1 / r0) * (m0 - m1), (1 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1 / (r0 + r1)) * (d1_0 - d1_1)
    phi_1 = math.expm1(-h)  # e^{−h} − 1
    return (
        (sigma_t / sigma_s0) * x
        - alpha_t * phi_1 * m0
        + alpha_t * (phi_1 / h + 1) * d1
        - alpha_t * ((phi_1 + h) / h**2 - 0.5) * d2
    )


def _steps(
    timesteps: list[int],
) -> list[tuple[int, int, int]]:
    """(i, t, t_prev) for each step; the step after the last timestep lands on t = −1 (ᾱ = 1)."""
    return [
        (i, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1) for i, t in enumerate(timesteps)
    ]


# A sampler's loop as a generator: it yields (x, t) when it needs the model at t, is sent back
# (x0, ε), and returns the final x. Whoever drives it owns the model calls, so several loops (the
# images of one batch that start at different steps, as image-to-image does) can share each
# batched call; :func:`run_steps` drives one loop alone.
Steps = Generator[tuple[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor], torch.Tensor]


class StepLoop(Protocol):
    def __call__(
        self, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: NoiseFn
    ) -> Steps: ...


def _report(
    callback: Callback | None,
    should_stop: StopFn | None,
    x: torch.Tensor,
    i: int,
    t: int,
    x0: torch.Tensor,
    total: int,
) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "t": t, "denoised": x0, "total": total})
    if should_stop is not None and i + 1 < total and should_stop():
        raise SamplingCanceled(f"canceled after step {i + 1} of {total}")


def run_steps(
    loop: Steps,
    denoise: Denoise,
    total: int,
    callback: Callback | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Drive one sampler loop: the model at every step it asks for, then the callback and the
    stop check after each of its ``total`` steps."""
    x, t = next(loop)
    for i in range(total):
        x0, eps = denoise(x, t)
        try:
            x_next, t_next = loop.send((x0, eps))
        except StopIteration as done:
            _report(callback, should_stop, done.value, i, t, x0, total)
            return done.value
        _report(callback, should_stop, x_next, i, t, x0, total)
        x, t = x_next, t_next
    raise RuntimeError("the sampler asked for more steps than its timesteps")


def ddpm_steps(
    x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: NoiseFn
) -> Steps:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2)."""
    for _, t, t_prev in _steps(timesteps):
        x0, _ = yield x, t
        z = noise(x) if t_prev >= 0 else torch.zeros_like(x)
        x = ddpm_step(schedule, x, x0, t, t_prev, z)
    return x


def ddim_steps(
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    noise: NoiseFn,
    eta: float = 0.0,
) -> Steps:
    """DDIM (Song et al. 2021); deterministic at the default η = 0."""
    for _, t, t_prev in _steps(timesteps):
        x0, eps = yield x, t
        z = noise(x) if eta > 0 and t_prev >= 0 else None
        x = ddim_step(schedule, x0, eps, t, t_prev, eta=eta if t_prev >= 0 else 0.0, noise=z)
    return x


def dpmpp_2m_steps(
    x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: NoiseFn
) -> Steps:
    """DPM-Solver++(2M), the multistep second-order solver in data prediction (Lu et al. 2022)."""
    x0_prev: torch.Tensor | None = None
    t_last: int | None = None
    for _, t, t_prev in _steps(timesteps):
        x0, _ = yield x, t
        x = dpmpp_2m_step(schedule, x, x0, x0_prev, t, t_prev, t_last)
        x0_prev, t_last = x0, t
    return x


def dpmpp_3m_steps(
    x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int], noise: NoiseFn
) -> Steps:
    """DPM-Solver++(3M): the multistep third-order solver in data prediction (Lu et al. 2022).

    As diffusers with ``lower_order_final``: the first two steps warm up at orders one and two,
    the last step (onto ᾱ = 1) is first order, and with fewer than 15 steps the one before it is
    second order, which keeps few-step sampling stable.
    """
    x0s: list[torch.Tensor] = []
    ts: list[int] = []
    total = len(timesteps)
    for i, t, t_prev in _steps(timesteps):
        x0, _ = yield x, t
        x0s, ts = [*x0s[-2:], x0], [*ts[-2:], t]
        order = 3
        if i == total - 1:
            order = 1
        elif i == total - 2 and total < 15:
            order = 2
        x = dpmpp_3m_step(schedule, x, x0s[-order:], ts[-order:], t_prev)
    return x


def _sampler(loop: StepLoop) -> Sampler:
    """The :class:`Sampler` that drives ``loop`` alone."""

    def sample(
        denoise: Denoise,
        x: torch.Tensor,
        schedule: NoiseSchedule,
        timesteps: list[int],
        noise: NoiseFn,
        callback: Callback | None = None,
        should_stop: StopFn | None = None,
    ) -> torch.Tensor:
        steps = loop(x, schedule, timesteps, noise)
        return run_steps(steps, denoise, len(timesteps), callback, should_stop)

    sample.__doc__ = loop.__doc__
    return sample


sample_ddpm = _sampler(ddpm_steps)
sample_ddim = _sampler(ddim_steps)
sample_dpmpp_2m = _sampler(dpmpp_2m_steps)
sample_dpmpp_3m = _sampler(dpmpp_3m_steps)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as users name it: its loop, its timestep spacing, a display name."""

    steps: StepLoop
    spacing: Spacing
    label: str

    @property
    def sample(self) -> Sampler:
        """The loop driven alone (the :class:`Sampler` signature)."""
        return _sampler(self.steps)


# The names users type (CLI, API, form). Options of a sampler are bound here, so that every
# entry has the Sampler signature.
SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm_steps, "trailing", "DDPM"),
    "ddim": SamplerSpec(functools.partial(ddim_steps, eta=0.0), "trailing", "DDIM"),
    "dpmpp-2m": SamplerSpec(dpmpp_2m_steps, "trailing", "DPM-Solver++(2M)"),
    "dpmpp-3m": SamplerSpec(dpmpp_3m_steps, "trailing", "DPM-Solver++(3M)"),
}


def get_sampler(name: str) -> SamplerSpec:
    try:
        return SAMPLERS[name]
    except KeyError:
        known = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"unknown sampler {name!r}; choose one of {known}") from None
