"""The DPM-Solver family: exponential integrators of the diffusion ODE in log-SNR time.

With ``lambda = log(alpha_t / sigma_t)`` the linear part of the ODE is solved exactly and the
network's estimate is expanded in a Taylor series in ``lambda`` (Lu et al. 2022a, eq. 3.4 and sec. 3.2).
diffusers' ``DPMSolverMultistepScheduler``, one registration per ``algorithm_type``:

- ``dpm-solver``: the noise-prediction form (Lu et al. 2022a, "DPM-Solver"), ``dpmsolver``;
- ``dpm-solver++``: the data-prediction form (Lu et al. 2022b, "DPM-Solver++"), ``dpmsolver++``;
- ``dpm-solver++-sde``: SDE-DPM-Solver++ (Lu et al. 2022b), ``sde-dpmsolver++``, which adds
  fresh Gaussian noise every step.

They share `LogSNRSolver` (the schedule), `DPMSolverBase` (the model estimates) and
`Multistep` (the loop), and differ only in the update of `exponential_step`, which the
single-step solver (`latentkit.schedulers.dpm_solver_singlestep`) reuses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError, UnsupportedModelError
from latentkit.noise import randn
from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    SigmaScheduler,
    dynamic_threshold,
    predicted_eps,
    predicted_x0,
    resumed,
    sigma_to_t,
    spaced_timesteps,
    vp_coefficients,
)
from latentkit.schedulers.custom import CustomKind

Algorithm = Literal["dpmsolver", "dpmsolver++", "sde-dpmsolver++"]
"""What the solver integrates: the noise estimate (DPM-Solver), the data estimate (DPM-Solver++)
or the data estimate of the reverse SDE (SDE-DPM-Solver++)."""

# diffusers loads configs of sibling solvers (DEIS, UniPC) into these classes by mapping
# their algorithm and solver names onto its own; we do the same.
_FOREIGN_ALGORITHMS = {"deis": "dpmsolver++"}
_FOREIGN_SOLVERS = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


# --------------------------------------------------------------------------- log-SNR points


@dataclass(frozen=True)
class Point:
    """A noise level of ``x = alpha * x0 + sigma * eps`` with its log-SNR ``lam = log(alpha / sigma)``."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor


def log_snr_points(sigmas: torch.Tensor) -> list[Point]:
    """The `Point` of every ``sigma = sigma_t / alpha_t`` (0 gives ``lam = inf``)."""
    points = []
    # Scalar by scalar, as diffusers does: a vectorised log may round differently.
    for s in sigmas:
        alpha, sigma = vp_coefficients(s)
        points.append(Point(alpha, sigma, torch.log(alpha) - torch.log(sigma)))
    return points


# --------------------------------------------------------------------------- one step per algorithm

Step = Callable[
    [torch.Tensor, Point, Point, Sequence[torch.Tensor], bool, torch.Tensor | None], torch.Tensor
]
"""``step(x, s, t, d, midpoint, noise)``: see `exponential_step`."""


def _noise_step(
    x: torch.Tensor,
    s: Point,
    t: Point,
    d: Sequence[torch.Tensor],
    midpoint: bool,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DPM-Solver (Lu et al. 2022a): eq. 3.4 with the noise estimate expanded to three Taylor terms."""
    if t.sigma == 0:
        # At sigma_t = 0 (lam = inf) every term below is 0 * inf; their limit is the clean
        # sample the noise estimate at s implies, whatever the order. diffusers refuses
        # final_sigmas_type="zero" for this algorithm instead.
        return (x - s.sigma * d[0]) / s.alpha
    h = t.lam - s.lam
    growth = torch.exp(h) - 1.0  # h * phi_1(h)
    x_t = (t.alpha / s.alpha) * x - (t.sigma * growth) * d[0]  # DPM-Solver-1
    if len(d) > 1:
        if midpoint:
            x_t = x_t - 0.5 * (t.sigma * growth) * d[1]
        else:
            x_t = x_t - (t.sigma * (growth / h - 1.0)) * d[1]  # h * phi_2(h)
    if len(d) > 2:
        x_t = x_t - (t.sigma * ((growth - h) / h**2 - 0.5)) * d[2]  # h * phi_3(h)
    return x_t


def _data_step(
    x: torch.Tensor,
    s: Point,
    t: Point,
    d: Sequence[torch.Tensor],
    midpoint: bool,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022b, sec. 4): the data estimate expanded; ``midpoint`` is their Alg. 2 (2M)."""
    h = t.lam - s.lam
    decay = torch.exp(-h) - 1.0  # -h * phi_1(-h)
    x_t = (t.sigma / s.sigma) * x - (t.alpha * decay) * d[0]  # DPM-Solver++(1), i.e. DDIM
    if len(d) > 1:
        if midpoint:
            x_t = x_t - 0.5 * (t.alpha * decay) * d[1]
        else:
            x_t = x_t + (t.alpha * (decay / h + 1.0)) * d[1]
    if len(d) > 2:
        x_t = x_t - (t.alpha * ((decay + h) / h**2 - 0.5)) * d[2]
    return x_t


def _sde_data_step(
    x: torch.Tensor,
    s: Point,
    t: Point,
    d: Sequence[torch.Tensor],
    midpoint: bool,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """SDE-DPM-Solver++ (Lu et al. 2022b): the same expansion for the reverse SDE.

    The drift decays as ``e^{-2h}`` instead of ``e^{-h}``; the lost variance comes back as
    fresh noise, ``sigma_t * sqrt(1 - e^{-2h}) * z``.
    """
    assert noise is not None
    h = t.lam - s.lam
    kept = 1 - torch.exp(-2.0 * h)  # 1 - e^{-2h}
    x_t = (t.sigma / s.sigma * torch.exp(-h)) * x + (t.alpha * kept) * d[0]
    if len(d) > 1:
        if midpoint:
            x_t = x_t + 0.5 * (t.alpha * kept) * d[1]
        else:
            x_t = x_t + (t.alpha * (kept / (-2.0 * h) + 1.0)) * d[1]
    if len(d) > 2:
        x_t = x_t + (t.alpha * ((kept - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d[2]
    return x_t + t.sigma * torch.sqrt(kept) * noise


STEPS: dict[str, Step] = {
    "dpmsolver": _noise_step,
    "dpmsolver++": _data_step,
    "sde-dpmsolver++": _sde_data_step,
}


def exponential_step(
    algorithm: str,
    x: torch.Tensor,
    s: Point,
    t: Point,
    d: Sequence[torch.Tensor],
    *,
    midpoint: bool,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of ``algorithm`` from ``x`` at ``s`` to ``t``.

    ``d`` holds the estimate at ``s`` and its first and second divided differences in
    ``lam`` (as many as the order); ``midpoint`` weights the first difference as Alg. 2 of
    Lu et al. 2022b does, else with the exact ``phi_2`` weight.
    """
    if t.lam == s.lam:
        # A zero-length step (Karras sigmas ending on a repeated sigma_min) is the identity;
        # diffusers divides 0 by 0 there for some orders.
        return x
    return STEPS[algorithm](x, s, t, d, midpoint, noise)


# --------------------------------------------------------------------------- shared bases


@dataclass(frozen=True, kw_only=True)
class LogSNRSolver(SigmaScheduler):
    """Base of the DPM-Solver and UniPC schedulers: their options and their schedule.

    Timesteps are spaced over ``[0, last]`` (``last`` clipped by log-SNR for DPM-Solver) and
    sigmas read off the training table there, or Karras / exponential sigmas whose timesteps
    are found back in the table.
    """

    solver_order: int = 2
    thresholding: bool = False
    """Dynamic thresholding of the predicted ``x0`` (pixel-space models only)."""
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    lower_order_final: bool = True
    """Lower the order of the last steps (stabler for few steps)."""
    use_flow_sigmas: bool = False
    """Not implemented, accepted only as ``False``."""

    max_order: ClassVar[int | None] = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_order < 1 or (self.max_order and self.solver_order > self.max_order):
            most = f" and {self.max_order}" if self.max_order else ""
            raise InvalidArgumentError(
                f"{self.name}: solver_order must be between 1{most}, got {self.solver_order}"
            )
        if self.use_flow_sigmas:
            raise InvalidArgumentError(f"{self.name}: use_flow_sigmas is not implemented")

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.custom_schedule is not None:
            return self._custom_values(self.custom_schedule, integer=True)
        last = self._last_timestep()
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
        respaced = self._respaced(*self._respaced_ends(table), steps)
        if respaced is not None:
            sigmas = respaced
            spaced = sigma_to_t(sigmas, np.log(table))
            # diffusers rounds Karras timesteps (multistep DPM-Solver: except for the cosine
            # schedule) and never exponential ones; the int64 cast below then truncates.
            # SGM Uniform and Align Your Steps, which diffusers lacks (the only schedules left
            # in ``schedule``: Karras and exponential are stored as the flags), are rounded.
            rounded = self.use_karras_sigmas and self._rounds_karras_timesteps()
            if rounded or self.schedule is not None:
                spaced = np.round(spaced)
        elif self.timestep_spacing == "leading" and steps + 1 > last:
            # The stride last // (steps + 1) is 0: every timestep would be the same.
            raise InvalidArgumentError(
                f"{self.name}: leading spacing cannot fit {steps} distinct timesteps; "
                f"use at most {last - 1} steps or another timestep_spacing"
            )
        timesteps = self._within_training_range(spaced.astype(np.int64))
        return torch.from_numpy(timesteps), self._with_final_sigma(sigmas, table)

    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, *, steps: int, index: int
    ) -> torch.Tensor:
        """``alpha_t * x0 + sigma_t * noise`` at ``sigmas(steps)[index] = sigma_t / alpha_t``
        (diffusers' ``add_noise``)."""
        sigmas = self.sigmas(steps)
        self._check_index(index, len(sigmas) - 1)
        alpha, sigma = vp_coefficients(sigmas[index].to(device=x0.device, dtype=x0.dtype))
        return alpha * x0 + sigma * noise

    def _last_timestep(self) -> int:
        # One past the last timestep the schedule may use.
        return self.num_train_timesteps

    def _rounds_karras_timesteps(self) -> bool:
        return True

    def _respaced_ends(self, table: np.ndarray) -> tuple[float, float]:
        # (sigma_min, sigma_max) of Karras / exponential sigmas.
        return float(table[0]), float(table[-1])


@dataclass(frozen=True, kw_only=True)
class DPMSolverBase(LogSNRSolver):
    """Options and model estimates shared by the multistep and single-step DPM-Solvers."""

    algorithm_type: Algorithm = "dpmsolver++"
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    """Second-order term: ``midpoint`` (Alg. 2 of Lu et al. 2022b) or ``heun`` (the exact ``phi_2`` weight)."""
    lambda_min_clipped: float = -float("inf")
    """Do not sample timesteps whose log-SNR is below this (for cosine schedules)."""
    variance_type: Literal["learned", "learned_range"] | None = None
    """Set for networks that also output a variance (extra channels, dropped here)."""

    custom_values: ClassVar[frozenset[CustomKind]] = frozenset({"timesteps"})

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

    def _last_timestep(self) -> int:
        alphas_cumprod = self._alphas_cumprod()
        if self.rescale_betas_zero_snr:
            alphas_cumprod = alphas_cumprod.clone()
            alphas_cumprod[-1] = 2**-24
        # Sample no timestep whose log-SNR lies below lambda_min_clipped.
        lambdas = torch.log(alphas_cumprod.sqrt()) - torch.log((1 - alphas_cumprod).sqrt())
        return self.num_train_timesteps - int(
            torch.searchsorted(lambdas.flip(0), self.lambda_min_clipped)
        )

    def _estimate(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the algorithm integrates: the data estimate ``x0``, or the noise estimate ``eps``."""
        if self.variance_type is not None:
            output = output[:, : x.shape[1]]  # drop the predicted variance channels
        alpha, sigma_t = vp_coefficients(sigma)
        if self.algorithm_type != "dpmsolver":
            x0 = predicted_x0(self.prediction_type, output, x, alpha=alpha, sigma=sigma_t)
            if self.thresholding:
                x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            return x0
        eps = predicted_eps(self.prediction_type, output, x, alpha=alpha, sigma=sigma_t)
        if self.thresholding:
            # Threshold the x0 the noise estimate implies, and take the noise of that x0.
            x0 = predicted_x0("epsilon", eps, x, alpha=alpha, sigma=sigma_t)
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            eps = predicted_eps("sample", x0, x, alpha=alpha, sigma=sigma_t)
        return eps


# --------------------------------------------------------------------------- multistep


def multistep_differences(
    estimates: Sequence[torch.Tensor], points: Sequence[Point]
) -> list[torch.Tensor]:
    """The estimate at ``points[-2]`` and its backward divided differences in ``lam``.

    ``estimates`` were made at ``points[:-1]`` (newest last); ``points[-1]`` is the target.
    Order 3 combines two first differences into ``D1`` and ``D2`` as the authors' 3M code does.
    """
    m0 = estimates[-1]
    if len(estimates) == 1:
        return [m0]
    h = points[-1].lam - points[-2].lam
    r0 = (points[-2].lam - points[-3].lam) / h
    d1_0 = (1.0 / r0) * (m0 - estimates[-2])
    if len(estimates) == 2:
        return [m0, d1_0]
    r1 = (points[-3].lam - points[-4].lam) / h
    d1_1 = (1.0 / r1) * (estimates[-2] - estimates[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return [m0, d1, d2]


@dataclass(frozen=True, kw_only=True)
class Multistep(DPMSolverBase):
    """Multistep DPM-Solver of order 1-3: each step reuses the estimates of the previous ones,
    so one network evaluation per step. Subclasses fix ``algorithm_type``.
    """

    diffusers_names: ClassVar[tuple[str, ...]] = ("DPMSolverMultistepScheduler",)
    not_carried: ClassVar[tuple[str, ...]] = ("algorithm_type",)
    """The registration's name fixes the algorithm; a model's config never changes it."""

    euler_at_final: bool = False
    """Take the last step with first order whatever the step count."""
    use_lu_lambdas: bool = False
    """Not implemented, accepted only as ``False``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_lu_lambdas:
            raise InvalidArgumentError(f"{self.name}: use_lu_lambdas is not implemented")

    @classmethod
    def matches_config(cls, config: Mapping[str, Any]) -> bool:
        """Whether a ``DPMSolverMultistepScheduler`` config describes this registration."""
        algorithm = config.get("algorithm_type", "dpmsolver++")
        algorithm = _FOREIGN_ALGORITHMS.get(algorithm, algorithm)
        if algorithm not in STEPS:
            raise UnsupportedModelError(
                f"DPMSolverMultistepScheduler with algorithm_type={algorithm!r} is not "
                f"implemented; latentkit has {', '.join(repr(a) for a in STEPS)}"
            )
        return bool(algorithm == cls.algorithm_type)

    def _rounds_karras_timesteps(self) -> bool:
        return self.beta_schedule != "squaredcos_cap_v2"

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps, sigmas = self._schedule(steps)
        points = log_snr_points(sigmas)
        model_timesteps = timesteps.to(x.device)
        total = len(timesteps)
        few = self.lower_order_final and total < 15
        dtype = x.dtype
        estimates: list[torch.Tensor] = []  # newest last
        for i in range(start, total):
            output = model(x, model_timesteps[i])
            estimates = [*estimates, self._estimate(output, x, sigmas[i])][-self.solver_order :]
            order = min(self.solver_order, len(estimates))
            if i == total - 1 and (self.euler_at_final or few or self.final_sigmas_type == "zero"):
                order = 1  # the last step lands on sigma = 0 (lambda = inf) or is lowered
            elif i == total - 2 and few:
                order = min(order, 2)
            z = None
            if self.algorithm_type == "sde-dpmsolver++":
                # Drawn every step, before the update, in float32 (as diffusers does).
                shape, device = estimates[-1].shape, estimates[-1].device
                z = randn(shape, generator=generator, device=device, dtype=torch.float32)
            d = multistep_differences(estimates[-order:], points[i - order + 1 : i + 2])
            # The update runs in float32 whatever the sample dtype, as diffusers does.
            x = exponential_step(
                self.algorithm_type,
                x.float(),
                points[i],
                points[i + 1],
                d,
                midpoint=order == 2 and self.solver_type == "midpoint",
                noise=z,
            ).to(dtype)
            x = resumed((yield SamplerStep(i - start, total - start, model_timesteps[i], x)), x)


@register("dpm-solver")
@dataclass(frozen=True, kw_only=True)
class DPMSolver(Multistep):
    """Multistep DPM-Solver in the noise-prediction form (Lu et al. 2022a; multistep in 2022b).

    diffusers refuses ``final_sigmas_type="zero"`` (its default) for this algorithm; we take
    the limit there, the clean sample the last noise estimate implies.
    """

    name: ClassVar[str] = "dpm-solver"

    algorithm_type: Literal["dpmsolver"] = "dpmsolver"


@register("dpm-solver++")
@dataclass(frozen=True, kw_only=True)
class DPMSolverPlusPlus(Multistep):
    """Multistep DPM-Solver++ of order 1-3 in the data-prediction (``x0``) form (Lu et al. 2022b).

    ``solver_order=2`` is DPM-Solver++(2M), the guided-sampling default.
    """

    name: ClassVar[str] = "dpm-solver++"

    algorithm_type: Literal["dpmsolver++"] = "dpmsolver++"
    """Only ``dpmsolver++`` is registered under this name."""


@register("dpm-solver++-sde")
@dataclass(frozen=True, kw_only=True)
class DPMSolverPlusPlusSDE(Multistep):
    """Multistep SDE-DPM-Solver++ (Lu et al. 2022b): ``solver_order=2`` is A1111's "DPM++ 2M SDE".

    Each step adds fresh noise drawn from ``generator`` (one draw per step, also on the last).
    """

    name: ClassVar[str] = "dpm-solver++-sde"

    algorithm_type: Literal["sde-dpmsolver++"] = "sde-dpmsolver++"


__all__ = [
    "DPMSolver",
    "DPMSolverBase",
    "DPMSolverPlusPlus",
    "DPMSolverPlusPlusSDE",
    "LogSNRSolver",
    "Multistep",
    "Point",
    "exponential_step",
    "log_snr_points",
    "multistep_differences",
]
