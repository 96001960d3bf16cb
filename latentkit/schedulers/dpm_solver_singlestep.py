"""Single-step DPM-Solver (Lu et al. 2022a, Alg. 1-2; Lu et al. 2022b, Alg. 1), diffusers'
``DPMSolverSinglestepScheduler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import TimestepSpacing, resumed
from latentkit.schedulers.dpm_solver import (
    DPMSolverBase,
    Point,
    exponential_step,
    log_snr_points,
)


def singlestep_differences(
    estimates: Sequence[torch.Tensor], points: Sequence[Point], *, heun: bool
) -> tuple[list[torch.Tensor], bool]:
    """The estimate at the start ``points[0]`` of a step of order ``len(estimates)`` and its
    divided differences, plus whether the first difference takes the midpoint weight.

    ``estimates`` were made at ``points[:-1]``: the step's start and its intermediate points
    (``r1``, ``r2`` of Lu et al. 2022a, Alg. 2, here the schedule's own points).
    """
    m_s = estimates[0]
    if len(estimates) == 1:
        return [m_s], False
    s, t = points[0], points[-1]
    h = t.lam - s.lam
    if len(estimates) == 2:
        r0 = (points[1].lam - s.lam) / h
        return [m_s, (1.0 / r0) * (estimates[1] - m_s)], not heun
    r0, r1 = (points[2].lam - s.lam) / h, (points[1].lam - s.lam) / h
    d1_0 = (1.0 / r1) * (estimates[1] - m_s)
    d1_1 = (1.0 / r0) * (estimates[2] - m_s)
    if not heun:
        # DPM-Solver-3 (Lu et al. 2022a, Alg. 2) uses only the difference to the last point.
        return [m_s, d1_1], False
    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
    return [m_s, d1, d2], False


@register("dpm-solver-singlestep")
@dataclass(frozen=True, kw_only=True)
class DPMSolverSinglestep(DPMSolverBase):
    """Single-step DPM-Solver / DPM-Solver++ of order 1-3 (``algorithm_type`` picks the form).

    Steps come in cycles of orders ``1, 2, ..., solver_order``: a step of order ``k`` goes
    from the cycle's start to the next point, using the estimates at the ``k - 1`` points the
    cycle already passed. Timesteps are always linspace-spaced (diffusers' class has no
    spacing option).
    """

    name: ClassVar[str] = "dpm-solver-singlestep"
    diffusers_names: ClassVar[tuple[str, ...]] = ("DPMSolverSinglestepScheduler",)
    _hidden: ClassVar[tuple[str, ...]] = (
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
    )

    lower_order_final: bool = False
    """Lower the order of the last cycle so it ends on the last step. Taken as ``True`` when
    ``steps`` is not a multiple of ``solver_order`` or with ``final_sigmas_type="zero"`` (as
    diffusers does, which rewrites its config then)."""

    # Options of the base that diffusers' class lacks: fixed, not accepted, not in to_config.
    timestep_spacing: TimestepSpacing = field(default="linspace", init=False, repr=False)
    steps_offset: int = field(default=0, init=False, repr=False)
    rescale_betas_zero_snr: bool = field(default=False, init=False, repr=False)

    def to_config(self) -> dict[str, Any]:
        config = super().to_config()
        for name in self._hidden:
            del config[name]
        return config

    def orders(self, steps: int) -> list[int]:
        """The solver order of each of ``steps`` steps."""
        k = self.solver_order
        cycles, rest = divmod(steps, k)
        if not (self.lower_order_final or rest or self.final_sigmas_type == "zero"):
            return list(range(1, k + 1)) * cycles
        orders = list(range(1, k + 1)) * cycles + list(range(1, rest + 1))
        if rest == 0 and k > 1:
            # The last full cycle becomes 1 .. k-1 and a final first-order step.
            orders[-1] = 1
        if self.final_sigmas_type == "zero":
            orders[-1] = 1  # lambda = inf at sigma = 0: only first order is finite
        return orders

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps, sigmas = self._schedule(steps)
        points = log_snr_points(sigmas)
        model_timesteps = timesteps.to(x.device)
        total = len(timesteps)
        orders = self.orders(total)
        cycle_start = x
        estimates: list[torch.Tensor] = []  # newest last
        for i in range(start, total):
            output = model(x, model_timesteps[i])
            estimates = [*estimates, self._estimate(output, x, sigmas[i])][-self.solver_order :]
            z = None
            if self.algorithm_type == "sde-dpmsolver++":
                # Drawn every step in the estimate's dtype (as diffusers does).
                m = estimates[-1]
                z = randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
            # A run started part-way cannot use more estimates than it has made, so its
            # first cycle is lowered (as diffusers does).
            order = min(orders[i], len(estimates))
            if order == 1:
                cycle_start = x  # a new cycle starts here
            d, midpoint = singlestep_differences(
                estimates[-order:], points[i - order + 1 : i + 2], heun=self.solver_type == "heun"
            )
            # No float32 upcast here: diffusers' single-step class computes in the sample dtype.
            x = exponential_step(
                self.algorithm_type,
                cycle_start,
                points[i - order + 1],
                points[i + 1],
                d,
                midpoint=midpoint,
                noise=z,
            )
            x = resumed((yield SamplerStep(i - start, total - start, model_timesteps[i], x)), x)


__all__ = ["DPMSolverSinglestep", "singlestep_differences"]
