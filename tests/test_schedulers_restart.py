"""Restart sampling (A1111's "Restart"; Xu et al. 2023): proofs that it is what it says.

diffusers has no Restart scheduler, so: (1) with no restarts it is Heun, bit for bit against
latentkit's Heun (itself exact against diffusers) and within 1e-5 of diffusers'
``HeunDiscreteScheduler`` on a tiny UNet; (2) on Gaussian data, whose ideal denoiser is a
closed form, it reproduces the data distribution, and each restart adds exactly
``sqrt(s_max**2 - s_min**2)`` times the generator's next normal draw; (3) it evaluates the
network ``2 * steps - 1`` times, as the restart schedule's formula says; (4) a seed gives the
same samples bit for bit; (5) it runs through ``generate`` and its PNG names it "Restart".
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_schedulers import SD_BETAS, SHAPE, DummyModel, relative_error

import latentkit
from latentkit import schedulers
from latentkit.errors import InvalidArgumentError
from latentkit.noise import randn
from latentkit.results import GenerationParameters
from latentkit.schedulers.common import karras_sigmas, sigma_table, t_to_sigma
from latentkit.schedulers.restart import Restart

SCHEDULES = (None, "karras", "exponential", "sgm_uniform", "align_your_steps")


def run(scheduler: Any, steps: int, *, seed: int = 0, model: Any = None) -> list[Any]:
    generator = torch.Generator().manual_seed(seed)
    noise = randn(SHAPE, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    model = DummyModel() if model is None else model
    return list(scheduler.sample(model, noise, steps=steps, generator=generator))


def a1111_restarts(steps: int) -> tuple[int, int]:
    """(Heun steps per restart, restarts) of A1111's restart_sampler at ``steps`` steps."""
    if steps < 20:
        return 0, 0
    return (9, 1) if steps < 36 else (steps // 4, 2)


# --------------------------------------------------------------------------- (1) Heun


@pytest.mark.parametrize(
    ("schedule", "prediction_type"),
    list(itertools.product(SCHEDULES, ("epsilon", "v_prediction", "sample"))),
)
def test_without_restarts_it_is_heun_bit_for_bit(
    schedule: str | None, prediction_type: str
) -> None:
    opts = {**SD_BETAS, "steps_offset": 1, "schedule": schedule, "prediction_type": prediction_type}
    heun = schedulers.create("heun", **opts)
    restart = schedulers.create("restart", restart_times=0, **opts)
    for steps in (1, 2, 7, 25, 40):
        assert torch.equal(restart.timesteps(steps), heun.timesteps(steps))
        assert torch.equal(restart.sigmas(steps), heun.sigmas(steps))  # type: ignore[attr-defined]
        ours, theirs = run(restart, steps), run(heun, steps)
        assert len(ours) == len(theirs) == 2 * steps - 1
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a.sample, b.sample) and a.timestep == b.timestep
            assert (a.index, a.total) == (b.index, b.total)


def test_below_20_steps_a1111s_default_is_karras_heun() -> None:
    restart = schedulers.create("Restart", **SD_BETAS)
    heun = schedulers.create("heun", **SD_BETAS, use_karras_sigmas=True)
    for steps in (4, 19):
        assert torch.equal(run(restart, steps)[-1].sample, run(heun, steps)[-1].sample)


def test_without_restarts_it_is_diffusers_heun_on_a_tiny_unet() -> None:
    diffusers = pytest.importorskip("diffusers")
    from test_schedulers_classic import run_latentkit, run_reference
    from tiny_models import sd1_unet_kwargs

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**sd1_unet_kwargs()).eval()
    context = torch.randn(SHAPE[0], 7, 32, generator=torch.Generator().manual_seed(5))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=context).sample  # type: ignore[no-any-return]

    base = {**SD_BETAS, "steps_offset": 1}
    for steps, karras in itertools.product((3, 6), (False, True)):
        theirs = run_reference("heun", {**base, "use_karras_sigmas": karras}, steps, model=model)
        schedule = "karras" if karras else None
        ours = run_latentkit(
            "restart", {**base, "schedule": schedule, "restart_times": 0}, steps, model=model
        )
        assert len(ours) == 2 * steps - 1
        assert relative_error(ours[-1].sample, theirs) <= 1e-5, (steps, karras)


# --------------------------------------------------------------------------- (2) Gaussian data

MU, S = 0.5, 1.5
"""Data N(MU, S**2) in every dimension; its ideal denoiser is a closed form."""
SAMPLES = 2**18
MEAN_TOLERANCE = 5 * S / math.sqrt(SAMPLES)
"""Five standard errors of the mean of SAMPLES draws (0.015)."""
VARIANCE_TOLERANCE = 5 * math.sqrt(2 / SAMPLES)
"""Five standard errors of a sample variance, relative (1.4 %)."""
NOISE_TOLERANCE = 1e-9
"""Relative to the noise's scale: the restart noise recomputed (float64) from the recorded
evaluations, against the generator's draws; only rounding separates them."""


class GaussianDenoiser:
    """The ideal epsilon network for data N(MU, S**2), reading sigma off the model timestep as
    a network must (the table interpolated in log sigma). Records the sigma of every
    evaluation, and ``(input, output)`` of those in ``keep``."""

    def __init__(self, scheduler: Any, keep: set[int]) -> None:
        self.log_table = np.log(sigma_table(scheduler.alphas_cumprod).astype(np.float64))
        self.keep = keep
        self.sigmas: list[float] = []
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = float(t_to_sigma(np.array([float(t)]), self.log_table)[0])
        x = x_in * math.sqrt(sigma**2 + 1)  # x0 + sigma * eps
        # D(x; sigma) = E[x0 | x] = (S**2 x + sigma**2 MU) / (S**2 + sigma**2); eps = (x - D) / sigma.
        denoised = (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)
        eps = (x - denoised) / sigma
        if len(self.sigmas) in self.keep:
            self.kept[len(self.sigmas)] = (x_in, eps)
        self.sigmas.append(sigma)
        return eps


def gaussian_run(scheduler: Any, steps: int, seed: int) -> tuple[torch.Tensor, GaussianDenoiser]:
    """The final samples (float64) from the exact marginal at the first level (``resume``:
    no mismatch of the start to wash out), and the denoiser that saw the run, keeping the
    three evaluations around each restart (the step to s_min, the first at s_max)."""
    restarts = scheduler._plan(steps).restarts
    model = GaussianDenoiser(scheduler, {2 * j + k for j in restarts for k in (-2, -1, 0)})
    sigma0 = float(scheduler.sigmas(steps)[0])
    draws = torch.Generator().manual_seed(10_000 + seed)
    z = torch.randn(SAMPLES, generator=draws, dtype=torch.float64)
    start = (MU + math.sqrt(S**2 + sigma0**2) * z).reshape(4, 1, -1, 64)
    generator = torch.Generator().manual_seed(seed)
    *_, last = scheduler.sample(model, start, steps=steps, generator=generator, resume=start)
    return last.sample.flatten(), model


def predicted_variance(scheduler: Any, steps: int) -> float:
    """The output variance of the sampler's own discretisation on this data, in closed form.

    The denoiser is affine, so every step maps ``x - MU`` linearly and keeps the mean:
    ``dx/dsigma = eps = f(sigma) (x - MU)`` with ``f(sigma) = sigma / (S**2 + sigma**2)``, a
    Heun step from ``a`` to ``b`` multiplies it by ``1 + h/2 (f(a) + f(b) (1 + h f(a)))``
    (``h = b - a``; Euler's ``1 + h f(a)`` to 0), and a restart adds ``s_noise**2
    (s_max**2 - s_min**2)`` of independent variance. From the exact ``S**2 + sigma_0**2``.
    """
    plan = scheduler._plan(steps)
    sigma, sigma_next = plan.sigma.double().tolist(), plan.sigma_next.double().tolist()

    def f(level: float) -> float:
        return level / (S**2 + level**2)

    variance = S**2 + sigma[0] ** 2
    for j, (a, b) in enumerate(zip(sigma, sigma_next, strict=True)):
        if j in plan.restarts:
            variance += scheduler.s_noise**2 * (a**2 - sigma_next[j - 1] ** 2)
        h = b - a
        gain = 1 + h * f(a) if b == 0 else 1 + h / 2 * (f(a) + f(b) * (1 + h * f(a)))
        variance *= gain**2
    return variance


CASES = [
    (20, {}),  # A1111's one restart of 9 steps
    (40, {}),  # two of 10
    (80, {}),  # two of 20: the discretisation below the sampling tolerance
    (30, {"restart_steps": 4, "restart_times": 4, "schedule": "exponential"}),
    (24, {"restart_steps": 3, "restart_times": 3, "schedule": "sgm_uniform", "s_noise": 0.5}),
]


@pytest.mark.parametrize(("steps", "opts"), CASES)
def test_gaussian_data_is_reproduced_and_restarts_add_the_forward_noise(
    steps: int, opts: dict[str, Any]
) -> None:
    scheduler = schedulers.create("restart", **SD_BETAS, **opts)
    size, times = scheduler.restarts(steps)  # type: ignore[attr-defined]
    assert times > 0
    sample, model = gaussian_run(scheduler, steps, seed=steps)
    # Every evaluation is at the level the scheduler lists for it (timesteps <-> sigmas).
    sigmas = scheduler.sigmas(steps)
    listed = sigmas[:-1].double()
    assert len(model.sigmas) == len(listed) == 2 * steps - 1
    seen = torch.tensor(model.sigmas, dtype=torch.float64)
    assert float(((seen - listed).abs() / listed).max()) <= 1e-5

    # The output is N(MU, v), v the discretisation's own variance, to sampling accuracy. v is
    # S**2 up to Heun's error (4 % at 20 steps, 0.3 % at 80 on this data and schedule).
    variance = predicted_variance(scheduler, steps)
    assert abs(float(sample.mean()) - MU) <= MEAN_TOLERANCE
    assert abs(float(sample.var()) / variance - 1) <= VARIANCE_TOLERANCE
    if steps == 80:
        # Here Heun's bias (0.3 %) is inside the sampling tolerance: the data's own moments.
        assert abs(float(sample.var()) / S**2 - 1) <= VARIANCE_TOLERANCE

    # Each restart: the sample it starts from minus where the Heun step before it ended is
    # s_noise * sqrt(s_max**2 - s_min**2) times the generator's next normal draw.
    plan = scheduler._plan(steps)  # type: ignore[attr-defined]
    first = min(plan.restarts)
    assert plan.restarts == frozenset(first + k * size for k in range(times))
    generator = torch.Generator().manual_seed(steps)

    def state(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (sigma, x, eps) of evaluation k, x at the sampler's scale x0 + sigma * eps.
        x_in, eps = model.kept[k]
        return sigmas[k], x_in * (sigmas[k] ** 2 + 1) ** 0.5, eps

    for j in sorted(plan.restarts):
        (s_a, x_a, eps_a), (s_b, _, eps_b), (top, x_restart, _) = map(
            state, (2 * j - 2, 2 * j - 1, 2 * j)
        )
        # Heun's step to s_min (dx/dsigma = eps for this network), then the added noise.
        ended = x_a + (eps_a + eps_b) / 2 * (s_b - s_a)
        added = x_restart - ended
        assert (s_b, top) == (plan.sigma_next[j - 1], plan.sigma[j])
        scale = scheduler.s_noise * (top**2 - s_b**2) ** 0.5  # type: ignore[attr-defined]
        draw = torch.randn(added.shape, generator=generator, dtype=torch.float64)
        assert float((added - scale * draw).abs().max()) <= NOISE_TOLERANCE * float(scale)
        # Its variance s_noise**2 (s_max**2 - s_min**2), mean 0, independent of the sample.
        expected = scheduler.s_noise**2 * (float(top) ** 2 - float(s_b) ** 2)  # type: ignore[attr-defined]
        assert abs(float(added.var()) / expected - 1) <= VARIANCE_TOLERANCE
        assert abs(float(added.mean())) <= 5 * math.sqrt(expected / SAMPLES)
        pair = torch.stack([added.flatten(), ended.flatten()])
        assert abs(float(torch.corrcoef(pair)[0, 1])) <= 5 / math.sqrt(SAMPLES)


def test_without_noise_the_generator_does_not_matter() -> None:
    # s_noise scales the restart noise: at 0 the seed no longer changes the result.
    for s_noise, same in ((0.0, True), (1.0, False)):
        scheduler = schedulers.create("restart", **SD_BETAS, s_noise=s_noise)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        ends = [
            list(
                scheduler.sample(
                    DummyModel(), noise, steps=20, generator=torch.Generator().manual_seed(seed)
                )
            )[-1].sample
            for seed in (1, 2)
        ]
        assert torch.equal(*ends) is same


# --------------------------------------------------------------------------- (3) evaluations


@pytest.mark.parametrize("steps", [1, 2, 10, 19, 20, 21, 35, 36, 37, 50, 80])
def test_evaluations_follow_the_formula(steps: int) -> None:
    scheduler = schedulers.create("restart", **SD_BETAS)
    size, times = a1111_restarts(steps)
    chosen_size, chosen_times = scheduler.restarts(steps)  # type: ignore[attr-defined]
    assert chosen_times == times and (times == 0 or chosen_size == size)
    main = steps - size * times
    # Heun: 2 per step but the last; the restarts' steps all end above 0.
    expected = (2 * main - 1) + times * 2 * size
    assert expected == 2 * steps - 1
    model = DummyModel()
    yielded = run(scheduler, steps, model=model)
    assert len(model.timesteps) == len(yielded) == len(scheduler.timesteps(steps)) == expected
    assert [s.index for s in yielded] == list(range(expected))
    assert {s.total for s in yielded} == {expected}
    assert torch.equal(torch.stack(model.timesteps), scheduler.timesteps(steps))
    # The main run's levels: the schedule's for `main` steps.
    assert len(scheduler._schedule(steps)[1]) == main + 1  # type: ignore[attr-defined]


def test_the_restart_segment_is_a1111s() -> None:
    scheduler = schedulers.create("restart", **SD_BETAS)
    main_levels = scheduler._schedule(40)[1][:-1].double()  # type: ignore[attr-defined]
    plan = scheduler._plan(40)  # type: ignore[attr-defined]
    low = int(torch.argmin((main_levels - 0.1).abs()))
    high = int(torch.argmin((main_levels - 2.0).abs()))
    size = 40 // 4
    assert len(main_levels) == 40 - 2 * size
    segment = karras_sigmas(float(main_levels[low]), float(main_levels[high]), size + 1)
    first = low  # the restarts follow main step low - 1
    for k in range(2):
        levels = plan.sigma[first + k * size : first + (k + 1) * size]
        ends = plan.sigma_next[first + k * size : first + (k + 1) * size]
        assert levels.double().numpy() == pytest.approx(segment[:-1], rel=1e-6)
        assert ends.double().numpy() == pytest.approx(segment[1:], rel=1e-6)
    assert plan.restarts == frozenset({first, first + size})
    # The main run goes on from s_min exactly, without noise.
    after = first + 2 * size
    assert plan.sigma[after] == plan.sigma_next[after - 1] == main_levels[low].float()


def test_image_to_image_starts_on_a_step() -> None:
    scheduler = schedulers.create("restart", **SD_BETAS)
    steps = 30
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for strength in (0.2, 0.5, 1.0):
        start = scheduler.start_index(steps, strength)
        assert start == 2 * (steps - int(steps * strength))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
        model = DummyModel()
        run_ = list(
            scheduler.sample(
                model, noise, steps=steps, start=start, init=x0, generator=torch.Generator()
            )
        )
        assert len(run_) == 2 * steps - 1 - start == run_[0].total
        assert torch.equal(torch.stack(model.timesteps), scheduler.timesteps(steps)[start:])


def test_resuming_mid_run_continues_the_run() -> None:
    # A run handed over at a step's start continues exactly (denoising_start's handoff).
    scheduler = schedulers.create("restart", **SD_BETAS)
    steps = 24
    full = run(scheduler, steps, seed=5)
    plan = scheduler._plan(steps)  # type: ignore[attr-defined]
    # Just after the first restart's noise: the generator has made one draw by then.
    j = min(plan.restarts)
    generator = torch.Generator().manual_seed(5)
    randn(SHAPE, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    torch.randn(SHAPE, generator=generator)  # the first restart's draw
    rest = list(
        scheduler.sample(
            DummyModel(),
            full[0].sample,
            steps=steps,
            start=2 * j,
            resume=full[2 * j - 1].sample,
            generator=generator,
        )
    )
    assert torch.equal(rest[-1].sample, full[-1].sample)


# --------------------------------------------------------------------------- (4) seeds


def test_seeded_runs_are_bit_reproducible_and_per_image() -> None:
    scheduler = schedulers.create("restart", **SD_BETAS)
    steps = 36
    first, again = run(scheduler, steps, seed=7), run(scheduler, steps, seed=7)
    assert all(torch.equal(a.sample, b.sample) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[-1].sample, run(scheduler, steps, seed=8)[-1].sample)
    # One generator per image: an image does not depend on its batch.
    gens = [torch.Generator().manual_seed(s) for s in (3, 9)]
    noise = randn(SHAPE, generator=gens, device=torch.device("cpu"), dtype=torch.float32)
    *_, both = scheduler.sample(DummyModel(), noise, steps=steps, generator=gens)
    alone_gen = torch.Generator().manual_seed(3)
    alone_noise = randn(
        (1, *SHAPE[1:]), generator=alone_gen, device=torch.device("cpu"), dtype=torch.float32
    )
    *_, alone = scheduler.sample(DummyModel(), alone_noise, steps=steps, generator=alone_gen)
    assert torch.equal(both.sample[:1], alone.sample)


# --------------------------------------------------------------------------- options


def test_labels_and_options() -> None:
    assert schedulers.create("Restart") == schedulers.create("restart") == Restart()
    assert schedulers.a1111_label(schedulers.create("restart")) == ("Restart", "Karras")
    assert schedulers.aliases("restart") == ["Restart"]
    assert schedulers.create("restart", schedule="Automatic").schedule == "karras"  # type: ignore[attr-defined]
    assert schedulers.from_a1111_label("Restart", "Automatic") == schedulers.create("restart")
    assert schedulers.from_a1111_label("Restart", "SGM Uniform") == Restart(schedule="sgm_uniform")
    assert schedulers.a1111_label(Restart(schedule=None)) == ("Restart", None)
    config = Restart(restart_times=1, restart_steps=3).to_config()
    assert config["_class_name"] == "LatentkitRestartScheduler"
    assert schedulers.from_config(config) == Restart(restart_times=1, restart_steps=3)


@pytest.mark.parametrize(
    "opts",
    [
        {"restart_steps": 0},
        {"restart_steps": 2.5},
        {"restart_times": -1},
        {"restart_times": True},
        {"restart_min_sigma": 2.0, "restart_max_sigma": 1.0},
        {"restart_min_sigma": 0.0},
        {"restart_max_sigma": math.inf},
        {"s_noise": -1.0},
        {"restart_max_sigma": "2"},
    ],
)
def test_bad_options_raise(opts: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        schedulers.create("restart", **opts)


def test_restart_schedules_the_steps_cannot_hold_are_refused_before_sampling() -> None:
    calls: list[Any] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return x

    too_many = schedulers.create("restart", restart_steps=5, restart_times=4)
    with pytest.raises(InvalidArgumentError, match="steps"):
        too_many.sample(model, torch.randn(SHAPE), steps=20)
    narrow = schedulers.create("restart", restart_min_sigma=1.0, restart_max_sigma=1.05)
    with pytest.raises(InvalidArgumentError, match="restart_times=0"):
        narrow.timesteps(20)
    assert not calls


# --------------------------------------------------------------------------- (5) end to end


@pytest.fixture(scope="module")
def shapes() -> Any:
    from latentkit.loading import builtin_model

    found = builtin_model("latentkit/shapes")
    if found is None or not found.is_dir():
        pytest.skip("the built-in shapes model is not in this checkout")
    return latentkit.load_pipeline("latentkit/shapes", device="cpu", progress=False)


def test_generate_names_it_restart_and_the_png_round_trips(shapes: Any, tmp_path: Path) -> None:
    steps = 20
    evaluations: list[int] = []
    forwards: list[int] = []
    hook = shapes.unet.register_forward_hook(lambda *a: forwards.append(1))
    try:
        result = shapes.generate(
            "a red circle",
            scheduler="Restart",
            steps=steps,
            seed=4,
            progress=False,
            callback=lambda step: evaluations.append(step.total),
        )
    finally:
        hook.remove()
    # One UNet call (both guidance branches batched) per evaluation, each reported with the
    # run's total, which is what the progress bar counts to.
    assert len(forwards) == len(evaluations) == 2 * steps - 1
    assert set(evaluations) == {2 * steps - 1}
    params = result.parameters[0]
    assert params.scheduler == "Restart"
    assert "Sampler: Restart," in params.a1111() and "Schedule type: Karras" in params.a1111()
    path = tmp_path / "restart.png"
    result.save(path)
    read = GenerationParameters.from_png(path)
    assert read == params
    options = read.to_options()
    assert options["scheduler"] == schedulers.create("restart")
    again = shapes.generate(**options, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_a_base_to_refiner_handoff_cuts_before_the_restarts(
    sdxl_path: Path, sdxl_refiner_path: Path
) -> None:
    # denoising_end / denoising_start cut at the first evaluation below the cutoff timestep;
    # Restart's timesteps rise again at each restart, so those all go to the refiner.
    base = latentkit.load_pipeline(sdxl_path, device="cpu", progress=False)
    refiner = latentkit.load_pipeline(sdxl_refiner_path, device="cpu", progress=False)
    steps = 20
    timesteps = base.resolve_scheduler("Restart").timesteps(steps)
    cut = int((timesteps < 200).nonzero()[0])  # round(1000 - 0.8 * 1000)
    plan = base.resolve_scheduler("Restart")._plan(steps)  # type: ignore[attr-defined]
    assert cut < 2 * min(plan.restarts)
    seen: dict[str, list[int]] = {"base": [], "refiner": []}
    common = dict(steps=steps, height=32, width=32, seed=11, progress=False, scheduler="Restart")
    handed = base.generate(
        "a red cat",
        denoising_end=0.8,
        output_type="latent",
        callback=lambda step: seen["base"].append(step.total),
        **common,
    )
    refiner.generate(
        "a red cat",
        denoising_start=0.8,
        image=handed.images,
        callback=lambda step: seen["refiner"].append(step.total),
        **common,
    )
    assert len(seen["base"]) == cut
    # The refiner starts on the first evaluation of the step the cut falls in.
    assert len(seen["refiner"]) == len(timesteps) - (cut - cut % 2)
