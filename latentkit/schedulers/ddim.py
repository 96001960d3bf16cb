"""Denoising diffusion implicit models (Song et al. 2021), diffusers' ``DDIMScheduler``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from latentkit.errors import InvalidArgumentError
from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    DiscreteScheduler,
    dynamic_threshold,
    predicted_eps,
    predicted_x0,
    resumed,
)


@register("ddim")
@dataclass(frozen=True, kw_only=True)
class DDIM(DiscreteScheduler):
    """DDIM: deterministic for ``eta = 0``, DDPM-like ancestral sampling for ``eta = 1``.

    Each step jumps from ``t`` to ``t - num_train_timesteps // steps`` (whatever the
    spacing, as diffusers does).
    """

    name: ClassVar[str] = "ddim"
    diffusers_names: ClassVar[tuple[str, ...]] = ("DDIMScheduler",)

    clip_sample: bool = True
    """Clamp the predicted ``x0`` to ``[-clip_sample_range, clip_sample_range]``."""
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    """Past the first training step, use ``alpha_bar = 1`` (clean data) instead of ``alpha_bar_0``."""
    thresholding: bool = False
    """Dynamic thresholding of the predicted ``x0`` (pixel-space models only); wins over ``clip_sample``."""
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False
    eta: float = 0.0
    """Weight of the fresh noise of each step (Song et al. 2021, eq. 16); a ``step`` argument in diffusers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta < 0:
            raise InvalidArgumentError(f"ddim: eta must be >= 0, got {self.eta}")

    def timesteps(self, steps: int) -> torch.Tensor:
        return self._integer_timesteps(steps)

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps = self.timesteps(steps)
        model_timesteps = timesteps.to(x.device)
        alphas_cumprod = self._alphas_cumprod()
        final_alpha_cumprod = torch.tensor(1.0) if self.set_alpha_to_one else alphas_cumprod[0]
        jump = self.num_train_timesteps // steps
        total = len(timesteps) - start
        for i, t in enumerate(timesteps.tolist()[start:], start):
            output = model(x, model_timesteps[i])
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[t - jump] if t - jump >= 0 else final_alpha_cumprod
            alpha, sigma = a_t**0.5, (1 - a_t) ** 0.5
            x0 = predicted_x0(self.prediction_type, output, x, alpha=alpha, sigma=sigma)
            # eps comes from the unclipped x0, as in diffusers (its use_clipped_model_output=False).
            eps = predicted_eps(self.prediction_type, output, x, alpha=alpha, sigma=sigma)
            if self.thresholding:
                x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            elif self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            # sigma_t(eta) of eq. 16, then the update of eq. 12 (Song et al. 2021).
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = self.eta * variance**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
            if self.eta > 0:
                x = x + std * randn(
                    output.shape, generator=generator, device=output.device, dtype=output.dtype
                )
            x = resumed((yield SamplerStep(i - start, total, model_timesteps[i], x)), x)
