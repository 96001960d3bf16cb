"""Denoising diffusion probabilistic models (Ho et al. 2020), diffusers' ``DDPMScheduler``.

Ancestral sampling from the posterior ``q(x_prev | x_t, x0)`` with the network's ``x0``,
jumping between the spaced timesteps; with ``fixed_small`` variance this is DDIM with
``eta = 1`` (Song et al. 2021, eq. 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from latentkit.errors import InvalidArgumentError
from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    DiscreteScheduler,
    dynamic_threshold,
    predicted_x0,
    resumed,
)
from latentkit.schedulers.custom import CustomKind

VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
"""The variance of each step: the posterior's ``beta_tilde`` (small) or ``beta`` (large)
(Ho et al. 2020, sec. 3.2), the network's (``learned``), or the network's interpolation
between the two in log space (``learned_range``, Nichol & Dhariwal 2021, eq. 15).
diffusers' ``fixed_large_log`` is refused: diffusers takes the square root of a log there
and returns NaN."""


@register("ddpm")
@dataclass(frozen=True, kw_only=True)
class DDPM(DiscreteScheduler):
    """DDPM ancestral sampling; stochastic, one evaluation per step.

    Each step goes from one spaced timestep to the next (to clean data after the last),
    drawing fresh noise except at ``t = 0``.
    """

    name: ClassVar[str] = "ddpm"
    diffusers_names: ClassVar[tuple[str, ...]] = ("DDPMScheduler",)
    custom_values: ClassVar[frozenset[CustomKind]] = frozenset({"timesteps"})

    variance_type: VarianceType = "fixed_small"
    """With ``learned`` / ``learned_range`` the network outputs twice the sample's channels."""
    clip_sample: bool = True
    """Clamp the predicted ``x0`` to ``[-clip_sample_range, clip_sample_range]``."""
    thresholding: bool = False
    """Dynamic thresholding of the predicted ``x0`` (pixel-space models only); wins over ``clip_sample``."""
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False

    def timesteps(self, steps: int) -> torch.Tensor:
        return self._integer_timesteps(steps)

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps = self.timesteps(steps)
        model_timesteps = timesteps.to(x.device)
        alphas_cumprod = self._alphas_cumprod()
        one = torch.tensor(1.0)
        total = len(timesteps) - start
        for i, t in enumerate(timesteps.tolist()[start:], start):
            output = model(x, model_timesteps[i])
            learned: torch.Tensor | None = None
            if self.variance_type in ("learned", "learned_range"):
                if output.shape[1] != 2 * x.shape[1]:
                    raise InvalidArgumentError(
                        f"ddpm: variance_type={self.variance_type!r} needs a network output with "
                        f"{2 * x.shape[1]} channels (prediction and variance), got {output.shape[1]}"
                    )
                output, learned = output[:, : x.shape[1]], output[:, x.shape[1] :]
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else one
            beta_t = 1 - a_t / a_prev  # the beta of the whole (possibly skipped) step
            x0 = predicted_x0(
                self.prediction_type, output, x, alpha=a_t**0.5, sigma=(1 - a_t) ** 0.5
            )
            if self.thresholding:
                x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            elif self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            # The posterior mean mu_tilde (Ho et al. 2020, eq. 7).
            x0_coefficient = (a_prev**0.5 * beta_t) / (1 - a_t)
            x_coefficient = (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)
            x = x0_coefficient * x0 + x_coefficient * x
            if t > 0:
                fresh = randn(
                    output.shape, generator=generator, device=output.device, dtype=output.dtype
                )
                x = x + self._std(a_t, a_prev, beta_t, learned) * fresh
            x = resumed((yield SamplerStep(i - start, total, model_timesteps[i], x)), x)

    def _std(
        self,
        a_t: torch.Tensor,
        a_prev: torch.Tensor,
        beta_t: torch.Tensor,
        learned: torch.Tensor | None,
    ) -> torch.Tensor:
        # The standard deviation of the step's noise, per variance_type.
        # The posterior variance beta_tilde (Ho et al. 2020, eq. 7), kept off 0 for the logs.
        small = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        if self.variance_type == "fixed_small":
            return small**0.5
        if self.variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(small))
        if self.variance_type == "fixed_large":
            return beta_t**0.5
        assert learned is not None  # split off in _sample
        if self.variance_type == "learned":
            # Read as the variance itself, as diffusers does.
            return learned**0.5
        # learned_range: v in [-1, 1] interpolates the log variance (Nichol & Dhariwal 2021, eq. 15).
        frac = (learned + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(small)))
