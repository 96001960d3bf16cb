"""Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 2 without churn).

The Stable Diffusion 2 and SDXL default (diffusers' ``EulerDiscreteScheduler``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    SigmaScheduler,
    VarianceExploding,
    interpolated_schedule,
    predicted_x0_ve,
    resumed,
    spaced_timesteps,
)
from latentkit.schedulers.custom import CustomKind, CustomSchedule


@register("euler")
@dataclass(frozen=True, kw_only=True)
class Euler(VarianceExploding, SigmaScheduler):
    """Euler sampler over sigmas; ``x`` lives at scale ``x0 + sigma * eps``.

    The network sees ``x / sqrt(sigma**2 + 1)``, the variance-preserving sample it was
    trained on. Timesteps are fractional for ``linspace`` spacing and Karras sigmas.
    """

    name: ClassVar[str] = "euler"
    diffusers_names: ClassVar[tuple[str, ...]] = ("EulerDiscreteScheduler",)

    interpolation_type: Literal["linear"] = "linear"
    """How sigmas are read off the table between training steps (diffusers' ``log_linear`` is not implemented)."""
    sigma_min: float | None = None
    """Lower end of Karras/exponential sigmas; default: the table's value at the last timestep."""
    sigma_max: float | None = None
    """Upper end of Karras/exponential sigmas; default: the table's value at the first timestep."""
    timestep_type: Literal["discrete", "continuous"] = "discrete"
    """``continuous`` (with ``v_prediction``): the network takes ``0.25 * log(sigma)`` as its timestep."""

    custom_values: ClassVar[frozenset[CustomKind]] = frozenset({"timesteps", "sigmas"})

    def _check_custom(self, custom: CustomSchedule) -> None:
        super()._check_custom(custom)
        if custom.kind == "timesteps" and self._continuous():
            raise InvalidArgumentError(
                "euler: custom timesteps do not go with timestep_type='continuous' "
                "(its timesteps are 0.25 * log(sigma)); pass sigmas= instead"
            )

    def _continuous(self) -> bool:
        return self.timestep_type == "continuous" and self.prediction_type == "v_prediction"

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.custom_schedule is not None:
            given, custom_sigmas = self._custom_values(self.custom_schedule, integer=False)
            if self._continuous():
                return torch.stack([0.25 * s.log() for s in custom_sigmas[:-1]]), custom_sigmas
            return given, custom_sigmas
        spaced = spaced_timesteps(
            self.timestep_spacing,
            steps,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
        ).astype(np.float32)
        table = self._sigma_table()
        timesteps, sigmas = interpolated_schedule(
            spaced,
            table,
            spacing=self._sigma_spacing(),
            count=steps,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
        )
        all_sigmas = self._with_final_sigma(sigmas, table)
        if self._continuous():
            # One 0-d log at a time, as diffusers does (vectorised log may differ in the last bit).
            return torch.stack([0.25 * s.log() for s in all_sigmas[:-1]]), all_sigmas
        return torch.from_numpy(self._within_training_range(timesteps)), all_sigmas

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps, sigmas = self._schedule(steps)
        model_timesteps = timesteps.to(x.device)
        dtype, total = x.dtype, len(timesteps) - start
        for i, sigma in enumerate(sigmas[start:-1], start):
            output = model(x / ((sigma**2 + 1) ** 0.5), model_timesteps[i])
            # The step is taken in float32 whatever the sample dtype, as diffusers does.
            x32 = x.float()
            x0 = predicted_x0_ve(self.prediction_type, output, x32, sigma=sigma)
            derivative = (x32 - x0) / sigma  # dx/dsigma (Karras et al. 2022, Alg. 1, line 4)
            x = (x32 + derivative * (sigmas[i + 1] - sigma)).to(dtype)
            x = resumed((yield SamplerStep(i - start, total, model_timesteps[i], x)), x)
