"""Classifier-free guidance in a limited interval of noise levels.

Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models" (NeurIPS 2024): guidance helps in the middle
of the noise schedule, harms the variety of the result at high noise levels and does little
at low ones, so it is applied only where the noise level σ of an evaluation lies in an
interval ``(σ_lo, σ_hi]``; elsewhere the denoiser is the conditional one alone. Each
evaluation outside the interval runs the UNet on half the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Scheduler
from latentkit.schedulers.common import t_to_sigma


def guidance_gate(
    scheduler: Scheduler, interval: tuple[float, float]
) -> Callable[[torch.Tensor], bool]:
    """Whether an evaluation at model timestep ``t`` is guided: ``σ_lo < σ(t) ≤ σ_hi`` for
    ``interval = (σ_lo, σ_hi)``, the paper's half-open interval.

    ``σ(t) = sqrt((1 - ᾱ_t) / ᾱ_t)`` (Karras et al. 2022's σ of a variance-preserving model)
    of ``scheduler``'s training schedule, interpolated in log σ at fractional timesteps as
    the σ-stepping samplers map σ to ``t`` (`latentkit.schedulers.common.sigma_to_t`), so
    every sampler sees the same σ for the same step.
    """
    table = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(table, torch.Tensor):
        raise InvalidArgumentError(
            f"guidance_interval needs a scheduler with a training noise schedule "
            f"(alphas_cumprod); {type(scheduler).__name__} has none"
        )
    # A zero-terminal-SNR schedule ends at alpha_bar = 0 (sigma = inf): keep it finite.
    alpha_bar = table.double().clamp(min=2**-24)
    log_sigmas = (0.5 * torch.log((1 - alpha_bar) / alpha_bar)).numpy()
    low, high = interval

    def guided(t: torch.Tensor) -> bool:
        sigma = float(t_to_sigma(np.array([float(t)]), log_sigmas)[0])
        return low < sigma <= high

    return guided
