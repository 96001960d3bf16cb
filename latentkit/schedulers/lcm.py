"""Multistep latent consistency sampling (Luo et al. 2023, Algorithm 1), diffusers' ``LCMScheduler``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    BetaSchedule,
    DiscreteScheduler,
    dynamic_threshold,
    predicted_x0,
    resumed,
)

SIGMA_DATA = 0.5
"""The data standard deviation in the consistency-model scalings (Song et al. 2023, appendix C)."""


@register("lcm")
@dataclass(frozen=True, kw_only=True)
class LCM(DiscreteScheduler):
    """Sampler for latent consistency models: each evaluation maps ``x_t`` straight to clean
    data, ``f(x, t) = c_skip(t) * x + c_out(t) * x0_pred`` (the boundary condition
    ``f(x, 0) = x`` built in), then re-noises it to the next timestep with fresh noise, except
    after the last.

    Timesteps are a subset of the ``original_inference_steps`` ones the model was distilled
    on (``k - 1, 2k - 1, ..., N - 1`` with ``k = N // original_inference_steps``), so
    ``steps`` may not exceed ``original_inference_steps``; ``timestep_spacing`` and
    ``steps_offset`` are accepted for config compatibility and unused, as in diffusers.
    """

    name: ClassVar[str] = "lcm"
    diffusers_names: ClassVar[tuple[str, ...]] = ("LCMScheduler",)

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    original_inference_steps: int = 50
    """The number of timesteps of the distillation schedule."""
    clip_sample: bool = False
    """Clamp the predicted ``x0`` to ``[-clip_sample_range, clip_sample_range]``."""
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    """Unused: every step's target timestep is a trained one (kept for config compatibility)."""
    thresholding: bool = False
    """Dynamic thresholding of the predicted ``x0`` (pixel-space models only); wins over ``clip_sample``."""
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_scaling: float = 10.0
    """Multiplies the timestep in ``c_skip`` / ``c_out``, so that ``c_skip`` is ~0 for ``t >= 1``."""
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise InvalidArgumentError(
                f"lcm: original_inference_steps must be between 1 and num_train_timesteps "
                f"({self.num_train_timesteps}), got {self.original_inference_steps}"
            )

    def timesteps(self, steps: int) -> torch.Tensor:
        self._check_steps(steps)
        if steps > self.original_inference_steps:
            raise InvalidArgumentError(
                f"lcm: steps ({steps}) cannot exceed original_inference_steps "
                f"({self.original_inference_steps}): the timesteps are a subset of those"
            )
        k = self.num_train_timesteps // self.original_inference_steps
        distilled = np.arange(self.original_inference_steps, 0, -1, dtype=np.int64) * k - 1
        # Evenly spaced positions in the distillation schedule, from its noisiest end.
        picked = np.floor(np.linspace(0, self.original_inference_steps, steps, endpoint=False))
        return torch.from_numpy(distilled[picked.astype(np.int64)])

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps = self.timesteps(steps)
        model_timesteps = timesteps.to(x.device)
        alphas_cumprod = self._alphas_cumprod()
        total = len(timesteps) - start
        for i, t in enumerate(timesteps[start:], start):
            output = model(x, model_timesteps[i])
            a_t = alphas_cumprod[t]
            x0 = predicted_x0(
                self.prediction_type, output, x, alpha=a_t.sqrt(), sigma=(1 - a_t).sqrt()
            )
            if self.thresholding:
                x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            elif self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            # The consistency-model scalings (Song et al. 2023, appendix C) at the scaled
            # timestep, in float32 as diffusers computes them.
            scaled = t * self.timestep_scaling
            c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
            c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
            x = c_out * x0 + c_skip * x
            if i + 1 < len(timesteps):
                # Re-noise to the next timestep with the forward process (Ho et al. 2020, eq. 4).
                a_next = alphas_cumprod[timesteps[i + 1]]
                fresh = randn(
                    output.shape, generator=generator, device=output.device, dtype=x.dtype
                )
                x = a_next.sqrt() * x + (1 - a_next).sqrt() * fresh
            x = resumed((yield SamplerStep(i - start, total, model_timesteps[i], x)), x)
