"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1,
i.e. Algorithm 2 without churn), diffusers' ``HeunDiscreteScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    SigmaTableScheduler,
    predicted_x0_ve,
    resumed,
)
from latentkit.schedulers.custom import CustomKind


@register("heun")
@dataclass(frozen=True, kw_only=True)
class Heun(SigmaTableScheduler):
    """Heun sampler: an Euler step, then a correction with the slope at its end.

    Two network evaluations per step except the last, which lands on ``sigma = 0`` with
    Euler alone: ``2 * steps - 1`` in all. `timesteps` and `sigmas` list one entry per
    evaluation (the inner ones twice), as diffusers' do.
    """

    name: ClassVar[str] = "heun"
    diffusers_names: ClassVar[tuple[str, ...]] = ("HeunDiscreteScheduler",)
    evaluations_per_step: ClassVar[int] = 2
    custom_values: ClassVar[frozenset[CustomKind]] = frozenset({"timesteps"})

    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    """Beta-distributed sigmas (Lee et al. 2024); not implemented, accepted only as ``False``."""
    clip_sample: bool = False
    """Clamp the predicted ``x0`` to ``[-clip_sample_range, clip_sample_range]``."""
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._sigma_spacing()  # checks the flags

    def timesteps(self, steps: int) -> torch.Tensor:
        return _per_evaluation(super().timesteps(steps))

    def sigmas(self, steps: int) -> torch.Tensor:
        """The noise level at every evaluation, plus the final 0."""
        sigmas = super().sigmas(steps)
        return torch.cat([_per_evaluation(sigmas[:-1]), sigmas[-1:]])

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps, sigmas = self._schedule(steps)
        model_timesteps = timesteps.to(x.device)
        total = 2 * len(timesteps) - 1 - start
        evaluation = 0

        def slope(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Alg. 1, line 4)."""
            output = model(x / ((sigma**2 + 1) ** 0.5), t)
            x0 = predicted_x0_ve(self.prediction_type, output, x, sigma=sigma)
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            return (x - x0) / sigma

        for i in range(start // 2, len(timesteps)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            dt = sigma_next - sigma
            d = slope(x, sigma, model_timesteps[i])
            x_euler = x + d * dt  # Alg. 1, line 5
            step = SamplerStep(evaluation, total, model_timesteps[i], x_euler)
            # A replaced x_euler only changes where the correction's slope is taken; the
            # correction starts from x, as diffusers' second-order step does.
            x_euler = resumed((yield step), x_euler)
            evaluation += 1
            if i == len(timesteps) - 1:
                break  # sigma_next = 0: no correction (Alg. 1, line 6)
            d_next = slope(x_euler, sigma_next, model_timesteps[i + 1])
            x = x + (d + d_next) / 2 * dt  # the trapezoidal rule (Alg. 1, lines 7-8)
            x = resumed((yield SamplerStep(evaluation, total, model_timesteps[i + 1], x)), x)
            evaluation += 1


def _per_evaluation(values: torch.Tensor) -> torch.Tensor:
    # Every entry after the first twice: the correction of step i evaluates at step i + 1's point.
    return torch.cat([values[:1], values[1:].repeat_interleave(2)])
