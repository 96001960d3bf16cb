"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"),
A1111's "Restart" (its ``restart_sampler`` in ``modules/sd_samplers_extra.py``).

The run is Heun's method on the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``
(Karras et al. 2022, Alg. 1, as `latentkit.schedulers.heun.Heun`), with restarts: once the
main run has come down to the level ``s_min``, ``K`` times over, the sample is taken back up
to ``s_max`` by the forward process, ``x <- x + sqrt(s_max**2 - s_min**2) * z`` with fresh
Gaussian ``z`` (the paper's "Restart forward process"), and brought down to ``s_min`` again
by the ODE (its "Restart backward process", here Heun steps on Karras levels). The added
noise contracts the error the ODE steps have accumulated by then (the paper's analysis of
why Restart beats both ODE and SDE samplers); the main run then goes on from ``s_min`` to 0.

The restart schedule, when not given, is A1111's: below 20 steps none (plain Heun);
from 20 steps, one restart (``K = 1``) of 9 Heun steps; from 36 steps, ``K = 2`` restarts
of ``steps // 4`` each. The restart steps come out of the step budget: the main run has
``steps - K * restart_steps`` steps, so ``steps`` Heun steps are taken in all, ``2 * steps - 1``
network evaluations, as many as `Heun` at ``steps`` steps. ``s_min`` and ``s_max`` are the main
run's noise levels nearest to 0.1 and 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError
from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    BetaSchedule,
    Schedule,
    SigmaTableScheduler,
    karras_sigmas,
    predicted_x0_ve,
    resumed,
    sigma_to_t,
)


class RestartPlan(NamedTuple):
    """The Heun steps of a run, in order: step ``j`` goes from ``sigma[j]`` (model timestep
    ``t[j]``) to ``sigma_next[j]`` (``t_next[j]``). The steps in ``restarts`` begin a restart:
    the sample is taken from the previous step's end up to ``sigma[j]`` with fresh noise first."""

    sigma: torch.Tensor
    sigma_next: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    restarts: frozenset[int]

    def per_evaluation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps, sigmas)`` of every network evaluation, the sigmas closed by the final
        0: each step evaluates at its start, and at its end unless that is 0 (Euler alone)."""
        timesteps: list[torch.Tensor] = []
        sigmas: list[torch.Tensor] = []
        for j in range(len(self.sigma)):
            timesteps.append(self.t[j])
            sigmas.append(self.sigma[j])
            if self.sigma_next[j] > 0:
                timesteps.append(self.t_next[j])
                sigmas.append(self.sigma_next[j])
        sigmas.append(self.sigma_next[-1])
        return torch.stack(timesteps), torch.stack(sigmas)


@register("restart")
@dataclass(frozen=True, kw_only=True)
class Restart(SigmaTableScheduler):
    """Restart sampling: Heun's method with ``restart_times`` restarts in ``[s_min, s_max]``;
    stochastic once it restarts (from 20 steps by default), deterministic Heun below.

    Two network evaluations per Heun step except the last, which lands on ``sigma = 0`` with
    Euler alone: ``2 * steps - 1`` in all, restarts included (they are part of ``steps``).
    `timesteps` and `sigmas` list one entry per evaluation in order, so they jump back up at
    each restart; ``sigmas(steps)[k]`` is where the sample is when evaluation ``k`` starts
    (after a restart's noise). The restart noise is drawn from the run's generator, one
    draw per restart, so a seed gives the same image.

    diffusers has no such class: ``to_config`` writes the name ``LatentkitRestartScheduler``,
    which only latentkit reads back.
    """

    name: ClassVar[str] = "restart"
    diffusers_names: ClassVar[tuple[str, ...]] = ("LatentkitRestartScheduler",)
    evaluations_per_step: ClassVar[int] = 2

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    """Stable Diffusion's schedule by default (there are no diffusers defaults to follow)."""
    schedule: Schedule | None = "karras"
    """The main run's noise levels: Karras by default, A1111's "Automatic" for this sampler
    (``"Automatic"`` gives Karras here too); None reads them off the training table. Restart
    segments always take Karras levels between their ends, as the paper and A1111 do."""
    restart_steps: int | None = None
    """Heun steps from ``s_max`` down to ``s_min`` in each restart; None: A1111's choice, 9
    below 36 steps and ``steps // 4`` from 36."""
    restart_times: int | None = None
    """How many restarts (``K``); 0 is plain Heun. None: A1111's choice, none below 20
    steps, 1 below 36 and 2 from 36."""
    restart_min_sigma: float = 0.1
    """Where restarts begin and end: the main run's noise level nearest to this (``s_min``)."""
    restart_max_sigma: float = 2.0
    """How far up a restart goes: the main run's noise level nearest to this (``s_max``)."""
    s_noise: float = 1.0
    """A factor on the restart noise (A1111's ``s_noise``); 1 is the forward process."""

    def __post_init__(self) -> None:
        # A1111's "Automatic" is the sampler's own schedule, Karras for this one (the base
        # class would take it as None, the table's sigmas).
        if isinstance(self.schedule, str) and "".join(self.schedule.lower().split()) == "automatic":
            object.__setattr__(self, "schedule", "karras")
        super().__post_init__()
        for option, least in (("restart_steps", 1), ("restart_times", 0)):
            value = getattr(self, option)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise InvalidArgumentError(
                    f"{self.name}: {option} must be None or an int >= {least}, got {value!r}"
                )
        for option in ("restart_min_sigma", "restart_max_sigma", "s_noise"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidArgumentError(
                    f"{self.name}: {option} must be a number, got {type(value).__name__}"
                )
        low, high = self.restart_min_sigma, self.restart_max_sigma
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
            raise InvalidArgumentError(
                f"{self.name}: need 0 < restart_min_sigma < restart_max_sigma, got {low} and {high}"
            )
        if not (math.isfinite(self.s_noise) and self.s_noise >= 0):
            raise InvalidArgumentError(f"{self.name}: s_noise must be >= 0, got {self.s_noise}")

    # ---- the schedule

    def restarts(self, steps: int) -> tuple[int, int]:
        """``(restart_steps, restart_times)`` at ``steps`` steps, A1111's choice where unset."""
        times = self.restart_times
        if times is None:
            times = 0 if steps < 20 else 1 if steps < 36 else 2
        size = self.restart_steps
        if size is None:
            size = 9 if steps < 36 else steps // 4
        return size, times

    def timesteps(self, steps: int) -> torch.Tensor:
        """The model timestep of every evaluation, in order (rising again at each restart)."""
        self._check_steps(steps)
        return self._plan(steps).per_evaluation()[0]

    def sigmas(self, steps: int) -> torch.Tensor:
        """The noise level at every evaluation, plus the final 0."""
        self._check_steps(steps)
        return self._plan(steps).per_evaluation()[1]

    def _check_steps(self, steps: int) -> None:
        super()._check_steps(steps)
        self._plan(steps)  # refuses a restart schedule these steps cannot hold

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The main run's levels: the schedule's, for the steps the restarts leave it.
        size, times = self.restarts(steps)
        return super()._schedule(steps - size * times if times else steps)

    def _plan(self, steps: int) -> RestartPlan:
        """The run's Heun steps for a checked ``steps``: the main levels with the restart
        segments inserted after the step that reaches ``s_min``."""
        size, times = self.restarts(steps)
        main = steps - size * times if times else steps
        if main < 2 and times:
            raise InvalidArgumentError(
                f"{self.name}: {times} restart(s) of {size} steps leave {main} of {steps} steps "
                "to the main run, which needs at least 2; use more steps or fewer restart steps"
            )
        timesteps, sigmas = self._schedule(steps)
        starts, ends = list(sigmas[:-1]), list(sigmas[1:])
        t_starts, t_ends = list(timesteps), [*timesteps[1:], timesteps[-1]]
        restarts: set[int] = set()
        if times:
            low, high = self._segment(sigmas[:-1], steps)
            levels, level_t = self._segment_levels(sigmas, timesteps, low, high, size)
            segment = list(zip(levels[:-1], levels[1:], level_t[:-1], level_t[1:], strict=True))
            # After main step low - 1, which lands on s_min: K times s_max -> s_min.
            inserted = segment * times
            for k in range(times):
                restarts.add(low + k * size)
            for seq, at in ((starts, 0), (ends, 1), (t_starts, 2), (t_ends, 3)):
                seq[low:low] = [step[at] for step in inserted]
        return RestartPlan(
            torch.stack(starts),
            torch.stack(ends),
            torch.stack(t_starts),
            torch.stack(t_ends),
            frozenset(restarts),
        )

    def _segment(self, levels: torch.Tensor, steps: int) -> tuple[int, int]:
        # (index of s_min, index of s_max) among the main run's positive levels, the nearest
        # to the options as A1111 picks them (the first of equals). s_min is never the first
        # level (a restart follows a step) nor the final 0, where A1111's choice could land.
        values = levels.double()
        low = 1 + int(torch.argmin((values[1:] - self.restart_min_sigma).abs()))
        high = int(torch.argmin((values - self.restart_max_sigma).abs()))
        if high >= low:
            raise InvalidArgumentError(
                f"{self.name}: at {steps} steps the main run's levels nearest to "
                f"restart_max_sigma={self.restart_max_sigma} and restart_min_sigma="
                f"{self.restart_min_sigma} leave no segment to restart in; use more steps, "
                "set restart_times=0, or move the restart bounds apart"
            )
        return low, high

    def _segment_levels(
        self,
        sigmas: torch.Tensor,
        timesteps: torch.Tensor,
        low: int,
        high: int,
        size: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # size + 1 Karras levels (rho = 7) from s_max down to s_min with their fractional
        # timesteps in the table; the ends are the main levels themselves (and their
        # timesteps), so that a segment ends exactly where the main run continues.
        s_max, s_min = float(sigmas[high]), float(sigmas[low])
        levels = karras_sigmas(s_min, s_max, size + 1)
        positions = sigma_to_t(levels, np.log(self._sigma_table()))
        level32 = torch.from_numpy(levels.astype(np.float32))
        t32 = torch.from_numpy(positions.astype(np.float32))
        level32[0], level32[-1] = sigmas[high], sigmas[low]
        t32[0], t32[-1] = timesteps[high], timesteps[low]
        return list(level32), list(t32)

    # ---- sampling

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        plan = self._plan(steps)
        t_start, t_end = plan.t.to(x.device), plan.t_next.to(x.device)
        count = len(plan.sigma)
        total = 2 * count - 1 - start
        evaluation = 0

        def slope(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Alg. 1, line 4)."""
            output = model(x / ((sigma**2 + 1) ** 0.5), t)
            x0 = predicted_x0_ve(self.prediction_type, output, x, sigma=sigma)
            return (x - x0) / sigma

        # Position 2j is the first evaluation of step j (start is even: see _check_start).
        for j in range(start // 2, count):
            sigma, sigma_next = plan.sigma[j], plan.sigma_next[j]
            dt = sigma_next - sigma
            d = slope(x, sigma, t_start[j])
            x_euler = x + d * dt  # Alg. 1, line 5
            step = SamplerStep(evaluation, total, t_start[j], x_euler)
            # A replaced x_euler only changes where the correction's slope is taken; the
            # correction starts from x, as in `Heun`.
            x_euler = resumed((yield step), x_euler)
            evaluation += 1
            if j == count - 1:
                break  # sigma_next = 0: no correction (Alg. 1, line 6)
            d_next = slope(x_euler, sigma_next, t_end[j])
            x = x + (d + d_next) / 2 * dt  # the trapezoidal rule (Alg. 1, lines 7-8)
            if j + 1 in plan.restarts:
                # The restart forward process from s_min = sigma_next up to s_max: the
                # increment of x0 + sigma * eps, of variance s_max**2 - s_min**2. Added before
                # the yield, so the yielded sample is at the next evaluation's sigma, as
                # `noised` and inpainting's blend expect.
                top = plan.sigma[j + 1]
                fresh = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + fresh * (self.s_noise * (top**2 - sigma_next**2) ** 0.5)
            x = resumed((yield SamplerStep(evaluation, total, t_end[j], x)), x)
            evaluation += 1


__all__ = ["Restart", "RestartPlan"]
