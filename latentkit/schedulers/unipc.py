"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), diffusers'
``UniPCMultistepScheduler``.

Each step predicts with UniP-p (a multistep exponential integrator, like DPM-Solver) and, once
the network has seen the predicted sample, corrects that sample with UniC-p, which reuses
this very evaluation: order ``p + 1`` at no extra network cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from latentkit.protocols import Denoiser, Generators, SamplerRun, SamplerStep
from latentkit.schedulers import register
from latentkit.schedulers.common import (
    dynamic_threshold,
    predicted_eps,
    predicted_x0,
    resumed,
    vp_coefficients,
)
from latentkit.schedulers.dpm_solver import LogSNRSolver, Point, log_snr_points

# diffusers maps the solver names of DPM-Solver and DEIS configs onto bh2; we do the same.
_FOREIGN_SOLVERS = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


@register("unipc")
@dataclass(frozen=True, kw_only=True)
class UniPC(LogSNRSolver):
    """Multistep UniPC of any order (2 or 3 recommended), in data (``predict_x0``) or noise form."""

    name: ClassVar[str] = "unipc"
    diffusers_names: ClassVar[tuple[str, ...]] = ("UniPCMultistepScheduler",)
    max_order: ClassVar[int | None] = None

    predict_x0: bool = True
    """Integrate the data estimate (UniPC with DPM-Solver++'s form) or the noise estimate.
    Dynamic thresholding applies to the data form only (as in diffusers)."""
    solver_type: Literal["bh1", "bh2"] = "bh2"
    """``B(h)`` of the update: ``bh1`` is ``h``, ``bh2`` is ``e^h - 1`` (Zhao et al. 2023, sec. 3)."""
    disable_corrector: Sequence[int] = ()
    """Step indices whose sample is not corrected (the corrector can hurt at large guidance)."""
    sigma_min: float | None = None
    """Lower end of Karras/exponential sigmas; default: the table's smallest."""
    sigma_max: float | None = None
    """Upper end of Karras/exponential sigmas; default: the table's largest."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "solver_type", _FOREIGN_SOLVERS.get(self.solver_type, self.solver_type)
        )
        # A tuple keeps the object hashable.
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))
        super().__post_init__()

    def _respaced_ends(self, table: np.ndarray) -> tuple[float, float]:
        low, high = super()._respaced_ends(table)
        return (
            low if self.sigma_min is None else self.sigma_min,
            high if self.sigma_max is None else self.sigma_max,
        )

    def _with_final_sigma(self, sigmas: np.ndarray, table: np.ndarray) -> torch.Tensor:
        if self.final_sigmas_type == "sigma_min" and (
            self.use_karras_sigmas or self.use_exponential_sigmas
        ):
            # diffusers ends Karras / exponential sigmas on their own last value.
            return torch.from_numpy(np.append(sigmas, sigmas[-1]).astype(np.float32))
        return super()._with_final_sigma(sigmas, table)

    def _sample(
        self, model: Denoiser, x: torch.Tensor, steps: int, generator: Generators, start: int
    ) -> SamplerRun:
        timesteps, sigmas = self._schedule(steps)
        points = log_snr_points(sigmas)
        model_timesteps = timesteps.to(x.device)
        total = len(timesteps)
        last = x  # the sample the last prediction started from
        estimates: list[torch.Tensor] = []  # newest last
        order = 0  # of the last prediction
        for i in range(start, total):
            output = model(x, model_timesteps[i])
            m = self._estimate(output, x, sigmas[i])
            if i > start and i - 1 not in self.disable_corrector:
                # UniC: redo the last step with the estimate just made at its end.
                x = self._update(last, estimates[-order:], points[i - order : i + 1], new=m)
            estimates = [*estimates, m][-self.solver_order :]
            order = min(self.solver_order, len(estimates))
            if self.lower_order_final:
                order = min(order, total - i)
            if sigmas[i + 1] == 0:
                # lambda = inf at sigma = 0 makes every r_k = 0: only first order is finite
                # there (as DPM-Solver lowers it; diffusers returns NaN for higher orders).
                order = 1
            last = x
            x = self._update(x, estimates[-order:], points[i - order + 1 : i + 2])
            x = resumed((yield SamplerStep(i - start, total - start, model_timesteps[i], x)), x)

    def _estimate(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha, sigma_t = vp_coefficients(sigma)
        if not self.predict_x0:
            return predicted_eps(self.prediction_type, output, x, alpha=alpha, sigma=sigma_t)
        x0 = predicted_x0(self.prediction_type, output, x, alpha=alpha, sigma=sigma_t)
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        return x0

    def _update(
        self,
        x: torch.Tensor,
        estimates: Sequence[torch.Tensor],
        points: Sequence[Point],
        new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UniP-p (``new`` is None) or UniC-p (``new``: the estimate at the target) from
        ``points[-2]`` to ``points[-1]``, ``p = len(estimates)``.

        ``estimates`` were made at ``points[:-1]``, newest last.
        """
        s, t = points[-2], points[-1]
        m0, order = estimates[-1], len(estimates)
        if not self.predict_x0 and t.sigma == 0:
            # In the noise form every term is 0 * inf at sigma_t = 0; their limit is the clean
            # sample the noise estimate at s implies (diffusers returns NaN).
            return (x - s.sigma * m0) / s.alpha
        if t.lam == s.lam:
            # A zero-length step (Karras sigmas ending on a repeated sigma_min) is the
            # identity; diffusers divides 0 by 0 there.
            return x
        h = t.lam - s.lam
        # Earlier points relative to s, r_k = (lam_{s_k} - lam_s) / h, and the differences
        # D_k = (m_k - m0) / r_k.
        rks, ds = [], []
        for k in range(1, order):
            rk = (points[-2 - k].lam - s.lam) / h
            rks.append(rk)
            ds.append((estimates[-1 - k] - m0) / rk)
        rks.append(torch.ones(()))
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h * phi_1(hh) = e^hh - 1
        b_h = hh if self.solver_type == "bh1" else torch.expm1(hh)
        # The right-hand side g_k = k! * h * phi_{k+1}(hh) / B(h), from the recursion
        # phi_{k+1}(h) = (phi_k(h) - 1 / k!) / h.
        g = []
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        for k in range(1, order + 1):
            g.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rk_powers = torch.stack([torch.pow(torch.stack(rks), k) for k in range(order)])
        rhs = torch.stack(g)
        scale, weight = (
            (t.sigma / s.sigma, t.alpha) if self.predict_x0 else (t.alpha / s.alpha, t.sigma)
        )
        x_t = scale * x - weight * h_phi_1 * m0
        if new is None:
            if order == 1:
                # Without the B(h) term diffusers multiplies by 0 here, which is NaN for
                # bh1 at sigma = 0 (B(h) = h = -inf); the term is 0 in the limit.
                return x_t
            # UniP-2 uses rho = 1/2 directly; higher orders solve R rho = g without the new point.
            rhos = (
                torch.ones(1, dtype=x.dtype) * 0.5
                if order == 2
                else torch.linalg.solve(rk_powers[:-1, :-1], rhs[:-1]).to(x.dtype)
            )
            return x_t - weight * b_h * _combine(rhos.to(x.device), ds)
        rhos = (
            torch.ones(1, dtype=x.dtype) * 0.5
            if order == 1
            else torch.linalg.solve(rk_powers, rhs).to(x.dtype)
        ).to(x.device)
        correction = rhos[-1] * (new - m0)
        if ds:
            correction = _combine(rhos[:-1], ds) + correction
        return x_t - weight * b_h * correction


def _combine(rhos: torch.Tensor, ds: Sequence[torch.Tensor]) -> torch.Tensor:
    # sum_k rho_k * D_k, contracted as diffusers does (so that float rounding agrees).
    return torch.einsum("k,bk...->b...", rhos, torch.stack(list(ds), dim=1))


__all__ = ["UniPC"]
