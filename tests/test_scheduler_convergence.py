"""Every sampler against a problem whose exact answer is known: Gaussian data.

Data ``x0 ~ N(MU, S**2)`` in every dimension. Under the variance-preserving forward process
``x_t = a_t x0 + s_t eps`` (``a_t = sqrt(alpha_bar_t)``, ``a_t**2 + s_t**2 = 1``) the marginal
is ``N(a_t MU, v_t)`` with ``v_t = a_t**2 S**2 + s_t**2``, and the ideal network has a closed
form: ``E[eps | x_t] = s_t (x_t - a_t MU) / v_t`` and ``E[x0 | x_t] = MU + a_t S**2 (x_t - a_t MU) / v_t``
(``v = a eps - s x0`` follows). The probability-flow ODE maps each marginal onto the next
monotonically, so it preserves the standardised value ``z = (x_t - a_t MU) / sqrt(v_t)``: its
exact solution from the sampler's first noise level to its last is known in closed form.

Deterministic samplers are run from the exact marginal at their first noise level with more
and more steps; the RMS error against the exact solution falls like ``steps ** -order``,
and the log-log slope is the measured order. Stochastic samplers must reproduce the target
distribution's mean and standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from latentkit import schedulers
from latentkit.protocols import Scheduler

MU, S = 0.5, 2.0
"""Data mean and standard deviation (per dimension)."""

# Why this noise schedule. On Stable Diffusion's betas, timesteps evenly spaced in t are far
# from evenly spaced in log-SNR near t = 0 (sigma**2 grows like t there), so the last step's
# log-SNR length shrinks only like log(steps) and that one step dominates the error: no
# solver shows its asymptotic order below hundreds of steps. Here the log-SNR
# lambda = log(a_t / s_t) falls linearly from LAMBDA_MAX at t = 0 to LAMBDA_MIN at t = 999,
# so every spacing that is even in t (linspace, trailing, leading) is even in lambda, the
# variable the ODE is smooth in, and every step shrinks like 1 / steps.
# LAMBDA_MAX = 5 (sigma_min = 0.0067) is as clean as a float32 alpha_bar allows: 1 - alpha_bar
# must stay hundreds of float32 steps away from 1, or neighbouring timesteps get the same
# sigma. A last step from sigma_min down to 0 (Euler, Heun, LMS, DDPM) lands on the posterior
# mean, sigma_min**2 / (2 S) * z = 1e-5 z from the ODE's answer, below every error measured.
# LAMBDA_MIN = -5 (sigma_max = 148) starts where the trajectory is nearly straight, so the
# lower-order warm-up steps of the multistep methods add little error.
LAMBDA_MAX, LAMBDA_MIN = 5.0, -5.0
_LAMBDAS = LAMBDA_MAX + (LAMBDA_MIN - LAMBDA_MAX) * np.arange(1000) / 999
_ALPHA_BAR = 1 / (1 + np.exp(-2 * _LAMBDAS))
LOG_SNR_LINEAR_BETAS: list[float] = (1 - _ALPHA_BAR / np.append(1.0, _ALPHA_BAR[:-1])).tolist()


def make(name: str, **opts: Any) -> Scheduler:
    return schedulers.create(name, trained_betas=LOG_SNR_LINEAR_BETAS, **opts)


def registered(name: str) -> None:
    if name not in schedulers.names():
        pytest.skip(f"{name} not registered yet")


class IdealDenoiser:
    """The exact network output for Gaussian data, at the noise level the scheduler assigns.

    Schedulers with a ``sigmas(steps)`` table (one entry per evaluation, aligned with
    ``timesteps(steps)``) may evaluate at fractional or respaced timesteps; the noise level
    of a timestep is read from that table. Others evaluate at integer training timesteps,
    whose noise level is ``alphas_cumprod[t]``.
    """

    def __init__(self, scheduler: Scheduler, steps: int, *, consistency: bool = False) -> None:
        self.consistency = consistency
        self.prediction_type = scheduler.prediction_type
        alphas_cumprod = scheduler.alphas_cumprod.double()  # type: ignore[attr-defined]
        self.table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.sigma_of: dict[float, float] = {}
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None:
            for t, sigma in zip(
                scheduler.timesteps(steps).tolist(), sigmas(steps).tolist(), strict=False
            ):
                known = self.sigma_of.setdefault(t, sigma)
                assert known == sigma, f"timestep {t} evaluated at two noise levels"

    def sigma(self, t: float) -> float:
        """``s_t / a_t`` at model timestep ``t``."""
        if t in self.sigma_of:
            return self.sigma_of[t]
        assert t == int(t), f"fractional timestep {t} with no sigma table"
        return float(self.table[int(t)])

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(float(t))
        a, s = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        xd = x.double()
        v = a**2 * S**2 + s**2
        eps = s * (xd - a * MU) / v
        x0 = MU + a * S**2 * (xd - a * MU) / v
        if self.consistency:
            # The ideal consistency model: the probability-flow ODE's end point from x_t
            # (Song et al. 2023), here the data value with the same standardised value.
            x0 = MU + S * (xd - a * MU) / math.sqrt(v)
            eps = (xd - a * x0) / s
        outputs = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
        return outputs[self.prediction_type].to(x.dtype)


class _FirstInput(Exception):
    pass


def _raise_first_input(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    raise _FirstInput(x, t)


def first_input_scale(scheduler: Scheduler, steps: int) -> tuple[float, float]:
    """``(c, t0)``: the first model input is ``c * noise``, at model timestep ``t0``.

    Variance-preserving samplers pass the noise through (``c = 1``); the k-diffusion ones
    multiply it by their initial noise sigma and divide the model input by
    ``sqrt(sigma**2 + 1)``.
    """
    try:
        next(scheduler.sample(_raise_first_input, torch.ones(1, 1, 1, 1), steps=steps))
    except _FirstInput as e:
        x, t = e.args
        return float(x.flatten()[0]), float(t)
    raise AssertionError("the sampler never called the model")


def final_sigma(scheduler: Scheduler, steps: int) -> float:
    """The noise level the sample is at after the last step."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        return float(sigmas(steps)[-1])
    if getattr(scheduler, "set_alpha_to_one", True):
        return 0.0
    alpha_bar = float(scheduler.alphas_cumprod[0])  # type: ignore[attr-defined]
    return math.sqrt((1 - alpha_bar) / alpha_bar)


def vp(sigma: float) -> tuple[float, float]:
    return 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)


def run(
    scheduler: Scheduler, steps: int, count: int, seed: int = 0, *, consistency: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(final sample, exact ODE solution, final sigma) from the exact starting marginal."""
    model = IdealDenoiser(scheduler, steps, consistency=consistency)
    c, t0 = first_input_scale(scheduler, steps)
    a0, s0 = vp(model.sigma(t0))
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(count, generator=generator, dtype=torch.float64)
    start = a0 * MU + math.sqrt(a0**2 * S**2 + s0**2) * z  # the model input it will see
    noise = (start / c).float().reshape(1, 1, -1, 64)
    *_, last = scheduler.sample(model, noise, steps=steps, generator=generator)
    sigma_f = final_sigma(scheduler, steps)
    af, sf = vp(sigma_f)
    exact = af * MU + math.sqrt(af**2 * S**2 + sf**2) * z
    sample = last.sample.double().flatten()
    if hasattr(scheduler, "init_noise_sigma"):
        # The k-diffusion samplers keep x at the variance-exploding scale x0 + sigma * eps.
        sample = sample * af
    return sample, exact, sigma_f


def rms_error(scheduler: Scheduler, steps: int) -> float:
    sample, exact, _ = run(scheduler, steps, count=4096)
    return float(((sample - exact) ** 2).mean().sqrt())


def slope(steps: tuple[int, ...], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(steps): the measured order."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


# --------------------------------------------------------------------------- deterministic


@dataclass(frozen=True)
class Order:
    name: str
    order: float
    opts: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[int, ...] = (25, 50, 100, 200)
    """Step counts dividing 1000, so that DDIM's and PNDM's fixed jump of 1000 // steps
    timesteps equals the spacing's stride; the range starts past the pre-asymptotic region."""
    why: str = ""
    tolerance: float = 0.3


ORDERS = [
    Order("ddim", 1, {"clip_sample": False, "set_alpha_to_one": False}),
    Order("euler", 1),
    Order("heun", 2, why="one Euler step plus the trapezoidal correction"),
    # lower_order_final=False: the solver keeps its order up to the end; with
    # final_sigmas_type="sigma_min" it ends on the table's last sigma instead of taking a
    # first-order step to sigma = 0.
    Order("dpm-solver++", 2, {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    Order(
        "dpm-solver++",
        2,
        {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        why=(
            "3M as in diffusers, k-diffusion and the authors' code weights the second divided "
            "difference D2 = h**2 D''/2 by phi_3 = (e^-h - 1 + h) / h**2 - 1/2 where the "
            "Taylor expansion needs 2 * phi_3: the h**3 term is off by half, so the method "
            "is second order (with about 1/3 of 2M's error); see "
            "test_dpm_solver_3m_weight_is_what_limits_its_order"
        ),
    ),
    Order(
        "dpm-solver",
        2,
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
        why="DPM-Solver(2M) in the noise-prediction form",
    ),
    Order(
        "dpm-solver-singlestep",
        2,
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
        why="DPM-Solver++(2S): two evaluations per second-order step",
    ),
    Order(
        "dpm-solver",
        2,
        {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        why="the multistep third-order update has the same half-weight D2 term as 3M",
    ),
    Order(
        "dpm-solver-singlestep",
        3,
        {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        why="DPM-Solver++(3S); its D2 carries the factor 2 the multistep update lacks",
    ),
    Order(
        "unipc",
        2,
        {"solver_order": 1, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        why="UniPC-1 with the UniC corrector: one order above the predictor",
    ),
    Order(
        "unipc",
        3,
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
        why="UniPC-2 (bh2) with the UniC corrector raises the order by one",
    ),
    Order(
        "lms",
        3.5,
        steps=(25, 50, 100),
        tolerance=0.5,
        why=(
            "4th-order Adams-Bashforth in sigma, but its first three steps have lower order "
            "(their start errors are O(h**2)..O(h**4)); between 3 and 4 over 25..100 steps. "
            "In float32, roundoff of the large Lagrange weights spoils it past ~150 steps"
        ),
    ),
    Order(
        "pndm",
        2,
        {"skip_prk_steps": True, "set_alpha_to_one": False},
        why=(
            "PLMS combines noise predictions with the 4th-order Adams-Bashforth weights of "
            "steps even in t, but applies them through DDIM's transfer, an integral over "
            "sigma_t / a_t, which is not even in t: second order"
        ),
    ),
]


@pytest.mark.parametrize("case", ORDERS, ids=lambda c: f"{c.name}-{dict(c.opts)}")
def test_deterministic_sampler_converges_at_its_order(case: Order) -> None:
    registered(case.name)
    accepted = set(schedulers.options(case.name))
    opts = {k: v for k, v in case.opts.items() if k in accepted}
    scheduler = make(case.name, **opts)
    errors = [rms_error(scheduler, n) for n in case.steps]
    measured = slope(case.steps, errors)
    report = ", ".join(f"{n}: {e:.2e}" for n, e in zip(case.steps, errors, strict=True))
    assert abs(measured - case.order) <= case.tolerance, (
        f"{case.name} {opts}: measured order {measured:.2f}, expected {case.order} "
        f"({case.why or 'its textbook order'}); RMS errors by steps {report}"
    )


def test_dpm_solver_3m_weight_is_what_limits_its_order() -> None:
    """The harness sees third order when the 3M formula has it.

    A float64 DPM-Solver++(3M) in log-SNR time on the same problem: with diffusers'
    ``phi_3`` weight it matches latentkit's 3M and is second order; with the weight doubled
    it is third order.
    """
    alphas_cumprod = make("ddim").alphas_cumprod.double()  # type: ignore[attr-defined]

    def solve(steps: int, weight: float) -> float:
        # linspace timesteps as dpm-solver++ takes them, ending on sigma_min (t = 0).
        ts = np.round(np.linspace(0, 999, steps + 1)[::-1]).astype(int)
        a = alphas_cumprod[ts].sqrt()
        s = (1 - alphas_cumprod[ts]).sqrt()
        lam = (a / s).log()
        z = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = a[0] * MU + (a[0] ** 2 * S**2 + s[0] ** 2).sqrt() * z
        x0s: list[torch.Tensor] = []
        for i in range(steps):
            x0s = [*x0s, MU + a[i] * S**2 * (x - a[i] * MU) / (a[i] ** 2 * S**2 + s[i] ** 2)]
            h = lam[i + 1] - lam[i]
            phi1 = torch.expm1(-h)
            x = s[i + 1] / s[i] * x - a[i + 1] * phi1 * x0s[-1]
            if i >= 1:
                r0 = (lam[i] - lam[i - 1]) / h
                d1_0 = (x0s[-1] - x0s[-2]) / r0
                d1, d2 = d1_0, torch.zeros_like(x)
                if i >= 2:
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    d1_1 = (x0s[-2] - x0s[-3]) / r1
                    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x = x + a[i + 1] * (phi1 / h + 1) * d1
                    x = x - weight * a[i + 1] * ((phi1 + h) / h**2 - 0.5) * d2
                else:  # the second step is DPM-Solver++(2M)'s (midpoint)
                    x = x - 0.5 * a[i + 1] * phi1 * d1
        exact = a[-1] * MU + (a[-1] ** 2 * S**2 + s[-1] ** 2).sqrt() * z
        return float(((x - exact) ** 2).mean().sqrt())

    steps = (25, 50, 100, 200)
    as_diffusers = [solve(n, 1.0) for n in steps]
    textbook = [solve(n, 2.0) for n in steps]
    ours = make(
        "dpm-solver++", solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"
    )
    for n, reference in zip(steps, as_diffusers, strict=True):
        assert rms_error(ours, n) == pytest.approx(reference, rel=0.05)
    assert abs(slope(steps, as_diffusers) - 2) <= 0.3
    assert slope(steps, textbook) >= 2.7


# --------------------------------------------------------------------------- stochastic


@dataclass(frozen=True)
class Moments:
    name: str
    steps: int
    opts: Mapping[str, Any] = field(default_factory=dict)
    consistency: bool = False
    """Drive it with the ideal consistency model instead of the ideal denoiser."""


# Ancestral samplers fed the posterior mean of x0 lose that posterior's variance at every
# step: their std falls short by about 5 % at 100 steps and 0.5 % at 1000 (weak order 1), so
# they get 500 steps (1 % short) for the 2 % tolerance. LCM is built for a consistency model, whose
# output is the ODE's end point, not the posterior mean (with the ideal denoiser its std is
# 58 % short at 4 steps); with the ideal consistency model it is exact at any step count.
MOMENTS = [
    Moments("ddpm", 500, {"clip_sample": False}),
    Moments("ddim", 500, {"eta": 1.0, "clip_sample": False}),
    Moments("euler-ancestral", 500),
    Moments("dpm-solver++-sde", 100),
    Moments("restart", 100),  # two restarts of 25 Heun steps (A1111's schedule)
    Moments("lcm", 4, consistency=True),
    Moments("lcm", 1, consistency=True),
]
SAMPLES = 2**15
MEAN_TOLERANCE = 0.02 * S  # 3.6 standard errors of the mean of 2**15 samples
STD_TOLERANCE = 0.02  # relative; 5 standard errors


@pytest.mark.parametrize("case", MOMENTS, ids=lambda c: f"{c.name}-{c.steps}")
def test_stochastic_sampler_reproduces_the_data_distribution(case: Moments) -> None:
    registered(case.name)
    accepted = set(schedulers.options(case.name))
    scheduler = make(case.name, **{k: v for k, v in case.opts.items() if k in accepted})
    sample, _, sigma_f = run(
        scheduler, case.steps, count=SAMPLES, seed=1, consistency=case.consistency
    )
    af, sf = vp(sigma_f)
    mean, std = af * MU, math.sqrt(af**2 * S**2 + sf**2)
    assert torch.isfinite(sample).all()
    mean_error, std_error = float(sample.mean()) - mean, float(sample.std()) / std - 1
    assert abs(mean_error) <= MEAN_TOLERANCE and abs(std_error) <= STD_TOLERANCE, (
        f"{case.name} at {case.steps} steps: mean off by {mean_error:+.4f}, "
        f"std off by {100 * std_error:+.2f} %"
    )
