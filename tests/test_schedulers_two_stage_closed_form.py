"""The two-evaluation samplers against closed forms, and DPM++ 2S a against its equations.

``dpm-solver++-2s-ancestral`` (A1111's "DPM++ 2S a", k-diffusion's
``sample_dpmpp_2s_ancestral``) has no diffusers counterpart, so it is proved here three ways:

- against a float64 transcription of its equations (DPM-Solver++(2S), Lu et al. 2022b,
  Alg. 1 with ``r = 1/2``, on the variance-exploding ODE, plus the ancestral split of
  ``sigma_next``), run on the same noise draws with the exact denoiser for Gaussian data;
- deterministic (``eta = 0``) it converges to the exact probability-flow ODE solution at
  second order, like ``dpm2`` (the harness of ``test_scheduler_convergence``);
- stochastic (``eta = 1``) it reproduces the data distribution's mean and standard
  deviation, as do ``dpm2-ancestral`` and ``dpm-solver++-2s-sde``.

A one-off comparison with k-diffusion's own ``sample_dpmpp_2s_ancestral`` (k-diffusion
0.1.1.post1, not a test dependency: its package imports torchvision) on the dummy model of
``test_schedulers``, same sigmas and noise, 1 to 25 steps, three predictions, eta 0, 0.5 and 1,
table, Karras and SGM Uniform sigmas: relative differences of at most 1e-6 for epsilon and
v prediction and 7.5e-6 for sample prediction (float32 operation order), except 2 steps at
eta = 1 (7e-4 to 8e-4), where k-diffusion's ``sigma_down = sqrt(sigma_next**2 -
sigma_up**2)`` loses about 1 % to float32 cancellation and latentkit computes it without
(see `latentkit.schedulers.two_stage.ancestral_split`); against the float64 equations the
largest difference measured is 5.8e-7.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from typing import Any

import pytest
import test_scheduler_convergence
import torch
from test_scheduler_convergence import (
    MEAN_TOLERANCE,
    MU,
    SAMPLES,
    STD_TOLERANCE,
    IdealDenoiser,
    S,
    make,
    rms_error,
    run,
    slope,
    vp,
)
from test_schedulers import SD_BETAS, SHAPE, DummyModel

from latentkit import schedulers
from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Scheduler

NAME = "dpm-solver++-2s-ancestral"
needs_torchsde = pytest.mark.skipif(
    importlib.util.find_spec("torchsde") is None, reason="needs torchsde: latentkit[sde]"
)


# --------------------------------------------------------------------------- the equations


def gaussian_x0(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x0 + sigma * eps = x] for x0 ~ N(MU, S**2): the exact denoiser."""
    return MU + S**2 * (x - MU) / (S**2 + sigma**2)


def transcribed(
    sigmas: list[float], noise: torch.Tensor, generator: torch.Generator, eta: float
) -> torch.Tensor:
    """DPM++ 2S a from its equations, in float64, with the exact denoiser.

    Step i splits ``sigma_next`` into ``sigma_up = min(sigma_next, eta * sigma_next *
    sqrt(1 - sigma_next**2 / sigma**2))`` and ``sigma_down = sqrt(sigma_next**2 -
    sigma_up**2)``; DPM-Solver++(1) on ``x = x0 + sigma * eps`` moves ``x`` from ``sigma``
    to ``sigma'`` as ``(sigma' / sigma) x + (1 - sigma' / sigma) D(x)``; the step goes to
    ``m = sqrt(sigma * sigma_down)`` with ``D`` at ``sigma``, then from ``sigma`` to
    ``sigma_down`` with ``D`` at ``m``, and adds ``sigma_up`` times fresh noise. The last
    step (``sigma_next = 0``) returns ``D`` at ``sigma``.
    """
    x = noise * sigmas[0]
    for sigma, sigma_next in itertools.pairwise(sigmas):
        x0 = gaussian_x0(x, sigma)
        if sigma_next == 0:
            return x0
        up = min(sigma_next, eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2))
        down = math.sqrt(sigma_next**2 - up**2)
        mid = math.sqrt(sigma * down)
        u = (mid / sigma) * x + (1 - mid / sigma) * x0
        x = (down / sigma) * x + (1 - down / sigma) * gaussian_x0(u, mid)
        x = x + up * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    raise AssertionError("the schedule does not end at 0")


class ExactModel:
    """The exact network output for Gaussian data at the noise level of each evaluation in
    turn (the scheduler's per-evaluation ``sigmas``), for a given prediction type."""

    def __init__(self, scheduler: Scheduler, steps: int) -> None:
        self.levels = iter(scheduler.sigmas(steps)[:-1].tolist())  # type: ignore[attr-defined]
        self.prediction_type = scheduler.prediction_type

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = next(self.levels)
        x = x_in * math.sqrt(sigma**2 + 1)  # the network sees x / sqrt(sigma**2 + 1)
        x0 = gaussian_x0(x, sigma)
        eps = (x - x0) / sigma
        a, s = 1 / math.sqrt(sigma**2 + 1), sigma / math.sqrt(sigma**2 + 1)
        outputs = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
        return outputs[self.prediction_type]


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", [None, "karras"])
def test_2s_ancestral_follows_its_equations(
    eta: float, prediction_type: str, schedule: str | None
) -> None:
    scheduler = schedulers.create(
        NAME, **SD_BETAS, eta=eta, prediction_type=prediction_type, schedule=schedule
    )
    for steps in (1, 2, 5, 20):
        generator = torch.Generator().manual_seed(steps)
        noise = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        ours = list(
            scheduler.sample(ExactModel(scheduler, steps), noise, steps=steps, generator=generator)
        )
        assert len(ours) == 2 * steps - 1
        generator = torch.Generator().manual_seed(steps)
        noise = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        sigmas = scheduler._schedule(steps)[1].tolist()  # type: ignore[attr-defined]
        expected = transcribed(sigmas, noise, generator, eta)
        error = float((ours[-1].sample - expected).abs().max() / expected.abs().max())
        # The schedule's sigmas and midpoints are float32 in both; only the float32
        # midpoint the sampler evaluates at (exp(-t_mid)) differs from sqrt(sigma * down).
        assert error <= 1e-6, (steps, error)


def test_2s_ancestral_draws_once_per_step_but_the_last() -> None:
    scheduler = schedulers.create(NAME, **SD_BETAS)
    generator = torch.Generator().manual_seed(0)
    list(
        scheduler.sample(
            DummyModel(), torch.randn(SHAPE, generator=generator), steps=6, generator=generator
        )
    )
    expected = torch.Generator().manual_seed(0)
    for _ in range(1 + 5):  # the starting noise, then one draw per step but the last
        torch.randn(SHAPE, generator=expected)
    assert torch.equal(generator.get_state(), expected.get_state())


def test_2s_ancestral_per_image_generators_and_eta_zero() -> None:
    scheduler = schedulers.create(NAME, **SD_BETAS)

    def final(seeds: list[int], sched: Scheduler = scheduler) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
        *_, last = sched.sample(DummyModel(), noise, steps=8, generator=generators)
        return last.sample

    pair = final([3, 7])
    assert torch.equal(final([7])[0], pair[1])  # an image does not depend on its batch
    assert not torch.equal(final([4, 7])[0], pair[0])  # the noise matters
    # eta = 0 adds no noise: the same start gives the same result whatever the generator.
    deterministic = schedulers.create(NAME, **SD_BETAS, eta=0.0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    runs = [
        list(
            deterministic.sample(
                DummyModel(), noise, steps=8, generator=torch.Generator().manual_seed(s)
            )
        )[-1].sample
        for s in (5, 6)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_2s_ancestral_refuses_eta_outside_0_1(eta: float) -> None:
    with pytest.raises(InvalidArgumentError, match="eta"):
        schedulers.create(NAME, eta=eta)


def test_2s_ancestral_config_round_trip() -> None:
    scheduler = schedulers.create(NAME, **SD_BETAS, eta=0.5, schedule="karras")
    config = scheduler.to_config()
    assert config["_class_name"] == "LatentkitDPMSolverPlusPlus2SAncestralScheduler"
    assert config["schedule"] == "karras"
    assert schedulers.from_config(config) == scheduler


# --------------------------------------------------------------------------- Gaussian data


class _LevelsByEvaluation(IdealDenoiser):
    """`IdealDenoiser`, allowing a timestep listed twice at levels equal up to float32: an
    ancestral midpoint ``sqrt(sigma * sigma_down)`` is ``sigma_next`` itself when
    ``eta = 1``, computed another way."""

    def __init__(self, scheduler: Scheduler, steps: int, *, consistency: bool = False) -> None:
        self.consistency = consistency
        self.prediction_type = scheduler.prediction_type
        alphas_cumprod = scheduler.alphas_cumprod.double()  # type: ignore[attr-defined]
        self.table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.sigma_of: dict[float, float] = {}
        levels = scheduler.sigmas(steps).tolist()  # type: ignore[attr-defined]
        for t, sigma in zip(scheduler.timesteps(steps).tolist(), levels, strict=False):
            known = self.sigma_of.setdefault(t, sigma)
            assert math.isclose(known, sigma, rel_tol=1e-5), f"timestep {t} at two levels"


@pytest.fixture
def ideal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_scheduler_convergence, "IdealDenoiser", _LevelsByEvaluation)


ORDERS: list[tuple[str, dict[str, Any]]] = [
    ("dpm2", {}),
    (NAME, {"eta": 0.0}),  # DPM-Solver++(2S)
]


@pytest.mark.usefixtures("ideal")
@pytest.mark.parametrize(("name", "opts"), ORDERS, ids=str)
def test_deterministic_two_stage_sampler_is_second_order(name: str, opts: dict[str, Any]) -> None:
    # Measured: dpm2 2.08 (RMS errors 2.3e-2, 5.4e-3, 1.3e-3, 3.1e-4 at 25, 50, 100, 200
    # steps), DPM-Solver++(2S) 1.98 (2.0e-2, 5.0e-3, 1.3e-3, 3.2e-4).
    steps = (25, 50, 100, 200)
    errors = [rms_error(make(name, **opts), n) for n in steps]
    assert abs(slope(steps, errors) - 2) <= 0.3, errors


MOMENTS: list[Any] = [
    ("dpm2-ancestral", {}),
    (NAME, {}),
    pytest.param("dpm-solver++-2s-sde", {}, marks=needs_torchsde),
]


@pytest.mark.usefixtures("ideal")
@pytest.mark.parametrize(("name", "opts"), MOMENTS, ids=str)
def test_stochastic_two_stage_sampler_reproduces_the_data_distribution(
    name: str, opts: dict[str, Any]
) -> None:
    # 100 steps; tolerances as for the other stochastic samplers (test_scheduler_convergence).
    sample, _, sigma_f = run(make(name, **opts), 100, count=SAMPLES, seed=1)
    af, sf = vp(sigma_f)
    mean, std = af * MU, math.sqrt(af**2 * S**2 + sf**2)
    assert torch.isfinite(sample).all()
    mean_error, std_error = float(sample.mean()) - mean, float(sample.std()) / std - 1
    assert abs(mean_error) <= MEAN_TOLERANCE and abs(std_error) <= STD_TOLERANCE, (
        f"{name}: mean off by {mean_error:+.4f}, std off by {100 * std_error:+.2f} %"
    )
