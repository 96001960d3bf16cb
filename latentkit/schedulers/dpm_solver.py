"""Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling"),
diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Denoiser, Generators, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    SigmaScheduler,
    dynamic_threshold,
    predicted_x0,
    sigma_to_t,
    spaced_timesteps,
    vp_coefficients,
)

# diffusers loads configs of sibling solvers (DEIS, UniPC) into this class by mapping
# their algorithm and solver names onto its own; we do the same.
_FOREIGN_ALGORITHMS = {"deis": "dpmsolver++"}
_FOREIGN_SOLVERS = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


@register("dpm-solver++")
@dataclass(frozen=True, kw_only=True)
class DPMSolverPlusPlus(SigmaScheduler):
    """Multistep DPM-Solver++ of order 1-3 in the data-prediction (``x0``) form.

    Works in log-SNR time ``lambda = log(alpha_t / sigma_t)``; each step reuses the ``x0``
    predictions of the previous ones, so one network evaluation per step.
    """

    name: ClassVar[str] = "dpm-solver++"
    diffusers_names: ClassVar[tuple[str, ...]] = ("DPMSolverMultistepScheduler",)

    solver_order: int = 2
    """Order of the multistep solver: 1 (DDIM), 2 (DPM-Solver++(2M), the guided-sampling default) or 3."""
    algorithm_type: Literal["dpmsolver++"] = "dpmsolver++"
    """Only ``dpmsolver++`` is registered under this name."""
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    """Second-order term: ``midpoint`` (Alg. 2 of the paper) or ``heun``."""
    lower_order_final: bool = True
    """Lower the order of the last steps when there are fewer than 15 (stabler for few steps)."""
    euler_at_final: bool = False
    """Take the last step with first order whatever the step count."""
    thresholding: bool = False
    """Dynamic thresholding of the predicted ``x0`` (pixel-space models only)."""
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    lambda_min_clipped: float = -float("inf")
    """Do not sample timesteps whose log-SNR is below this (for cosine schedules)."""
    variance_type: Literal["learned", "learned_range"] | None = None
    """Set for networks that also output a variance (extra channels, dropped here)."""
    use_lu_lambdas: bool = False
    """Not implemented, accepted only as ``False``."""
    use_flow_sigmas: bool = False
    """Not implemented, accepted only as ``False``."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "algorithm_type",
            _FOREIGN_ALGORITHMS.get(self.algorithm_type, self.algorithm_type),
        )
        object.__setattr__(
            self, "solver_type", _FOREIGN_SOLVERS.get(self.solver_type, self.solver_type)
        )
        super().__post_init__()
        if self.solver_order not in (1, 2, 3):
            raise InvalidArgumentError(
                f"dpm-solver++: solver_order must be 1, 2 or 3, got {self.solver_order}"
            )
        for option in ("use_lu_lambdas", "use_flow_sigmas"):
            if getattr(self, option):
                raise InvalidArgumentError(f"dpm-solver++: {option} is not implemented")

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        alphas_cumprod = self._alphas_cumprod()
        if self.rescale_betas_zero_snr:
            alphas_cumprod = alphas_cumprod.clone()
            alphas_cumprod[-1] = 2**-24
        # Sample no timestep whose log-SNR lies below lambda_min_clipped.
        lambdas = torch.log(alphas_cumprod.sqrt()) - torch.log((1 - alphas_cumprod).sqrt())
        last = self.num_train_timesteps - int(
            torch.searchsorted(lambdas.flip(0), self.lambda_min_clipped)
        )
        spacing = dict(
            num_train_timesteps=self.num_train_timesteps, steps_offset=self.steps_offset, end=last
        )
        if self.timestep_spacing == "trailing":
            spaced = spaced_timesteps("trailing", steps, **spacing)
        else:
            # linspace and leading space steps + 1 points and drop the last (t = 0).
            spaced = spaced_timesteps(self.timestep_spacing, steps + 1, **spacing)[:-1]
            if self.timestep_spacing == "linspace":
                spaced = np.round(spaced)
        table = self._sigma_table()
        sigmas = np.interp(spaced, np.arange(len(table)), table)
        respaced = self._respaced(float(table[0]), float(table[-1]), steps)
        if respaced is not None:
            sigmas = respaced
            spaced = sigma_to_t(sigmas, np.log(table))
            # diffusers rounds Karras timesteps, except for the cosine schedule, and never
            # exponential ones; the int64 cast below then truncates.
            if self.use_karras_sigmas and self.beta_schedule != "squaredcos_cap_v2":
                spaced = np.round(spaced)
        elif self.timestep_spacing == "leading" and steps + 1 > last:
            # The stride last // (steps + 1) is 0: every timestep would be the same.
            raise InvalidArgumentError(
                f"dpm-solver++: leading spacing cannot fit {steps} distinct timesteps; "
                f"use at most {last - 1} steps or another timestep_spacing"
            )
        timesteps = self._within_training_range(spaced.astype(np.int64))
        return torch.from_numpy(timesteps), self._with_final_sigma(sigmas, table)

    def _sample(
        self, model: Denoiser, noise: torch.Tensor, steps: int, generator: Generators
    ) -> Iterator[SamplerStep]:
        timesteps, sigmas = self._schedule(steps)
        model_timesteps = timesteps.to(noise.device)
        total = len(timesteps)
        few = self.lower_order_final and total < 15
        x = noise
        x0s: list[torch.Tensor] = []  # data predictions, newest last
        for i in range(total):
            output = model(x, model_timesteps[i])
            if self.variance_type is not None:
                output = output[:, : x.shape[1]]  # drop the predicted variance channels
            alpha, sigma = vp_coefficients(sigmas[i])
            x0 = predicted_x0(self.prediction_type, output, x, alpha=alpha, sigma=sigma)
            if self.thresholding:
                x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            x0s = [*x0s, x0][-self.solver_order :]
            order = min(self.solver_order, i + 1)
            if i == total - 1 and (self.euler_at_final or few or self.final_sigmas_type == "zero"):
                order = 1  # the last step lands on sigma = 0 (lambda = inf) or is lowered
            elif i == total - 2 and few:
                order = min(order, 2)
            # The update runs in float32 whatever the sample dtype, as diffusers does.
            x = self._update(x.float(), x0s[-order:], sigmas[i - order + 1 : i + 2]).to(noise.dtype)
            yield SamplerStep(i, total, model_timesteps[i], x)

    def _update(
        self, x: torch.Tensor, x0s: list[torch.Tensor], sigmas: torch.Tensor
    ) -> torch.Tensor:
        """One multistep update from ``sigmas[-2]`` to ``sigmas[-1]``.

        ``x0s`` are the data predictions at ``sigmas[:-1]`` (newest last); their number is the order.
        """
        # Scalar by scalar, as diffusers does: a vectorised log may round differently.
        coefficients = [vp_coefficients(s) for s in sigmas]
        lambdas = [torch.log(a) - torch.log(s) for a, s in coefficients]
        (_, sigma_s0), (alpha_t, sigma_t) = coefficients[-2:]
        h = lambdas[-1] - lambdas[-2]
        if h == 0:
            # Karras sigmas with final_sigmas_type="sigma_min" end on a repeated sigma: the
            # step is the identity (diffusers divides 0 by 0 there for heun and order 3).
            return x
        decay = torch.exp(-h) - 1.0  # e^{-h} - 1
        m0 = x0s[-1]
        # First order (DPM-Solver++(1), i.e. DDIM in lambda time).
        x_t = (sigma_t / sigma_s0) * x - (alpha_t * decay) * m0
        if len(x0s) == 1:
            return x_t
        m1 = x0s[-2]
        r0 = (lambdas[-2] - lambdas[-3]) / h
        d1_0 = (1.0 / r0) * (m0 - m1)
        if len(x0s) == 2:
            # Second order (DPM-Solver++(2M), Alg. 2); heun uses the exact phi_2 weight.
            if self.solver_type == "midpoint":
                return x_t - 0.5 * (alpha_t * decay) * d1_0
            return x_t + (alpha_t * (decay / h + 1.0)) * d1_0
        # Third order (DPM-Solver++(3M) of the authors' code): adds a second divided
        # difference of the x0 predictions.
        m2 = x0s[-3]
        r1 = (lambdas[-3] - lambdas[-4]) / h
        d1_1 = (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return (
            x_t + (alpha_t * (decay / h + 1.0)) * d1 - (alpha_t * ((decay + h) / h**2 - 0.5)) * d2
        )
