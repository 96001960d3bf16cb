"""Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``), diffusers'
``EulerAncestralDiscreteScheduler``.

Each step takes an Euler step of the probability-flow ODE down to ``sigma_down`` and adds
fresh noise of standard deviation ``sigma_up``, so that the result has the marginal of
``sigma_next`` (``sigma_down**2 + sigma_up**2 = sigma_next**2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import SigmaTableScheduler, predicted_x0_ve, resumed


@register("euler-ancestral")
@dataclass(frozen=True, kw_only=True)
class EulerAncestral(SigmaTableScheduler):
    """Euler ancestral sampler over the table's sigmas; stochastic, one evaluation per step."""

    name: ClassVar[str] = "euler-ancestral"
    diffusers_names: ClassVar[tuple[str, ...]] = ("EulerAncestralDiscreteScheduler",)

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rescale_betas_zero_snr: bool = False

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps, sigmas = self._schedule(steps)
        model_timesteps = timesteps.to(x.device)
        total = len(timesteps) - start
        for i, sigma in enumerate(sigmas[start:-1], start):
            output = model(x / ((sigma**2 + 1) ** 0.5), model_timesteps[i])
            # The step is taken in float32 whatever the sample dtype, as diffusers does.
            x32 = x.float()
            x0 = predicted_x0_ve(self.prediction_type, output, x32, sigma=sigma)
            sigma_next = sigmas[i + 1]
            # Split sigma_next into the deterministic and the fresh-noise part.
            sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            derivative = (x32 - x0) / sigma  # dx/dsigma (Karras et al. 2022, Alg. 1, line 4)
            x32 = x32 + derivative * (sigma_down - sigma)
            # Drawn on the last step too (where sigma_up = 0), as diffusers does, so that the
            # generator ends in the same state.
            fresh = randn(
                output.shape, generator=generator, device=output.device, dtype=output.dtype
            )
            x = (x32 + fresh * sigma_up).to(output.dtype)
            x = resumed((yield SamplerStep(i - start, total, model_timesteps[i], x)), x)
