"""The DPM-Solver family and UniPC against diffusers on identical inputs.

``dpm-solver``, ``dpm-solver++``, ``dpm-solver++-sde`` (``DPMSolverMultistepScheduler`` by
``algorithm_type``), ``dpm-solver-singlestep`` and ``unipc``. diffusers is driven as
``StableDiffusionPipeline`` drives it, with the same seeded CPU generator(s).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from test_schedulers import (
    SD15_PNDM_CONFIG,
    SD_BETAS,
    SHAPE,
    DummyModel,
    relative_error,
)

from latentkit import schedulers
from latentkit.errors import InvalidArgumentError, UnknownNameError, UnsupportedModelError
from latentkit.noise import randn
from latentkit.schedulers.common import SigmaScheduler, predicted_x0, vp_coefficients

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)

# Our registration -> (diffusers class, the options that select it there).
REFERENCE: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "dpm-solver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {}),
    "dpm-solver++-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpm-solver-singlestep": (DPMSolverSinglestepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
NEW = ("dpm-solver", "dpm-solver++-sde", "dpm-solver-singlestep", "unipc")
FLOW_ONLY = {"flow_shift", "use_dynamic_shifting", "time_shift_type"}
THEIRS_ONLY: dict[str, set[str]] = {
    "dpm-solver": FLOW_ONLY,
    "dpm-solver++-sde": FLOW_ONLY,
    "dpm-solver-singlestep": FLOW_ONLY,
    # solver_p is another scheduler object; shift_terminal works with flow sigmas only.
    "unipc": FLOW_ONLY | {"solver_p", "shift_terminal"},
}
# diffusers refuses final_sigmas_type="zero" (its default) with the noise-prediction form.
NOISE_FORM = {"final_sigmas_type": "sigma_min"}
STEPS = (1, 2, 3, 5, 10, 25, 50, 1000)
SAMPLE_STEPS = (1, 2, 3, 5, 12, 25)  # 12 < 15 <= 25: DPM-Solver lowers its last orders below 15
MAX_ERRORS: dict[str, float] = {}


def theirs(name: str, opts: dict[str, Any]) -> Any:
    cls, fixed = REFERENCE[name]
    return cls(**{**fixed, **opts})


def generators(seed: int | Sequence[int]) -> torch.Generator | list[torch.Generator]:
    if isinstance(seed, int):
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(s) for s in seed]


Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def run_theirs(
    name: str,
    opts: dict[str, Any],
    steps: int,
    *,
    model: Model | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | Sequence[int] = 0,
    shape: tuple[int, ...] = SHAPE,
) -> list[torch.Tensor]:
    """Every intermediate sample of diffusers' loop, as StableDiffusionPipeline runs it."""
    return list(iterate_theirs(name, opts, steps, model=model, dtype=dtype, seed=seed, shape=shape))


def iterate_theirs(
    name: str,
    opts: dict[str, Any],
    steps: int,
    *,
    model: Model | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | Sequence[int] = 0,
    shape: tuple[int, ...] = SHAPE,
) -> Iterator[torch.Tensor]:
    scheduler = theirs(name, opts)
    scheduler.set_timesteps(steps)
    generator = generators(seed)
    latents = randn_tensor(shape, generator=generator, dtype=dtype) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if takes_generator else {}
    model = model or DummyModel()
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(output, t, latents, **extra, return_dict=False)[0]
        yield latents


def run_ours(
    name: str,
    opts: dict[str, Any],
    steps: int,
    *,
    model: Model | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | Sequence[int] = 0,
    shape: tuple[int, ...] = SHAPE,
) -> list[torch.Tensor]:
    generator = generators(seed)
    noise = randn(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
    scheduler = schedulers.create(name, **opts)
    run = scheduler.sample(model or DummyModel(), noise, steps=steps, generator=generator)
    return [step.sample for step in run]


def check_close(name: str, ours: torch.Tensor, reference: torch.Tensor, tol: float = 1e-5) -> None:
    error = relative_error(ours, reference)
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), error)
    assert error <= tol


# --------------------------------------------------------------------------- timesteps


def timestep_grid() -> Iterator[tuple[str, dict[str, Any]]]:
    kinds: tuple[dict[str, Any], ...] = (
        {},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
    )
    for name in ("dpm-solver", "dpm-solver++-sde", "unipc"):
        base = NOISE_FORM if name == "dpm-solver" else {}
        for spacing, kind in itertools.product(("leading", "trailing", "linspace"), kinds):
            yield name, {**base, **SD_BETAS, "timestep_spacing": spacing, "steps_offset": 1, **kind}
        yield name, {**base, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        yield name, {**base, "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}
    for kind in kinds:
        yield "dpm-solver-singlestep", {**SD_BETAS, **kind}
        yield "dpm-solver-singlestep", {"beta_schedule": "squaredcos_cap_v2", **kind}
    yield (
        "dpm-solver-singlestep",
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    )
    yield (
        "dpm-solver",
        {**NOISE_FORM, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    )
    yield "unipc", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True, **SD_BETAS}
    yield "unipc", {"final_sigmas_type": "sigma_min", "use_exponential_sigmas": True}
    yield "unipc", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0, **SD_BETAS}


@pytest.mark.parametrize(("name", "opts"), list(timestep_grid()), ids=str)
def test_timesteps_and_sigmas_equal_diffusers(name: str, opts: dict[str, Any]) -> None:
    predictions = ("epsilon", "v_prediction", "sample")
    for prediction, order in itertools.product(predictions, (1, 2, 3)):
        variant = {**opts, "prediction_type": prediction, "solver_order": order}
        ours = schedulers.create(name, **variant)
        assert isinstance(ours, SigmaScheduler)
        reference = theirs(name, variant)
        # The order and prediction type do not change the schedule: 1000 steps once is enough.
        for steps in STEPS if prediction == "epsilon" and order == 1 else STEPS[:-1]:
            try:
                timesteps = ours.timesteps(steps)
            except InvalidArgumentError:
                # Refused only where diffusers' schedule is unusable (as for dpm-solver++).
                reference.set_timesteps(steps)
                assert (
                    reference.timesteps.max() >= 1000 or len(reference.timesteps.unique()) == 1
                ), steps
                continue
            reference.set_timesteps(steps)
            assert timesteps.dtype == reference.timesteps.dtype, steps
            assert torch.equal(timesteps, reference.timesteps), steps
            assert torch.equal(ours.sigmas(steps), reference.sigmas), steps


def test_dpm_solver_final_zero_sigma_keeps_the_schedule() -> None:
    # Our default final_sigmas_type="zero" (diffusers refuses it for this algorithm).
    ours = schedulers.create("dpm-solver", **SD_BETAS)
    reference = theirs("dpm-solver", {**SD_BETAS, **NOISE_FORM})
    for steps in (1, 10, 50):
        reference.set_timesteps(steps)
        assert torch.equal(ours.timesteps(steps), reference.timesteps)
        sigmas = ours.sigmas(steps)  # type: ignore[attr-defined]
        assert torch.equal(sigmas[:-1], reference.sigmas[:-1]) and sigmas[-1] == 0


# --------------------------------------------------------------------------- sampling loops


def sampling_grid() -> Iterator[tuple[str, dict[str, Any]]]:
    spacings = ("leading", "trailing", "linspace")
    predictions = ("epsilon", "v_prediction", "sample")
    dpm: tuple[dict[str, Any], ...] = (
        {"solver_order": 1},
        {"solver_order": 2},
        {"solver_order": 3},
        {"solver_type": "heun"},
        {"euler_at_final": True, "lower_order_final": False, "solver_order": 3},
        {"thresholding": True, "sample_max_value": 2.0},
    )
    for spacing, prediction, variant in itertools.product(spacings, predictions, dpm):
        karras = {"use_karras_sigmas": True} if spacing == "linspace" else {}
        opts = {"timestep_spacing": spacing, "prediction_type": prediction, **karras, **variant}
        yield "dpm-solver", {**NOISE_FORM, **opts}
        yield "dpm-solver++-sde", opts
    yield "dpm-solver", {**NOISE_FORM, "use_exponential_sigmas": True, "solver_order": 3}
    yield "dpm-solver++-sde", {"solver_order": 3, "final_sigmas_type": "sigma_min"}
    yield "dpm-solver++-sde", {"solver_type": "heun", "use_karras_sigmas": True}
    single: tuple[dict[str, Any], ...] = (
        {"solver_order": 1},
        {"solver_order": 2},
        {"solver_order": 3},
        {"solver_order": 2, "solver_type": "heun"},
        {"solver_order": 3, "solver_type": "heun"},
        {"solver_order": 3, "final_sigmas_type": "sigma_min"},
        {"solver_order": 2, "final_sigmas_type": "sigma_min", "lower_order_final": True},
        {"thresholding": True, "sample_max_value": 2.0, "solver_order": 3},
        {"use_karras_sigmas": True, "solver_order": 3},
        {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
    )
    algorithms: tuple[dict[str, Any], ...] = (
        {},
        {"algorithm_type": "sde-dpmsolver++"},
        {"algorithm_type": "dpmsolver", **NOISE_FORM},
    )
    for prediction, variant in itertools.product(predictions, single):
        for algorithm in algorithms:
            if algorithm.get("algorithm_type") == "dpmsolver" and "thresholding" in variant:
                continue  # diffusers crashes there: see the test of that deviation
            yield "dpm-solver-singlestep", {"prediction_type": prediction, **variant, **algorithm}
    unipc: tuple[dict[str, Any], ...] = (
        {"solver_order": 1},
        {"solver_order": 2},
        {"solver_order": 3},
        {"solver_order": 4, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        # bh1 ends in NaN at sigma = 0 in diffusers: see the test of that deviation.
        {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
        {"disable_corrector": [0, 2]},
        {"predict_x0": False, **NOISE_FORM},
        {"predict_x0": False, "solver_type": "bh1", "solver_order": 3, **NOISE_FORM},
        {"thresholding": True, "sample_max_value": 2.0},
    )
    for spacing, prediction, variant in itertools.product(spacings, predictions, unipc):
        karras = {"use_karras_sigmas": True} if spacing == "linspace" else {}
        yield (
            "unipc",
            {"timestep_spacing": spacing, "prediction_type": prediction, **karras, **variant},
        )
    zero_snr = {
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    }
    yield "dpm-solver", {**zero_snr, **NOISE_FORM}
    yield "dpm-solver++-sde", zero_snr
    yield "unipc", zero_snr
    yield "dpm-solver++-sde", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}
    yield "unipc", {"use_exponential_sigmas": True, "solver_order": 3}
    yield (
        "dpm-solver-singlestep",
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "solver_order": 3},
    )


@pytest.mark.parametrize(("name", "opts"), list(sampling_grid()), ids=str)
def test_sampling_loop_matches_diffusers(name: str, opts: dict[str, Any]) -> None:
    opts = {**SD_BETAS, **opts}
    if name != "dpm-solver-singlestep":
        opts["steps_offset"] = 1
    for steps in SAMPLE_STEPS:
        ours = run_ours(name, opts, steps)
        reference = run_theirs(name, opts, steps)
        assert len(ours) == len(reference)
        if reference[-1].isnan().any():
            # Karras / exponential sigmas end on a repeated sigma_min there, and diffusers
            # divides 0 by 0 in that zero-length step (see the identity test below).
            assert opts.get("final_sigmas_type") == "sigma_min"
            assert opts.get("use_karras_sigmas") or opts.get("use_exponential_sigmas")
            assert torch.isfinite(ours[-1]).all()
            check_close(name, ours[-2], reference[-2])
            continue
        check_close(name, ours[-1], reference[-1])


@pytest.mark.parametrize("name", NEW)
def test_stock_sd_config_is_bit_exact(name: str) -> None:
    # Not just close: the same float32 operations in the same order as diffusers.
    opts = {k: v for k, v in SD15_PNDM_CONFIG.items() if k in schedulers.options(name)}
    if name == "dpm-solver":
        opts.update(NOISE_FORM)
    for steps in (10, 25):
        assert torch.equal(run_ours(name, opts, steps)[-1], run_theirs(name, opts, steps)[-1])


@pytest.mark.parametrize("name", ["dpm-solver++-sde", "dpm-solver-singlestep"])
def test_sde_noise_per_image_generators(name: str) -> None:
    # One generator per image: each image draws its own noise, at every step.
    opts = {**SD_BETAS, "algorithm_type": "sde-dpmsolver++"} if "single" in name else SD_BETAS
    for steps in (1, 5, 20):
        ours = run_ours(name, opts, steps, seed=[3, 4])
        reference = run_theirs(name, opts, steps, seed=[3, 4])
        check_close(name, ours[-1], reference[-1])
        # The second image alone, from its own generator, is the same image.
        alone = run_ours(name, opts, steps, seed=[4], shape=(1, *SHAPE[1:]))
        torch.testing.assert_close(alone[-1][0], ours[-1][1], rtol=0, atol=1e-6)
    other = run_ours(name, opts, 5, seed=[3, 5])
    assert not torch.allclose(other[-1][1], run_ours(name, opts, 5, seed=[3, 4])[-1][1])


@pytest.mark.parametrize("name", [*NEW, "dpm-solver++"])
def test_float16_in_float16_out(name: str) -> None:
    opts = {k: v for k, v in SD15_PNDM_CONFIG.items() if k in schedulers.options(name)}
    if name == "dpm-solver":
        opts.update(NOISE_FORM)
    ours = run_ours(name, opts, 10, dtype=torch.float16)
    assert all(sample.dtype == torch.float16 for sample in ours)
    reference = run_theirs(name, opts, 10, dtype=torch.float16)
    check_close(f"{name} (float16)", ours[-1], reference[-1], tol=1e-3)


# --------------------------------------------------------------------------- a tiny UNet


@pytest.fixture(scope="module")
def unets() -> tuple[Model, Model]:
    from tiny_models import sd1_unet_kwargs

    from latentkit.models.unet import UNet2DCondition, UNetConfig

    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**sd1_unet_kwargs()).eval()
    ours = UNet2DCondition(UNetConfig.from_dict(dict(reference.config)))
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    context = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def their_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return reference(x, t, context).sample  # type: ignore[no-any-return]

    @torch.no_grad()
    def our_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ours(x, t, context)  # type: ignore[no-any-return]

    return our_model, their_model


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("dpm-solver", {**NOISE_FORM, "solver_order": 3}),
        ("dpm-solver++", {"solver_order": 3}),
        ("dpm-solver++-sde", {}),
        ("dpm-solver-singlestep", {"solver_order": 3}),
        ("dpm-solver-singlestep", {"algorithm_type": "sde-dpmsolver++"}),
        ("unipc", {"solver_order": 3}),
    ],
    ids=str,
)
def test_tiny_unet_sampling_matches_diffusers(
    name: str, opts: dict[str, Any], unets: tuple[Model, Model]
) -> None:
    our_model, their_model = unets
    opts = {k: v for k, v in SD15_PNDM_CONFIG.items() if k in schedulers.options(name)} | opts
    ours = run_ours(name, opts, 4, model=our_model)
    reference = run_theirs(name, opts, 4, model=their_model)
    check_close(f"{name} (UNet)", ours[-1], reference[-1])


# --------------------------------------------------------------------------- deliberate deviations


def test_dpm_solver_lands_on_zero_sigma_where_diffusers_refuses() -> None:
    with pytest.raises(ValueError, match="final_sigmas_type"):
        theirs("dpm-solver", {})
    opts = {**SD_BETAS, "solver_order": 3}
    for steps in (2, 5, 20):
        ours = run_ours("dpm-solver", opts, steps)
        reference = run_theirs("dpm-solver", {**opts, **NOISE_FORM}, steps)
        # Every step but the last is diffusers' (the schedules differ in the final sigma only).
        for a, b in zip(ours[:-1], reference[:-1], strict=True):
            check_close("dpm-solver", a, b)
        # The last step is its limit at sigma = 0: the x0 the last noise estimate implies.
        x = ours[-2]
        sigma = schedulers.create("dpm-solver", **opts).sigmas(steps)[-2]  # type: ignore[attr-defined]
        t = schedulers.create("dpm-solver", **opts).timesteps(steps)[-1]
        alpha, sigma_t = vp_coefficients(sigma)
        expected = predicted_x0("epsilon", DummyModel()(x, t), x, alpha=alpha, sigma=sigma_t)
        torch.testing.assert_close(ours[-1], expected, rtol=1e-6, atol=1e-6)


def test_unipc_noise_form_lands_on_zero_sigma_where_diffusers_gives_nan() -> None:
    opts: dict[str, Any] = {**SD_BETAS, "predict_x0": False, "solver_order": 3}
    assert run_theirs("unipc", opts, 10)[-1].isnan().all()
    assert torch.isfinite(run_ours("unipc", opts, 10)[-1]).all()
    # Without the last correction the last step starts from the sample the network saw.
    opts["disable_corrector"] = [8]
    ours = run_ours("unipc", opts, 10)
    reference = run_theirs("unipc", opts, 10)
    for a, b in zip(ours[:-1], reference[:-1], strict=True):
        check_close("unipc", a, b)
    scheduler = schedulers.create("unipc", **opts)
    sigma, t = scheduler.sigmas(10)[-2], scheduler.timesteps(10)[-1]  # type: ignore[attr-defined]
    alpha, sigma_t = vp_coefficients(sigma)
    expected = predicted_x0(
        "epsilon", DummyModel()(ours[-2], t), ours[-2], alpha=alpha, sigma=sigma_t
    )
    torch.testing.assert_close(ours[-1], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["unipc", "dpm-solver++"])
def test_zero_length_last_step_is_the_identity_where_diffusers_gives_nan(name: str) -> None:
    # Karras sigmas end on sigma_min and final_sigmas_type="sigma_min" repeats it.
    opts = {**SD_BETAS, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    opts |= {"solver_order": 3, "lower_order_final": False}
    if name == "unipc":
        opts["disable_corrector"] = [8]  # so the last step starts from the yielded sample
    ours = run_ours(name, opts, 10)
    reference = run_theirs(name, opts, 10)
    assert reference[-1].isnan().all()
    for a, b in zip(ours[:-1], reference[:-1], strict=True):
        check_close(name, a, b)
    assert torch.equal(ours[-1], ours[-2])


@pytest.mark.parametrize(
    "variant",
    [
        {"solver_type": "bh1"},
        {"lower_order_final": False},
        {"solver_type": "bh1", "solver_order": 1},
    ],
    ids=str,
)
def test_unipc_lands_on_zero_sigma_where_diffusers_gives_nan(variant: dict[str, Any]) -> None:
    # The last step to sigma = 0 is first order, whose limit there is the data estimate.
    opts = {**SD_BETAS, "solver_order": 3, "prediction_type": "v_prediction", **variant}
    opts["disable_corrector"] = [8]  # so the last step starts from the yielded sample
    ours = run_ours("unipc", opts, 10)
    reference = []
    try:
        for sample in iterate_theirs("unipc", opts, 10):
            reference.append(sample)
    except torch.linalg.LinAlgError:  # higher orders: every r_k is 0, R is singular
        assert not opts.get("lower_order_final", True)
    else:
        assert reference[-1].isnan().all()
    for a, b in zip(ours[:9], reference[:9], strict=True):
        check_close("unipc", a, b)
    scheduler = schedulers.create("unipc", **opts)
    sigma, t = scheduler.sigmas(10)[-2], scheduler.timesteps(10)[-1]  # type: ignore[attr-defined]
    alpha, sigma_t = vp_coefficients(sigma)
    output = DummyModel()(ours[-2], t)
    expected = predicted_x0("v_prediction", output, ours[-2], alpha=alpha, sigma=sigma_t)
    torch.testing.assert_close(ours[-1], expected, rtol=1e-6, atol=1e-6)


def test_singlestep_noise_form_thresholding_where_diffusers_crashes() -> None:
    opts = {**SD_BETAS, **NOISE_FORM, "algorithm_type": "dpmsolver", "thresholding": True}
    opts |= {"sample_max_value": 1.5, "solver_order": 1}
    with pytest.raises(RuntimeError):  # diffusers indexes its tables with timestep=None
        run_theirs("dpm-solver-singlestep", opts, 5)
    # At order 1 the single-step and multistep solvers are the same DDIM-like step.
    multistep = {k: v for k, v in opts.items() if k != "algorithm_type"}
    for steps in (1, 5, 12):
        ours = run_ours("dpm-solver-singlestep", opts, steps)
        reference = run_theirs("dpm-solver", multistep, steps)
        check_close("dpm-solver-singlestep", ours[-1], reference[-1])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", NEW)
def test_defaults_equal_diffusers(name: str) -> None:
    ours = schedulers.create(name).to_config()
    cls, fixed = REFERENCE[name]
    reference = dict(cls(**fixed, **(NOISE_FORM if name == "dpm-solver" else {})).config)
    if name == "dpm-solver":
        # diffusers' __init__ default, which its own check then refuses for this algorithm.
        reference["final_sigmas_type"] = (
            inspect.signature(cls).parameters["final_sigmas_type"].default
        )
    assert ours["_class_name"] == cls.__name__
    for field, value in ours.items():
        if not field.startswith("_"):
            assert field in reference, field
            assert value == reference[field], field
    missing = {k for k in reference if not k.startswith("_")} - set(ours)
    assert missing == THEIRS_ONLY[name]


@pytest.mark.parametrize("name", NEW)
def test_sd15_config_carries_over_as_in_diffusers(name: str) -> None:
    cls, fixed = REFERENCE[name]
    pndm = PNDMScheduler.from_config(SD15_PNDM_CONFIG).config
    extra = NOISE_FORM if name == "dpm-solver" else {}
    reference = dict(cls.from_config(pndm, **fixed, **extra).config)
    for config in (SD15_PNDM_CONFIG, pndm):
        ours = schedulers.create(name, config=config).to_config()
        shared = {k for k in ours if k in reference and not k.startswith("_")}
        assert shared == set(ours) - {"_class_name"}
        shared -= set(extra)
        assert {k: ours[k] for k in shared} == {k: reference[k] for k in shared}
        assert ours["beta_schedule"] == "scaled_linear"


def test_from_config_routes_by_algorithm_type() -> None:
    base = {
        **DPMSolverMultistepScheduler(**SD_BETAS).config,
        "_class_name": "DPMSolverMultistepScheduler",
    }
    routes = {
        "dpmsolver": "dpm-solver",
        "dpmsolver++": "dpm-solver++",
        "sde-dpmsolver++": "dpm-solver++-sde",
        "deis": "dpm-solver++",  # diffusers maps DEIS configs onto dpmsolver++
    }
    for algorithm, name in routes.items():
        scheduler = schedulers.from_config({**base, "algorithm_type": algorithm})
        assert type(scheduler).name == name
        assert scheduler.to_config()["beta_schedule"] == "scaled_linear"
    without = {k: v for k, v in base.items() if k != "algorithm_type"}
    assert type(schedulers.from_config(without)).name == "dpm-solver++"
    with pytest.raises(UnsupportedModelError, match="sde-dpmsolver"):
        schedulers.from_config({**base, "algorithm_type": "sde-dpmsolver"})
    for name in NEW:
        scheduler = schedulers.create(name, **SD_BETAS, use_karras_sigmas=True)
        assert schedulers.from_config(scheduler.to_config()) == scheduler
        cls, fixed = REFERENCE[name]
        reference = cls(**fixed, **(NOISE_FORM if name == "dpm-solver" else {}))
        config = {**reference.config, "_class_name": cls.__name__}
        assert type(schedulers.from_config(config)).name == name


def test_swapping_keeps_the_model_config_but_not_the_algorithm() -> None:
    model = schedulers.create("dpm-solver++", use_karras_sigmas=True, **SD_BETAS).to_config()
    sde = schedulers.create("dpm-solver++-sde", config=model)
    assert sde.to_config()["algorithm_type"] == "sde-dpmsolver++"
    assert sde.to_config()["use_karras_sigmas"] and sde.to_config()["beta_end"] == 0.012
    back = schedulers.create("dpm-solver++", config=sde.to_config())
    assert back.to_config() == model
    # The single-step class has algorithm_type as an option: it carries over, as in diffusers.
    single = schedulers.create("dpm-solver-singlestep", config=sde.to_config())
    assert single.to_config()["algorithm_type"] == "sde-dpmsolver++"
    # Explicit options win; sibling solver names map as diffusers maps them.
    unipc = schedulers.create("unipc", config={**model, "solver_type": "heun"}, solver_order=3)
    reference = UniPCMultistepScheduler.from_config({**model, "solver_type": "heun"}).config
    assert unipc.to_config()["solver_type"] == reference["solver_type"] == "bh2"
    assert unipc.to_config()["solver_order"] == 3


def test_singlestep_has_no_spacing_options() -> None:
    # diffusers' DPMSolverSinglestepScheduler always spaces linspace, without an offset.
    for option in ("timestep_spacing", "steps_offset", "rescale_betas_zero_snr"):
        assert option not in schedulers.options("dpm-solver-singlestep")
        with pytest.raises(UnknownNameError):
            schedulers.create("dpm-solver-singlestep", **{option: None})


@pytest.mark.parametrize("steps", range(1, 13))
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(
    ("final", "lower"), [("zero", False), ("sigma_min", False), ("sigma_min", True)]
)
def test_singlestep_order_schedule_equals_diffusers(
    steps: int, order: int, final: str, lower: bool
) -> None:
    opts = {"solver_order": order, "final_sigmas_type": final, "lower_order_final": lower}
    reference = theirs("dpm-solver-singlestep", opts)
    reference.set_timesteps(steps)  # may switch lower_order_final on, as ours does
    ours = schedulers.create("dpm-solver-singlestep", **opts)
    assert ours.orders(steps) == reference.order_list  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("dpm-solver", {"solver_order": 4}),
        ("dpm-solver-singlestep", {"solver_order": 4}),
        ("unipc", {"solver_order": 0}),
        ("dpm-solver++-sde", {"use_lu_lambdas": True}),
        ("unipc", {"use_flow_sigmas": True}),
        ("dpm-solver-singlestep", {"use_beta_sigmas": True}),
        ("dpm-solver", {"algorithm_type": "dpmsolver++"}),
        ("dpm-solver-singlestep", {"algorithm_type": "sde-dpmsolver"}),
        ("unipc", {"solver_type": "rk4"}),
    ],
    ids=str,
)
def test_bad_values_raise(name: str, opts: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        schedulers.create(name, **opts)


def test_unipc_accepts_orders_above_three_and_is_hashable() -> None:
    scheduler = schedulers.create("unipc", solver_order=4, disable_corrector=[1, 3])
    assert hash(scheduler) == hash(
        schedulers.create("unipc", solver_order=4, disable_corrector=(1, 3))
    )
    assert scheduler.to_config()["disable_corrector"] == [1, 3]
