"""The single-step second-order samplers of k-diffusion: two network evaluations per step.

Each step from ``sigma_i`` to ``sigma_{i+1}`` evaluates the network at ``sigma_i``, moves to
an intermediate noise level ``m_i`` (between the two, in log sigma), evaluates it again there,
and takes the whole step with what it learned at ``m_i``; the last step, down to ``sigma = 0``,
is one Euler step. So ``steps`` steps make ``2 * steps - 1`` evaluations, as diffusers counts
them (``scheduler.order == 2``). `TwoStage` holds the schedule and the loop; each sampler
says where its midpoint lies and how the two half steps update the sample:

- `latentkit.schedulers.dpm2`: DPM2 and DPM2 ancestral (Karras et al. 2022, k-diffusion);
- `latentkit.schedulers.dpm_solver_2s`: DPM-Solver++(2S) with ancestral noise (A1111's
  "DPM++ 2S a") and with Brownian-tree noise (diffusers' ``DPMSolverSDEScheduler``,
  A1111's "DPM++ SDE").
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers.common import (
    SigmaTableScheduler,
    predicted_x0_ve,
    resumed,
    ve_noised,
)

NoiseSource = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``noise(sigma, sigma_next)``: unit Gaussian noise for the move from ``sigma`` to ``sigma_next``."""


@dataclass(frozen=True)
class Plan:
    """The noise levels and model timesteps of one run of ``steps`` steps."""

    sigmas: torch.Tensor
    """``steps + 1`` float32 step boundaries, the last 0."""
    timesteps: torch.Tensor
    """``steps`` float32 model timesteps of each step's first evaluation (at ``sigmas[i]``)."""
    mids: torch.Tensor
    """``steps - 1`` float32 noise levels of each step's second evaluation (the last step has none)."""
    mid_timesteps: torch.Tensor
    """The model timesteps of ``mids``, float32."""

    def per_evaluation(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``first[0], second[0], first[1], second[1], ..., first[-1]``: one entry per evaluation."""
        pairs = torch.stack([first[:-1], second], dim=1).flatten()
        return torch.cat([pairs, first[-1:]])


@dataclass(frozen=True, kw_only=True)
class TwoStage(SigmaTableScheduler):
    """Base of the samplers that evaluate the network twice per step (see the module).

    `timesteps` and `sigmas` list one entry per evaluation: ``sigmas(steps)`` is the noise
    level the network sees at each (``sigma_i`` or the midpoint ``m_i``), plus the final 0.
    `noised` follows diffusers' ``add_noise`` for these classes: position ``2i`` (the start
    of step ``i``) is at ``sigma_i``, and position ``2i + 1`` (after the first half of step
    ``i``) at ``sigma_{i+1}``, the level the step is heading to, not ``m_i``; so inpainting by
    blending keeps the known region as diffusers' pipelines do.
    """

    evaluations_per_step: ClassVar[int] = 2

    def timesteps(self, steps: int) -> torch.Tensor:
        """The model timestep of every evaluation: ``2 * steps - 1`` of them."""
        self._check_steps(steps)
        plan = self._plan(steps)
        return plan.per_evaluation(plan.timesteps, plan.mid_timesteps)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The noise level of every evaluation, plus the final 0."""
        self._check_steps(steps)
        plan = self._plan(steps)
        return torch.cat([plan.per_evaluation(plan.sigmas[:-1], plan.mids), plan.sigmas[-1:]])

    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, *, steps: int, index: int
    ) -> torch.Tensor:
        """``x0 + sigma * noise`` at the level of position ``index`` as diffusers' ``add_noise``
        gives it: ``sigma_{(index + 1) // 2}`` (see the class)."""
        self._check_steps(steps)
        sigmas = self._schedule(steps)[1]
        self._check_index(index, 2 * (len(sigmas) - 1) - 1)
        return ve_noised(x0, noise, sigmas[(index + 1) // 2])

    # ---- for subclasses

    @abc.abstractmethod
    def _midpoints(
        self, sigmas: torch.Tensor, spaced: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mids, timesteps)``: the float32 midpoint of every step but the last, and the
        model timesteps there (see `float32_positions`), computed as diffusers computes
        them. ``sigmas`` are the float32 step boundaries ending at 0, ``spaced`` the float64
        ones before that rounding."""

    @abc.abstractmethod
    def _first_half(
        self, x: torch.Tensor, x0: torch.Tensor, i: int, plan: Plan, noise: NoiseSource
    ) -> torch.Tensor:
        """The sample at ``plan.mids[i]``, from ``x`` at ``plan.sigmas[i]`` and the network's ``x0`` there."""

    @abc.abstractmethod
    def _second_half(
        self,
        x: torch.Tensor,
        x_mid: torch.Tensor,
        x0_mid: torch.Tensor,
        i: int,
        plan: Plan,
        noise: NoiseSource,
    ) -> torch.Tensor:
        """The sample at ``plan.sigmas[i + 1]``, from ``x`` at ``plan.sigmas[i]`` and the
        network's ``x0_mid`` at ``x_mid`` (at ``plan.mids[i]``)."""

    def _noise(self, x: torch.Tensor, plan: Plan, generator: Generators) -> NoiseSource:
        """The run's noise: by default a fresh draw from ``generator`` at every call."""

        def fresh(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        return fresh

    # ---- the loop

    def _plan(self, steps: int) -> Plan:
        timesteps, spaced = self._spaced_sigmas(steps)
        sigmas = torch.from_numpy(np.append(spaced, 0.0).astype(np.float32))
        mids, mid_timesteps = self._midpoints(sigmas, spaced)
        return Plan(
            sigmas=sigmas,
            timesteps=torch.from_numpy(timesteps),
            mids=mids,
            mid_timesteps=mid_timesteps.to(torch.float32),
        )

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        plan = self._plan(steps)
        first, second = plan.timesteps.to(x.device), plan.mid_timesteps.to(x.device)
        last = len(plan.timesteps) - 1
        total = 2 * last + 1 - start
        noise = self._noise(x, plan, generator)

        def denoised(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # The network sees the variance-preserving x / sqrt(sigma**2 + 1).
            output = model(x / ((sigma**2 + 1) ** 0.5), t)
            return predicted_x0_ve(self.prediction_type, output, x, sigma=sigma)

        for i in range(start // 2, last + 1):
            sigma = plan.sigmas[i]
            x0 = denoised(x, sigma, first[i])
            if i == last:
                # Down to sigma = 0: one Euler step along dx/dsigma = (x - x0) / sigma
                # (Karras et al. 2022, Alg. 1, line 5), which lands on x0.
                x = x + (x - x0) / sigma * (0.0 - sigma)
                x = resumed((yield SamplerStep(2 * i - start, total, first[i], x)), x)
                break
            x_mid = self._first_half(x, x0, i, plan, noise)
            # A replaced x_mid only changes where the second evaluation is taken; the full
            # step starts from x, as diffusers' second-order steps do.
            x_mid = resumed((yield SamplerStep(2 * i - start, total, first[i], x_mid)), x_mid)
            x0_mid = denoised(x_mid, plan.mids[i], second[i])
            x = self._second_half(x, x_mid, x0_mid, i, plan, noise)
            x = resumed((yield SamplerStep(2 * i + 1 - start, total, second[i], x)), x)


def float32_positions(sigmas: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """`latentkit.schedulers.common.sigma_to_t` in float32 arithmetic, one sigma at a time, as
    diffusers' KDPM2 classes find their midpoints' timesteps: the logs by numpy (whose float32
    log may differ from torch's in the last bit), the rest by torch."""
    log_table = torch.from_numpy(np.log(table))
    positions = []
    for sigma in sigmas:
        log_sigma = torch.from_numpy(
            np.asarray(np.log(np.maximum(sigma.numpy(), np.float32(1e-10))))
        )
        low = int((log_sigma >= log_table).sum().clamp(1, len(log_table) - 1)) - 1
        w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
        positions.append((1 - w) * low + w * (low + 1))
    return torch.stack(positions) if positions else torch.zeros(0)


def ancestral_split(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0, *, stable: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma_down, sigma_up)``: a move from ``sigma`` to ``sigma_next`` as a deterministic
    move to ``sigma_down`` plus fresh noise of standard deviation ``sigma_up``, with
    ``sigma_down**2 + sigma_up**2 = sigma_next**2`` (k-diffusion's ``get_ancestral_step``).

    ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next**2 / sigma**2)``, at most
    ``sigma_next``: ``eta = 1`` adds the variance the reverse-time posterior of the
    variance-exploding process adds (Ho et al. 2020, eq. 7, at this scale), ``eta = 0`` none
    (the ODE). diffusers and k-diffusion compute ``sigma_down`` as
    ``sqrt(sigma_next**2 - sigma_up**2)``, which cancels: for a long step (``sigma_next <<
    sigma``) float32 leaves it with a relative error of about ``2**-24 * sigma**2 /
    sigma_next**2``, 1 % for one step from Stable Diffusion's largest sigma to its smallest.
    The samplers exact against diffusers keep that form; ``stable`` computes
    ``sigma_down = sigma_next * sqrt(1 - eta**2 + eta**2 * sigma_next**2 / sigma**2)``
    instead, the same value without the cancellation. Works elementwise on tensors.
    """
    if stable:
        ratio = sigma_next**2 / sigma**2
        up = torch.minimum(sigma_next, eta * sigma_next * (1 - ratio) ** 0.5)
        return sigma_next * (1 - eta**2 + eta**2 * ratio) ** 0.5, up
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    up = torch.minimum(sigma_next, up)
    return (sigma_next**2 - up**2) ** 0.5, up


__all__ = ["NoiseSource", "Plan", "TwoStage", "ancestral_split", "float32_positions"]
