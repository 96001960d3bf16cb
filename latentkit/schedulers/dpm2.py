"""DPM2 and DPM2 ancestral: k-diffusion's ``sample_dpm_2`` / ``sample_dpm_2_ancestral``,
diffusers' ``KDPM2DiscreteScheduler`` / ``KDPM2AncestralDiscreteScheduler`` (A1111's "DPM2",
"DPM2 a").

The midpoint method on the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``
(Karras et al. 2022, eq. 3 with their Alg. 1's notation): an Euler step to the geometric
mean ``m`` of the step's two noise levels (the midpoint in log sigma, the "DPM-Solver-2"
choice of Lu et al. 2022a, sec. 3.3, with ``r = 1/2``), then the whole step with the slope
found there. The ancestral variant steps the same way to ``sigma_down`` and adds fresh noise
of standard deviation ``sigma_up`` (see `ancestral_split`).

A1111 differs in one respect: it drops the next-to-last sigma of these two samplers' schedule
(``discard_next_to_last_sigma``), so its DPM2 at ``n`` steps runs the schedule of ``n + 1``
steps without its smallest nonzero level. latentkit follows diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from latentkit.schedulers import register
from latentkit.schedulers.two_stage import (
    NoiseSource,
    Plan,
    TwoStage,
    ancestral_split,
    float32_positions,
)


@dataclass(frozen=True, kw_only=True)
class _DPM2Options(TwoStage):
    # The options of both diffusers classes, with their defaults.
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """diffusers implements no ``sample`` prediction for these classes, nor do we."""
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    """Beta-distributed sigmas (Lee et al. 2024); not implemented, accepted only as ``False``."""

    rounds_karras_timesteps: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._sigma_spacing()  # checks the flags

    def _first_half(
        self, x: torch.Tensor, x0: torch.Tensor, i: int, plan: Plan, noise: NoiseSource
    ) -> torch.Tensor:
        # Both classes take an Euler step to the midpoint; they differ in where it lies.
        sigma = plan.sigmas[i]
        return x + (x - x0) / sigma * (plan.mids[i] - sigma)


@register("dpm2")
@dataclass(frozen=True, kw_only=True)
class DPM2(_DPM2Options):
    """DPM2: the midpoint method in log sigma; deterministic, two evaluations per step but the last."""

    name: ClassVar[str] = "dpm2"
    diffusers_names: ClassVar[tuple[str, ...]] = ("KDPM2DiscreteScheduler",)

    def _midpoints(
        self, sigmas: torch.Tensor, spaced: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # m_i = exp((log sigma_i + log sigma_{i+1}) / 2), computed over the whole schedule at
        # once as diffusers does (a vectorised log may round differently from a scalar one).
        mids = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()[1:-1]
        return mids, float32_positions(mids, self._sigma_table())

    def _second_half(
        self,
        x: torch.Tensor,
        x_mid: torch.Tensor,
        x0_mid: torch.Tensor,
        i: int,
        plan: Plan,
        noise: NoiseSource,
    ) -> torch.Tensor:
        # The whole step with the slope at the midpoint (Lu et al. 2022a, Alg. 4 in sigma).
        slope = (x_mid - x0_mid) / plan.mids[i]
        return x + slope * (plan.sigmas[i + 1] - plan.sigmas[i])


@register("dpm2-ancestral")
@dataclass(frozen=True, kw_only=True)
class DPM2Ancestral(_DPM2Options):
    """DPM2 ancestral: DPM2 down to ``sigma_down``, then fresh noise of ``sigma_up`` from the
    run's generator (one draw per step but the last); stochastic."""

    name: ClassVar[str] = "dpm2-ancestral"
    diffusers_names: ClassVar[tuple[str, ...]] = ("KDPM2AncestralDiscreteScheduler",)

    def _midpoints(
        self, sigmas: torch.Tensor, spaced: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # m_i = exp((log sigma_i + log sigma_down_i) / 2), over the whole schedule at once.
        down, _ = ancestral_split(sigmas, sigmas.roll(-1))
        mids = sigmas.log().lerp(down.log(), 0.5).exp()[:-2]
        return mids, float32_positions(mids, self._sigma_table())

    def _second_half(
        self,
        x: torch.Tensor,
        x_mid: torch.Tensor,
        x0_mid: torch.Tensor,
        i: int,
        plan: Plan,
        noise: NoiseSource,
    ) -> torch.Tensor:
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        down, up = ancestral_split(sigma, sigma_next)
        slope = (x_mid - x0_mid) / plan.mids[i]
        return x + slope * (down - sigma) + noise(sigma, sigma_next) * up


__all__ = ["DPM2", "DPM2Ancestral"]
