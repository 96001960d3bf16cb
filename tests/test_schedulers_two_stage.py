"""dpm2, dpm2-ancestral and dpm-solver++-2s-sde against diffusers on identical inputs.

Driven as in ``test_schedulers`` / ``test_schedulers_img2img``: diffusers' scheduler as
``StableDiffusionPipeline`` (or the img2img / 4-channel inpaint pipeline) drives it, ours
through ``sample``, with the same seeded CPU generators, over the deterministic dummy model
and over a tiny random UNet. ``KDPM2DiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler``
and ``DPMSolverSDEScheduler`` have ``order = 2``: ``2 * steps - 1`` evaluations.
``DPMSolverSDEScheduler`` needs torchsde, and both sides get the same Brownian-tree seed.
(``dpm-solver++-2s-ancestral`` has no diffusers counterpart: see
``test_schedulers_two_stage_closed_form``.)
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from test_schedulers import SD15_PNDM_CONFIG, SD_BETAS, SHAPE, DummyModel, relative_error
from test_schedulers_classic import unets  # noqa: F401  (the module-scoped tiny UNet fixture)
from test_schedulers_img2img import MASK, X0, MixingModel, get_timesteps_start

from latentkit import schedulers
from latentkit.errors import InvalidArgumentError, MissingDependencyError
from latentkit.noise import randn
from latentkit.protocols import Scheduler

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DPMSolverSDEScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

REFERENCE: dict[str, type[Any]] = {
    "dpm2": KDPM2DiscreteScheduler,
    "dpm2-ancestral": KDPM2AncestralDiscreteScheduler,
    "dpm-solver++-2s-sde": DPMSolverSDEScheduler,
}
SDE = "dpm-solver++-2s-sde"
needs_torchsde = pytest.mark.skipif(
    importlib.util.find_spec("torchsde") is None,
    reason="the SDE (and diffusers' DPMSolverSDEScheduler) needs torchsde: latentkit[sde]",
)
NAMES = [pytest.param(n, marks=needs_torchsde) if n == SDE else n for n in sorted(REFERENCE)]
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")  # diffusers: "sample" not implemented
RESPACINGS: tuple[dict[str, Any], ...] = (
    {},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
)
SAMPLE_STEPS = (1, 2, 3, 10)
SEED = {"noise_sampler_seed": 1234}
"""The SDE's Brownian tree seed, given to both sides (diffusers' default is a random one)."""
TOLERANCE = 1e-5
"""Relative error of the final sample, as every scheduler test here; measured: 0.0 (bit-exact)."""

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def options(name: str, **opts: Any) -> dict[str, Any]:
    return {**SEED, **opts} if name == "dpm-solver++-2s-sde" else opts


@functools.lru_cache(maxsize=8)
def _reference(name: str, frozen: str) -> Any:
    # Building one costs half a second (it sets 1000 timesteps, one sigma at a time).
    return REFERENCE[name](**json.loads(frozen))


def reference(name: str, opts: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler of ``opts`` (a copy of a cached one)."""
    return copy.deepcopy(_reference(name, json.dumps(opts, sort_keys=True)))


def _generator(seeds: int | list[int]) -> torch.Generator | list[torch.Generator]:
    if isinstance(seeds, int):
        return torch.Generator().manual_seed(seeds)
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_reference(
    name: str,
    opts: dict[str, Any],
    steps: int,
    *,
    model: Model,
    seeds: int | list[int] = 0,
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, ...] = SHAPE,
) -> torch.Tensor:
    """diffusers' scheduler driven as StableDiffusionPipeline drives it."""
    scheduler = reference(name, opts)
    scheduler.set_timesteps(steps)
    generator = _generator(seeds)
    latents = randn_tensor(shape, generator=generator, dtype=dtype) * scheduler.init_noise_sigma
    extra: dict[str, Any] = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = generator
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(output, t, latents, **extra, return_dict=False)[0]
    return latents


def run_latentkit(
    name: str,
    opts: dict[str, Any],
    steps: int,
    *,
    model: Model,
    seeds: int | list[int] = 0,
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, ...] = SHAPE,
) -> list[Any]:
    generator = _generator(seeds)
    noise = randn(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
    scheduler = schedulers.create(name, **opts)
    return list(scheduler.sample(model, noise, steps=steps, generator=generator))


def grid() -> Iterator[Any]:
    """(name, options) pairs: every spacing, prediction and sigma respacing on SD's betas."""
    for name, spacing, prediction, respacing in itertools.product(
        sorted(REFERENCE), SPACINGS, PREDICTIONS, RESPACINGS
    ):
        opts = {"timestep_spacing": spacing, "prediction_type": prediction, **respacing}
        yield case(name, options(name, **SD_BETAS, steps_offset=1, **opts))
    for name in sorted(REFERENCE):
        yield case(name, options(name, beta_schedule="linear"))
    # Not for dpm2-ancestral: the cosine schedule's sigma_max (2e4) against a few steps' next
    # sigma cancels sigma_down**2 = sigma_next**2 - sigma_up**2 to 0 in float32 (NaN midpoint
    # timesteps in diffusers and here alike). Not with Karras sigmas: their rounded timesteps
    # repeat 999, and diffusers then starts its loop at the second one (NaN samples).
    for name in ("dpm2", SDE):
        yield case(name, options(name, beta_schedule="squaredcos_cap_v2"))


def sampling_grid() -> Iterator[Any]:
    """A smaller grid for the loops: every spacing and prediction, respacings on linspace."""
    for entry in grid():
        opts = entry.values[1]
        if opts.get("timestep_spacing", "linspace") == "linspace" or not (
            opts.get("use_karras_sigmas") or opts.get("use_exponential_sigmas")
        ):
            yield entry


def case(name: str, opts: dict[str, Any]) -> Any:
    return pytest.param(name, opts, marks=[needs_torchsde] if name == SDE else [])


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(("name", "opts"), list(grid()), ids=str)
def test_timesteps_and_noise_levels_equal_diffusers(name: str, opts: dict[str, Any]) -> None:
    ours, theirs = schedulers.create(name, **opts), reference(name, opts)
    for steps in (1, 2, 3, 5, 10, 25, 50, 200):
        try:
            timesteps = ours.timesteps(steps)
        except InvalidArgumentError:
            # Refused only where diffusers would ask the network about timestep 1000.
            theirs.set_timesteps(steps)
            assert theirs.timesteps.max() >= 1000, steps
            continue
        theirs.set_timesteps(steps)
        # One per evaluation; float32 here, float64 in diffusers for some options (the
        # network casts to float32 either way).
        assert len(timesteps) == 2 * steps - 1
        assert torch.equal(timesteps, theirs.timesteps.float()), steps
        assert torch.equal(ours.init_noise_sigma(steps), theirs.init_noise_sigma), steps  # type: ignore[attr-defined]
        # The noise level of each position as diffusers' add_noise gives it (begin index).
        x0, noise = torch.zeros(1), torch.ones(1)
        for index in {0, 1, steps - 1, 2 * steps - 2}:
            if 0 <= index < len(timesteps):
                theirs.set_begin_index(index)
                expected = theirs.add_noise(x0, noise, theirs.timesteps[index : index + 1])
                assert torch.equal(ours.noised(x0, noise, steps=steps, index=index), expected)


@pytest.mark.parametrize("name", NAMES)
def test_per_evaluation_sigmas_are_the_levels_diffusers_scales_the_input_by(name: str) -> None:
    # sigmas(steps) lists the level of every evaluation: the first of each step at its
    # boundary, the second at the midpoint, plus the final 0.
    opts = options(name, **SD_BETAS)
    ours = schedulers.create(name, **opts).sigmas(6)  # type: ignore[attr-defined]
    theirs = reference(name, opts)
    theirs.set_timesteps(6)
    scales = []
    for t in theirs.timesteps:
        scales.append(float(theirs.scale_model_input(torch.ones(1), t)))
        theirs.step(torch.zeros(1), t, torch.ones(1))
    assert scales == [float(1 / (s**2 + 1) ** 0.5) for s in ours[:-1]]
    assert ours[-1] == 0


# --------------------------------------------------------------------------- sampling loops


@pytest.mark.parametrize(("name", "opts"), list(sampling_grid()), ids=str)
def test_sampling_loop_matches_diffusers(name: str, opts: dict[str, Any]) -> None:
    for steps in SAMPLE_STEPS:
        our_model, their_model = DummyModel(), DummyModel()
        ours = run_latentkit(name, opts, steps, model=our_model)
        theirs = run_reference(name, opts, steps, model=their_model)
        assert relative_error(ours[-1].sample, theirs) <= TOLERANCE, steps
        assert [t.item() for t in our_model.timesteps] == [
            t.float().item() for t in their_model.timesteps
        ]
        assert [s.index for s in ours] == list(range(2 * steps - 1))
        assert {s.total for s in ours} == {2 * steps - 1}
        assert [s.timestep.item() for s in ours] == [t.item() for t in our_model.timesteps]


@pytest.mark.parametrize("name", NAMES)
def test_tiny_unet_sampling_matches_diffusers(name: str, unets: tuple[Model, Model]) -> None:  # noqa: F811
    theirs_unet, our_unet = unets
    opts = options(name, **SD_BETAS, steps_offset=1)
    for steps in (1, 3):
        ours = run_latentkit(name, opts, steps, model=our_unet)
        theirs = run_reference(name, opts, steps, model=theirs_unet)
        assert relative_error(ours[-1].sample, theirs) <= TOLERANCE, steps


@pytest.mark.parametrize("name", NAMES)
def test_float16_in_float16_out(name: str) -> None:
    opts = options(name, **SD_BETAS)
    ours = run_latentkit(name, opts, 10, model=DummyModel(), dtype=torch.float16)
    assert all(step.sample.dtype == torch.float16 for step in ours)
    theirs = run_reference(name, opts, 10, model=DummyModel(), dtype=torch.float16)
    assert relative_error(ours[-1].sample, theirs) <= 1e-3


def test_dpm2_ancestral_per_image_generators_draw_as_diffusers() -> None:
    opts = dict(SD_BETAS)
    for steps in (1, 3, 10):
        ours = run_latentkit("dpm2-ancestral", opts, steps, model=DummyModel(), seeds=[3, 7])
        theirs = run_reference("dpm2-ancestral", opts, steps, model=DummyModel(), seeds=[3, 7])
        assert relative_error(ours[-1].sample, theirs) <= TOLERANCE
    alone = run_latentkit(
        "dpm2-ancestral", opts, 10, model=DummyModel(), seeds=[3], shape=(1, *SHAPE[1:])
    )
    assert torch.equal(alone[-1].sample[0], ours[-1].sample[0])


def test_dpm2_midpoint_rule_by_hand() -> None:
    # One step of DPM2 from sigma to sigma_next with a model whose x0 is 0.1 * x + 1 at every
    # level: Euler to m = sqrt(sigma * sigma_next), then the whole step with the slope at m.
    scheduler = schedulers.create("dpm2", **SD_BETAS)
    sigmas = scheduler._schedule(2)[1].double()  # type: ignore[attr-defined]
    sigma, sigma_next = sigmas[0], sigmas[1]
    mid = (sigma * sigma_next).sqrt()
    noise = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64)

    def x0_of(x: torch.Tensor) -> torch.Tensor:
        return 0.1 * x + 1

    levels = iter(scheduler.sigmas(2)[:-1].double().tolist())

    def eps_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        level = next(levels)
        x = x_in * (level**2 + 1) ** 0.5
        return (x - x0_of(x)) / level

    steps = list(scheduler.sample(eps_model, noise, steps=2))
    x = noise * sigma
    x_mid = x + (x - x0_of(x)) / sigma * (mid - sigma)
    x1 = x + (x_mid - x0_of(x_mid)) / mid * (sigma_next - sigma)
    assert steps[0].sample.item() == pytest.approx(x_mid.item(), rel=1e-6)
    assert steps[1].sample.item() == pytest.approx(x1.item(), rel=1e-6)
    assert steps[2].sample.item() == pytest.approx(x0_of(x1).item(), rel=1e-6)


# --------------------------------------------------------------------------- the SDE's noise


@needs_torchsde
def test_sde_seeds_the_brownian_tree_from_the_generator() -> None:
    """Without ``noise_sampler_seed`` the tree's entropy is ``torch.randint(0, 2**63 - 1, ())``
    drawn from the run's generator after the starting noise, one tree per image generator:
    equal to diffusers given those integers as its ``noise_sampler_seed`` list."""
    opts = dict(SD_BETAS)
    seeds = [3, 7]
    entropy = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        randn_tensor((1, *SHAPE[1:]), generator=generator)  # the starting noise
        entropy.append(int(torch.randint(0, 2**63 - 1, (), generator=generator)))
    ours = run_latentkit("dpm-solver++-2s-sde", opts, 10, model=DummyModel(), seeds=seeds)
    theirs = run_reference(
        "dpm-solver++-2s-sde",
        {**opts, "noise_sampler_seed": entropy},
        10,
        model=DummyModel(),
        seeds=seeds,
    )
    assert relative_error(ours[-1].sample, theirs) <= TOLERANCE
    # Reproducible from the seeds; an image does not depend on its batch.
    again = run_latentkit("dpm-solver++-2s-sde", opts, 10, model=DummyModel(), seeds=seeds)
    assert torch.equal(again[-1].sample, ours[-1].sample)
    alone = run_latentkit(
        "dpm-solver++-2s-sde", opts, 10, model=DummyModel(), seeds=[7], shape=(1, *SHAPE[1:])
    )
    assert torch.equal(alone[-1].sample[0], ours[-1].sample[1])
    # One generator for the batch: one tree, its entropy drawn from that generator.
    single = run_latentkit("dpm-solver++-2s-sde", opts, 10, model=DummyModel(), seeds=3)
    generator = torch.Generator().manual_seed(3)
    randn_tensor(SHAPE, generator=generator)
    one = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    theirs = run_reference(
        "dpm-solver++-2s-sde", {**opts, "noise_sampler_seed": one}, 10, model=DummyModel(), seeds=3
    )
    assert relative_error(single[-1].sample, theirs) <= TOLERANCE
    # The noise matters: another seed, another image.
    other = run_latentkit("dpm-solver++-2s-sde", opts, 10, model=DummyModel(), seeds=[4, 7])
    assert not torch.equal(other[-1].sample[0], ours[-1].sample[0])


def test_sde_without_torchsde_raises_before_any_model_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde now raises
    scheduler = schedulers.create("dpm-solver++-2s-sde")
    model = DummyModel()
    with pytest.raises(MissingDependencyError, match=r"latentkit\[sde\]"):
        scheduler.sample(model, torch.randn(SHAPE), steps=4)
    assert model.timesteps == []
    assert isinstance(MissingDependencyError("x"), ImportError)


# --------------------------------------------------------------------------- img2img and inpainting


def ours_for_sd(name: str, opts: dict[str, Any]) -> Scheduler:
    return schedulers.create(name, config=SD15_PNDM_CONFIG, **options(name, **opts))


def run_theirs_part_way(
    scheduler: Scheduler, steps: int, start: int, *, inpaint: bool = False
) -> torch.Tensor:
    """diffusers' loop as the img2img pipeline (or the 4-channel inpaint pipeline) runs it."""
    config = {k: v for k, v in scheduler.to_config().items() if not k.startswith("_")}
    theirs = reference(scheduler.name, config)
    theirs.set_timesteps(steps)
    theirs.set_begin_index(start)
    generator = torch.Generator().manual_seed(0)
    noise = randn_tensor(SHAPE, generator=generator, dtype=torch.float32)
    timesteps = theirs.timesteps[start:]
    latents = theirs.add_noise(X0, noise, timesteps[:1])
    extra = {"generator": generator} if scheduler.name == "dpm2-ancestral" else {}
    model = MixingModel() if inpaint else DummyModel()
    for i, t in enumerate(timesteps):
        output = model(theirs.scale_model_input(latents, t), t)
        latents = theirs.step(output, t, latents, **extra, return_dict=False)[0]
        if inpaint and i < len(timesteps) - 1:
            known = theirs.add_noise(X0, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - MASK) * known + MASK * latents
    return latents


def run_ours_part_way(
    scheduler: Scheduler, steps: int, start: int, *, inpaint: bool = False
) -> tuple[torch.Tensor, list[Any]]:
    generator = torch.Generator().manual_seed(0)
    noise = randn(SHAPE, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    model = MixingModel() if inpaint else DummyModel()
    run = scheduler.sample(model, noise, steps=steps, generator=generator, start=start, init=X0)
    seen, sent = [], None
    while True:
        try:
            step = run.send(sent)
        except StopIteration:
            break
        seen.append(step)
        sent = None
        if inpaint and step.index < step.total - 1:
            known = scheduler.noised(X0, noise, steps=steps, index=start + step.index + 1)
            sent = (1 - MASK) * known + MASK * step.sample
    return seen[-1].sample, seen


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "opts", [{}, {"prediction_type": "v_prediction"}, {"use_karras_sigmas": True}], ids=str
)
def test_img2img_and_inpainting_match_diffusers(name: str, opts: dict[str, Any]) -> None:
    scheduler = ours_for_sd(name, opts)
    for steps, strength in itertools.product((4, 10), (0.3, 0.75, 1.0)):
        start = scheduler.start_index(steps, strength)
        assert start == get_timesteps_start(steps, strength, 2)
        for inpaint in (False, True):
            sample, seen = run_ours_part_way(scheduler, steps, start, inpaint=inpaint)
            reference = run_theirs_part_way(scheduler, steps, start, inpaint=inpaint)
            assert relative_error(sample, reference) <= TOLERANCE, (steps, strength, inpaint)
            assert [s.index for s in seen] == list(range(2 * steps - 1 - start))


@pytest.mark.parametrize("name", [*NAMES, "dpm-solver++-2s-ancestral"])
def test_starting_on_a_second_evaluation_is_refused(name: str) -> None:
    scheduler = ours_for_sd(name, {})
    model = DummyModel()
    assert scheduler.start_index(10, 0.5) == 10
    with pytest.raises(InvalidArgumentError, match="multiple of 2"):
        scheduler.sample(model, torch.randn(SHAPE), steps=10, start=3, init=X0)
    with pytest.raises(InvalidArgumentError):
        scheduler.noised(X0, X0, steps=10, index=19)  # 19 evaluations: positions 0 to 18
    assert model.timesteps == []


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", NAMES)
def test_defaults_equal_diffusers(name: str) -> None:
    ours = schedulers.create(name).to_config()
    theirs = dict(REFERENCE[name]().config)
    assert ours["_class_name"] == REFERENCE[name].__name__
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == {
        k: v for k, v in theirs.items() if not k.startswith("_")
    }


@pytest.mark.parametrize("name", NAMES)
def test_sd15_config_carries_over_as_in_diffusers(name: str) -> None:
    sd15 = PNDMScheduler.from_config(SD15_PNDM_CONFIG).config
    theirs = dict(REFERENCE[name].from_config(sd15).config)
    for config in (SD15_PNDM_CONFIG, sd15):
        ours = schedulers.create(name, config=config).to_config()
        # diffusers' DPMSolverSDEScheduler also keeps the PNDM-only fields; they mean nothing.
        shared = {k for k in ours if k in theirs and not k.startswith("_")}
        assert shared == set(ours) - {"_class_name"}
        assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


@pytest.mark.parametrize("name", NAMES)
def test_from_config_picks_the_class(name: str) -> None:
    cls = REFERENCE[name]
    scheduler = schedulers.from_config({**cls().config, "_class_name": cls.__name__})
    assert type(scheduler).name == name
    assert schedulers.from_config(scheduler.to_config()) == scheduler


@pytest.mark.parametrize("name", NAMES)
def test_sample_prediction_is_refused_as_diffusers_does(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="v_prediction"):
        schedulers.create(name, prediction_type="sample")
    with pytest.raises(NotImplementedError):
        run_reference(name, options(name, prediction_type="sample"), 2, model=DummyModel())
