"""ddpm, euler-ancestral, heun, lms and lcm against diffusers on identical inputs.

Driven as in ``test_schedulers`` (whose harness this reuses): diffusers' scheduler as
``StableDiffusionPipeline`` drives it, ours through ``sample``, with the same seeded CPU
generators, over the deterministic dummy model and over a tiny random UNet.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import pytest
import torch
from test_schedulers import (
    SD15_PNDM_CONFIG,
    SD_BETAS,
    SHAPE,
    STEPS,
    DummyModel,
    relative_error,
)

from latentkit import schedulers
from latentkit.errors import InvalidArgumentError
from latentkit.noise import randn
from latentkit.schedulers.common import SigmaTableScheduler
from latentkit.schedulers.lms import lms_coefficients

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy")  # diffusers' LMSDiscreteScheduler needs it
from diffusers import (  # noqa: E402
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

CLASSIC: dict[str, type[Any]] = {
    "ddpm": DDPMScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "lcm": LCMScheduler,
}
OURS_ONLY = {"order"}  # an LMSDiscreteScheduler.step argument, a field here
STOCHASTIC = ("ddpm", "euler-ancestral", "lcm")
SAMPLE_STEPS = (1, 2, 3, 5, 10, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS: dict[str, tuple[str, ...]] = {
    "ddpm": ("epsilon", "v_prediction", "sample"),
    "euler-ancestral": ("epsilon", "v_prediction"),  # diffusers: "sample" not implemented
    "heun": ("epsilon", "v_prediction", "sample"),
    "lms": ("epsilon", "v_prediction", "sample"),
    "lcm": ("epsilon", "v_prediction", "sample"),
}
RESPACINGS: tuple[dict[str, Any], ...] = (
    {},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference(name: str, opts: dict[str, Any]) -> Any:
    return CLASSIC[name](**{k: v for k, v in opts.items() if k not in OURS_ONLY})


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
    if name == "lms":
        extra["order"] = opts.get("order", 4)
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


@pytest.fixture
def exact_lms_coefficients(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' LMS with its scipy quadrature replaced by our exact integral.

    diffusers integrates a float32 integrand (its coefficients are off by up to 3e-7, see
    `test_lms_coefficients_are_exact`), which some trajectories amplify past 1e-5; with the
    same coefficients the loops agree bit for bit.
    """

    def coefficient(self: Any, order: int, t: int, current_order: int) -> float:
        return lms_coefficients(self.sigmas.tolist(), t, order)[current_order]

    monkeypatch.setattr(LMSDiscreteScheduler, "get_lms_coefficient", coefficient)


# --------------------------------------------------------------------------- timesteps


def timestep_grid() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in ("ddpm", "euler-ancestral", "heun", "lms"):
        respacings = RESPACINGS if name in ("heun", "lms") else ({},)
        for spacing, prediction, respacing in itertools.product(
            SPACINGS, PREDICTIONS[name], respacings
        ):
            yield (
                name,
                {
                    "timestep_spacing": spacing,
                    "prediction_type": prediction,
                    "steps_offset": 1,
                    **respacing,
                    **SD_BETAS,
                },
            )
    for spacing in SPACINGS:
        yield "ddpm", {"timestep_spacing": spacing, "beta_schedule": "squaredcos_cap_v2"}
        yield "euler-ancestral", {"timestep_spacing": spacing, "beta_schedule": "linear"}
        yield "heun", {"timestep_spacing": spacing, "use_karras_sigmas": True, "beta_end": 0.02}
        yield "lms", {"timestep_spacing": spacing, "use_exponential_sigmas": True}
    yield (
        "euler-ancestral",
        {
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
    )
    # LCM's timesteps ignore timestep_spacing and steps_offset, as diffusers' do.
    for prediction, spacing in itertools.product(PREDICTIONS["lcm"], SPACINGS):
        yield "lcm", {"prediction_type": prediction, "timestep_spacing": spacing}
    yield "lcm", {"original_inference_steps": 4}
    yield "lcm", {"original_inference_steps": 1000}
    yield "lcm", {"original_inference_steps": 3, "num_train_timesteps": 100}


@pytest.mark.parametrize(("name", "opts"), list(timestep_grid()), ids=str)
def test_timesteps_and_sigmas_equal_diffusers(name: str, opts: dict[str, Any]) -> None:
    ours = schedulers.create(name, **opts)
    theirs = reference(name, opts)
    for steps in (*STEPS, opts.get("original_inference_steps", 50)):
        if steps > opts.get("num_train_timesteps", 1000):
            continue
        try:
            timesteps = ours.timesteps(steps)
        except InvalidArgumentError:
            # Refused only where diffusers raises too (LCM beyond original_inference_steps)
            # or asks the network about timestep 1000 (leading spacing with steps_offset).
            try:
                theirs.set_timesteps(steps)
            except ValueError:
                continue
            assert theirs.timesteps.max() >= 1000, steps
            continue
        theirs.set_timesteps(steps)
        assert timesteps.dtype == theirs.timesteps.dtype, steps
        assert torch.equal(timesteps, theirs.timesteps), steps
        if isinstance(ours, SigmaTableScheduler):
            assert torch.equal(ours.sigmas(steps), theirs.sigmas), steps
            assert torch.equal(ours.init_noise_sigma(steps), theirs.init_noise_sigma), steps
        if name == "heun":
            assert len(timesteps) == 2 * steps - 1


@pytest.mark.parametrize("name", ["ddpm", "euler-ancestral", "heun", "lms"])
def test_trailing_spacing_drops_the_negative_timestep_diffusers_adds(name: str) -> None:
    # As for the other schedulers (test_schedulers): np.arange's float steps sometimes add
    # timestep -1; we leave it out instead of evaluating the network there.
    opts = {"timestep_spacing": "trailing"}
    ours, theirs = schedulers.create(name, **opts), reference(name, opts)
    theirs.set_timesteps(61)
    assert theirs.timesteps[-1] == -1
    kept = theirs.timesteps >= 0
    assert torch.equal(ours.timesteps(61), theirs.timesteps[kept])


# --------------------------------------------------------------------------- sampling loops


def sampling_grid() -> Iterator[tuple[str, dict[str, Any]]]:
    ddpm_variants: tuple[dict[str, Any], ...] = (
        {"clip_sample": False},
        {"clip_sample": True, "clip_sample_range": 1.5},
        {"clip_sample": False, "variance_type": "fixed_small_log"},
        {"clip_sample": False, "variance_type": "fixed_large"},
        {"thresholding": True, "sample_max_value": 2.0},
    )
    for spacing, prediction, variant in itertools.product(
        SPACINGS, PREDICTIONS["ddpm"], ddpm_variants
    ):
        yield "ddpm", {"timestep_spacing": spacing, "prediction_type": prediction, **variant}
    for spacing, prediction in itertools.product(SPACINGS, PREDICTIONS["euler-ancestral"]):
        yield "euler-ancestral", {"timestep_spacing": spacing, "prediction_type": prediction}
    for name in ("heun", "lms"):
        for spacing, prediction, respacing in itertools.product(
            SPACINGS, PREDICTIONS[name], RESPACINGS
        ):
            yield name, {"timestep_spacing": spacing, "prediction_type": prediction, **respacing}
    yield "heun", {"clip_sample": True, "clip_sample_range": 1.5, "prediction_type": "sample"}
    yield "lms", {"order": 2}
    yield "lms", {"order": 6, "use_karras_sigmas": True}
    lcm_variants: tuple[dict[str, Any], ...] = (
        {},
        {"clip_sample": True, "clip_sample_range": 1.5},
        {"thresholding": True, "sample_max_value": 2.0},
        {"timestep_scaling": 1.0, "original_inference_steps": 100},
    )
    for prediction, variant in itertools.product(PREDICTIONS["lcm"], lcm_variants):
        yield "lcm", {"prediction_type": prediction, **variant}
    zero_snr = {
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    }
    for name in ("ddpm", "euler-ancestral", "lcm"):
        yield name, zero_snr
    yield "ddpm", {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}


@pytest.mark.usefixtures("exact_lms_coefficients")
@pytest.mark.parametrize(("name", "opts"), list(sampling_grid()), ids=str)
def test_sampling_loop_matches_diffusers(name: str, opts: dict[str, Any]) -> None:
    opts = {**SD_BETAS, "steps_offset": 1, **opts}
    for steps in SAMPLE_STEPS:
        our_model, their_model = DummyModel(), DummyModel()
        try:
            ours = run_latentkit(name, opts, steps, model=our_model)
        except InvalidArgumentError:
            assert name == "lcm" and steps > opts.get("original_inference_steps", 50)
            continue
        theirs = run_reference(name, opts, steps, model=their_model)
        assert relative_error(ours[-1].sample, theirs) <= 1e-5, steps
        # The network saw the same timesteps, with the dtype diffusers gives the UNet.
        assert [t.item() for t in our_model.timesteps] == [t.item() for t in their_model.timesteps]
        assert {t.dtype for t in our_model.timesteps} == {t.dtype for t in their_model.timesteps}
        assert [s.index for s in ours] == list(range(len(ours)))
        assert {s.total for s in ours} == {len(ours)} == {len(our_model.timesteps)}
        assert [s.timestep.item() for s in ours] == [t.item() for t in their_model.timesteps]


@pytest.mark.parametrize("prediction_type", PREDICTIONS["lms"])
def test_lms_matches_stock_diffusers(prediction_type: str) -> None:
    # Without replacing diffusers' quadrature: its float32 integrand costs up to ~1e-4
    # relative on the "sample" dummy trajectory, which amplifies coefficient errors.
    opts = {**SD_BETAS, "prediction_type": prediction_type}
    tolerance = 1e-4 if prediction_type == "sample" else 1e-5
    for steps in (2, 10, 25):
        ours = run_latentkit("lms", opts, steps, model=DummyModel())
        theirs = run_reference("lms", opts, steps, model=DummyModel())
        assert relative_error(ours[-1].sample, theirs) <= tolerance, steps


@pytest.mark.parametrize("name", STOCHASTIC)
def test_per_image_generators_draw_as_diffusers(name: str) -> None:
    opts = {**SD_BETAS, "steps_offset": 1}
    for steps in (1, 3, 10):
        ours = run_latentkit(name, opts, steps, model=DummyModel(), seeds=[3, 7])
        theirs = run_reference(name, opts, steps, model=DummyModel(), seeds=[3, 7])
        assert relative_error(ours[-1].sample, theirs) <= 1e-5
    # The same image from a batch of one with the same seed: the draws are per image.
    alone = run_latentkit(name, opts, 10, model=DummyModel(), seeds=[3], shape=(1, *SHAPE[1:]))
    assert torch.equal(alone[-1].sample[0], ours[-1].sample[0])


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_matches_diffusers(variance_type: str) -> None:
    # The network outputs its prediction and a variance for every channel (as DeepFloyd IF).
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        variance = torch.sigmoid(x) * (1 if variance_type == "learned" else 2) - (
            0 if variance_type == "learned" else 1
        )
        return torch.cat([0.1 * x + torch.sin(t.float() / 100), 1e-3 * variance], dim=1)

    opts = {"variance_type": variance_type, "clip_sample": False}
    for steps in (1, 5, 25):
        ours = run_latentkit("ddpm", opts, steps, model=model)
        theirs = run_reference("ddpm", opts, steps, model=model)
        assert relative_error(ours[-1].sample, theirs) <= 1e-5
    noise = torch.randn(SHAPE)
    with pytest.raises(InvalidArgumentError, match="channels"):
        list(schedulers.create("ddpm", **opts).sample(DummyModel(), noise, steps=2))


# --------------------------------------------------------------------------- a tiny UNet


@pytest.fixture(scope="module")
def unets() -> tuple[Model, Model]:
    """diffusers' tiny SD 1.x UNet and ours with its weights, as (theirs, ours) denoisers."""
    from tiny_models import sd1_unet_kwargs

    from latentkit.models.unet import UNet2DCondition, UNetConfig

    torch.manual_seed(0)
    reference_unet = diffusers.UNet2DConditionModel(**sd1_unet_kwargs()).eval()
    our_unet = UNet2DCondition(UNetConfig.from_dict(dict(reference_unet.config)))
    our_unet.load_state_dict(reference_unet.state_dict())
    our_unet.eval()
    context = torch.randn(SHAPE[0], 7, 32, generator=torch.Generator().manual_seed(5))

    def theirs(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return reference_unet(x, t, encoder_hidden_states=context).sample  # type: ignore[no-any-return]

    def ours(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return our_unet(x, t, context)

    return theirs, ours


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_tiny_unet_sampling_matches_diffusers(name: str, unets: tuple[Model, Model]) -> None:
    theirs_unet, our_unet = unets
    opts = {**SD_BETAS, "steps_offset": 1}
    if name == "ddpm":
        opts["clip_sample"] = False
    for steps in (1, 3):
        ours = run_latentkit(name, opts, steps, model=our_unet)
        theirs = run_reference(name, opts, steps, model=theirs_unet)
        assert relative_error(ours[-1].sample, theirs) <= 1e-5, steps


# --------------------------------------------------------------------------- dtypes and configs


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_float16_in_float16_out(name: str) -> None:
    opts = {k: v for k, v in SD15_PNDM_CONFIG.items() if k in schedulers.options(name)}
    ours = run_latentkit(name, opts, 10, model=DummyModel(), dtype=torch.float16)
    assert all(step.sample.dtype == torch.float16 for step in ours)
    theirs = run_reference(name, opts, 10, model=DummyModel(), dtype=torch.float16)
    assert relative_error(ours[-1].sample, theirs) <= 1e-3


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_defaults_equal_diffusers(name: str) -> None:
    ours = schedulers.create(name).to_config()
    theirs = dict(CLASSIC[name]().config)
    assert ours["_class_name"] == CLASSIC[name].__name__
    for field, value in ours.items():
        if field.startswith("_") or field in OURS_ONLY:
            continue
        assert field in theirs, field
        assert value == theirs[field], field
    assert {k for k in theirs if not k.startswith("_")} <= set(ours)


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_sd15_config_carries_over_as_in_diffusers(name: str) -> None:
    sd15 = PNDMScheduler.from_config(SD15_PNDM_CONFIG).config
    theirs = dict(CLASSIC[name].from_config(sd15).config)
    for config in (SD15_PNDM_CONFIG, sd15):
        ours = schedulers.create(name, config=config).to_config()
        shared = {k for k in ours if k in theirs and not k.startswith("_")}
        assert shared == set(ours) - {"_class_name"} - OURS_ONLY
        assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_from_config_picks_the_class(name: str) -> None:
    cls = CLASSIC[name]
    scheduler = schedulers.from_config({**cls().config, "_class_name": cls.__name__})
    assert type(scheduler).name == name
    assert schedulers.from_config(scheduler.to_config()) == scheduler


# --------------------------------------------------------------------------- LMS coefficients


def _exact_lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    # The Lagrange basis integral in rational arithmetic: expand the product, integrate.
    nodes = [Fraction(sigmas[i - k]) for k in range(order)]
    polynomial = [Fraction(1)]  # coefficients, lowest degree first
    for k, node in enumerate(nodes):
        if k != j:
            # Times (x - node) / (nodes[j] - node): degree d gets p[d - 1] - node * p[d].
            below, same = [Fraction(0), *polynomial], [*polynomial, Fraction(0)]
            polynomial = [
                (b - node * c) / (nodes[j] - node) for b, c in zip(below, same, strict=True)
            ]
    start, end = Fraction(sigmas[i]), Fraction(sigmas[i + 1])
    return float(
        sum(c * (end ** (p + 1) - start ** (p + 1)) / (p + 1) for p, c in enumerate(polynomial))
    )


@pytest.mark.parametrize("steps", [5, 25, 50])
def test_lms_coefficients_are_exact(steps: int) -> None:
    # Ours to float64 rounding; diffusers' (scipy quadrature of a float32 integrand) to
    # float32 precision: both relative to the step's largest weight.
    theirs = LMSDiscreteScheduler(**SD_BETAS, use_karras_sigmas=steps == 25)
    theirs.set_timesteps(steps)
    sigmas = theirs.sigmas.tolist()
    for i in range(steps):
        order = min(i + 1, 4)
        ours = lms_coefficients(sigmas, i, order)
        exact = [_exact_lms_coefficient(sigmas, i, order, j) for j in range(order)]
        scale = max(abs(c) for c in exact)
        for j in range(order):
            assert abs(ours[j] - exact[j]) <= 1e-13 * scale
            assert abs(theirs.get_lms_coefficient(order, i, j) - exact[j]) <= 1e-6 * scale
    # Many close sigmas: still exact, where expanding into monomials would cancel badly.
    dense = schedulers.create("lms", **SD_BETAS).sigmas(1000).tolist()  # type: ignore[attr-defined]
    for i in (3, 500, 998):
        exact = [_exact_lms_coefficient(dense, i, 4, j) for j in range(4)]
        scale = max(abs(c) for c in exact)
        assert all(
            abs(o - e) <= 1e-11 * scale
            for o, e in zip(lms_coefficients(dense, i, 4), exact, strict=True)
        )


# --------------------------------------------------------------------------- refusals


def test_ddpm_refuses_fixed_large_log_where_diffusers_returns_nan() -> None:
    # diffusers takes the square root of log(beta_t) < 0 there.
    with pytest.raises(InvalidArgumentError, match="fixed_small_log"):
        schedulers.create("ddpm", variance_type="fixed_large_log")
    theirs = run_reference("ddpm", {"variance_type": "fixed_large_log"}, 3, model=DummyModel())
    assert theirs.isnan().all()


def test_euler_ancestral_refuses_sample_prediction_as_diffusers_does() -> None:
    with pytest.raises(InvalidArgumentError, match="v_prediction"):
        schedulers.create("euler-ancestral", prediction_type="sample")
    with pytest.raises(NotImplementedError):
        run_reference("euler-ancestral", {"prediction_type": "sample"}, 1, model=DummyModel())


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("heun", {"use_beta_sigmas": True}),
        ("lms", {"use_beta_sigmas": True}),
        ("lms", {"use_karras_sigmas": True, "use_exponential_sigmas": True}),
        ("lms", {"order": 0}),
        ("lcm", {"original_inference_steps": 1001}),
        ("ddpm", {"beta_schedule": "sigmoid"}),
    ],
)
def test_bad_values_raise(name: str, opts: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        schedulers.create(name, **opts)


def test_heun_yields_every_evaluation_with_its_timestep() -> None:
    model = DummyModel()
    yielded = run_latentkit("heun", {}, 4, model=model)
    expected = schedulers.create("heun").timesteps(4)
    assert len(yielded) == len(expected) == 7
    assert torch.equal(torch.stack([s.timestep for s in yielded]), expected)
    assert torch.equal(torch.stack(model.timesteps), expected)
