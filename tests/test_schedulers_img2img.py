"""Every scheduler started part-way (image-to-image ``strength``) and fed replaced samples
between steps (inpainting with a 4-channel model), against diffusers on identical inputs.

diffusers is driven as ``StableDiffusionImg2ImgPipeline`` drives it (``get_timesteps``,
``set_begin_index``, ``add_noise`` at the first kept timestep, then ``scale_model_input`` /
``step``), and as ``StableDiffusionInpaintPipeline`` blends a 4-channel model's latents
(``latents = (1 - mask) * add_noise(x0, noise, timesteps[i + 1]) + mask * latents`` after
every step but the last), with the same seeded CPU generator.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_schedulers import SD15_PNDM_CONFIG, SHAPE, DummyModel, relative_error

from latentkit import schedulers
from latentkit.errors import InvalidArgumentError
from latentkit.noise import randn
from latentkit.protocols import Scheduler
from latentkit.schedulers.lms import lms_coefficients

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy")  # diffusers' LMSDiscreteScheduler needs it
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)

REFERENCE: dict[str, type[Any]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
    "dpm-solver++": DPMSolverMultistepScheduler,
    "dpm-solver++-sde": DPMSolverMultistepScheduler,
    "dpm-solver-singlestep": DPMSolverSinglestepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "lcm": LCMScheduler,
    "lms": LMSDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}
TESTED_ELSEWHERE = {
    # Two evaluations per step (and, for the SDE, a seeded Brownian tree); their img2img and
    # inpainting tests against diffusers are in test_schedulers_two_stage.
    "dpm2": "test_schedulers_two_stage",
    "dpm2-ancestral": "test_schedulers_two_stage",
    "dpm-solver++-2s-sde": "test_schedulers_two_stage",
    "dpm-solver++-2s-ancestral": "no diffusers counterpart; test_schedulers_two_stage*",
    "restart": "no diffusers counterpart; test_schedulers_restart (Heun without restarts)",
}
NAMES = [name for name in schedulers.names() if name not in TESTED_ELSEWHERE]
STEPS = (4, 10, 25)
STRENGTHS = (0.3, 0.5, 0.75, 1.0)
X0 = 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
MASK = (torch.arange(8) < 5).to(torch.float32).reshape(1, 1, 1, 8).expand(1, 1, 8, 8)
MAX_ERRORS: dict[str, float] = {}


class MixingModel(DummyModel):
    """`DummyModel` plus a term that mixes neighbouring pixels: with an elementwise model,
    a blend's known region could never reach the masked one, hiding what a replaced
    sample means to a scheduler."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().__call__(x, t) + 0.05 * x.roll(1, dims=-1)


def test_every_registration_has_a_reference() -> None:
    assert set(NAMES) == set(REFERENCE)
    assert set(TESTED_ELSEWHERE) <= set(schedulers.names())


def option_sets() -> Iterator[tuple[str, dict[str, Any]]]:
    """A few option sets per registration: SD 1.5's config, v-prediction, Karras sigmas,
    third order where the solver has it."""
    for name in NAMES:
        # diffusers refuses final_sigmas_type="zero" (its default) with the noise form.
        base = {"final_sigmas_type": "sigma_min"} if name == "dpm-solver" else {}
        accepted = schedulers.options(name)
        yield name, base
        yield name, {**base, "prediction_type": "v_prediction"}
        if "use_karras_sigmas" in accepted:
            yield name, {**base, "use_karras_sigmas": True}
        if "solver_order" in accepted:
            yield name, {**base, "solver_order": 3}
    yield "ddim", {"eta": 1.0}
    yield "lms", {"order": 2}


def ours(name: str, opts: dict[str, Any]) -> Scheduler:
    return schedulers.create(name, config=SD15_PNDM_CONFIG, **opts)


def theirs(scheduler: Scheduler, steps: int, start: int) -> Any:
    """diffusers' scheduler of the same config, prepared as the img2img pipeline does."""
    config = scheduler.to_config()
    reference = REFERENCE[scheduler.name].from_config(config)
    reference.set_timesteps(steps)
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(start)
    return reference


def get_timesteps_start(steps: int, strength: float, order: int) -> int:
    """diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``, the start it slices at."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    return t_start * order


@pytest.fixture(autouse=True)
def exact_lms_coefficients(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' LMS with its float32 scipy quadrature replaced by our exact weights (see
    ``test_schedulers_classic``); with the same coefficients the loops agree bit for bit."""

    def coefficient(self: Any, order: int, t: int, current_order: int) -> float:
        return lms_coefficients(self.sigmas.tolist(), t, order)[current_order]

    monkeypatch.setattr(LMSDiscreteScheduler, "get_lms_coefficient", coefficient)


def run_theirs(
    scheduler: Scheduler, steps: int, start: int, *, inpaint: bool = False, seed: int = 0
) -> tuple[torch.Tensor, DummyModel]:
    """diffusers' loop as the img2img pipeline (or the 4-channel inpaint pipeline) runs it."""
    reference = theirs(scheduler, steps, start)
    generator = torch.Generator().manual_seed(seed)
    noise = randn_tensor(SHAPE, generator=generator, dtype=torch.float32)
    timesteps = reference.timesteps[start:]
    latents = reference.add_noise(X0, noise, timesteps[:1])
    extra: dict[str, Any] = {}
    parameters = inspect.signature(reference.step).parameters
    if "generator" in parameters:
        extra["generator"] = generator
    if scheduler.name == "ddim":
        extra["eta"] = scheduler.eta  # type: ignore[attr-defined]
    if scheduler.name == "lms":
        extra["order"] = scheduler.order  # type: ignore[attr-defined]
    model = MixingModel() if inpaint else DummyModel()
    for i, t in enumerate(timesteps):
        output = model(reference.scale_model_input(latents, t), t)
        latents = reference.step(output, t, latents, **extra, return_dict=False)[0]
        if inpaint and i < len(timesteps) - 1:
            known = reference.add_noise(X0, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - MASK) * known + MASK * latents
    return latents, model


def run_ours(
    scheduler: Scheduler,
    steps: int,
    start: int,
    *,
    inpaint: bool = False,
    echo: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, DummyModel, list[Any]]:
    """Our loop; ``inpaint`` blends as diffusers' inpaint pipeline does, ``echo`` sends
    every sample back unchanged."""
    generator = torch.Generator().manual_seed(seed)
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
        sent = step.sample if echo else None
        if inpaint and step.index < step.total - 1:
            following = start + step.index + 1
            known = scheduler.noised(X0, noise, steps=steps, index=following)
            sent = (1 - MASK) * known + MASK * step.sample
    return seen[-1].sample, model, seen


def check(name: str, ours: torch.Tensor, reference: torch.Tensor) -> None:
    error = relative_error(ours, reference)
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), error)
    assert error <= 1e-5


# --------------------------------------------------------------------------- img2img


@pytest.mark.parametrize(("name", "opts"), list(option_sets()), ids=str)
def test_img2img_matches_diffusers(name: str, opts: dict[str, Any]) -> None:
    scheduler = ours(name, opts)
    order = 2 if name == "heun" else 1
    for steps, strength in itertools.product(STEPS, STRENGTHS):
        start = scheduler.start_index(steps, strength)
        assert start == get_timesteps_start(steps, strength, order)
        reference = theirs(scheduler, steps, start)
        assert reference.order == order

        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        expected = reference.add_noise(X0, noise, reference.timesteps[start : start + 1])
        assert torch.equal(scheduler.noised(X0, noise, steps=steps, index=start), expected)

        sample, model, seen = run_ours(scheduler, steps, start)
        reference_sample, reference_model = run_theirs(scheduler, steps, start)
        check(name, sample, reference_sample)
        # The network saw the same timesteps; the steps count from 0 in this run.
        assert [t.item() for t in model.timesteps] == [t.item() for t in reference_model.timesteps]
        assert [s.index for s in seen] == list(range(len(seen)))
        assert {s.total for s in seen} == {len(scheduler.timesteps(steps)) - start}


@pytest.mark.parametrize("name", NAMES)
def test_noised_at_every_position_equals_add_noise_during_a_run(name: str) -> None:
    # As the inpaint pipeline calls it: after the step that reaches ``index``.
    scheduler = ours(name, {"final_sigmas_type": "sigma_min"} if name == "dpm-solver" else {})
    steps = 10
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    reference = theirs(scheduler, steps, 0)
    timesteps = reference.timesteps
    latents = reference.add_noise(X0, noise, timesteps[:1])
    for i, t in enumerate(timesteps[:-1]):
        scaled = reference.scale_model_input(latents, t)
        latents = reference.step(0.1 * scaled, t, latents, return_dict=False)[0]
        expected = reference.add_noise(X0, noise, torch.tensor([timesteps[i + 1]]))
        assert torch.equal(scheduler.noised(X0, noise, steps=steps, index=i + 1), expected), i


# --------------------------------------------------------------------------- replacing the sample


@pytest.mark.parametrize("name", NAMES)
def test_sending_the_sample_back_changes_nothing(name: str) -> None:
    scheduler = ours(name, {"final_sigmas_type": "sigma_min"} if name == "dpm-solver" else {})
    for steps, start in ((10, 0), (10, scheduler.start_index(10, 0.6))):
        plain, _, plain_steps = run_ours(scheduler, steps, start)
        echoed, _, echoed_steps = run_ours(scheduler, steps, start, echo=True)
        assert torch.equal(plain, echoed)
        assert all(
            torch.equal(a.sample, b.sample) for a, b in zip(plain_steps, echoed_steps, strict=True)
        )


@pytest.mark.parametrize(("name", "opts"), list(option_sets()), ids=str)
def test_inpainting_blend_matches_diffusers(name: str, opts: dict[str, Any]) -> None:
    scheduler = ours(name, opts)
    for steps, strength in itertools.product((4, 10), (0.5, 1.0)):
        start = scheduler.start_index(steps, strength)
        sample, model, _ = run_ours(scheduler, steps, start, inpaint=True)
        reference_sample, reference_model = run_theirs(scheduler, steps, start, inpaint=True)
        check(name, sample, reference_sample)
        assert len(model.timesteps) == len(reference_model.timesteps)
        # The blend did change the result.
        assert not torch.equal(sample, run_ours(scheduler, steps, start)[0])


def test_sending_a_wrong_shape_raises() -> None:
    noise = torch.randn(SHAPE)
    run = ours("euler", {}).sample(DummyModel(), noise, steps=4)
    next(run)
    with pytest.raises(InvalidArgumentError, match="shape"):
        run.send(torch.zeros(1, 4, 8, 8))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("strength", "message"),
    [(-0.1, "between 0 and 1"), (1.5, "between 0 and 1"), (0.0, "no step"), (0.05, "no step")],
)
def test_bad_strength_raises_before_any_model_call(
    name: str, strength: float, message: str
) -> None:
    scheduler = ours(name, {})
    with pytest.raises(InvalidArgumentError, match=message):
        scheduler.start_index(10, strength)


def test_no_step_left_says_what_works() -> None:
    with pytest.raises(InvalidArgumentError, match=r"at least 1/10 or at least 20 steps"):
        ours("euler", {}).start_index(10, 0.05)
    assert ours("euler", {}).start_index(20, 0.05) == 19
    assert ours("heun", {}).start_index(20, 0.05) == 38


@pytest.mark.parametrize("name", NAMES)
def test_bad_start_raises_before_any_model_call(name: str) -> None:
    scheduler = ours(name, {})
    model = DummyModel()
    noise = torch.randn(SHAPE)
    count = len(scheduler.timesteps(10))
    bad: list[dict[str, Any]] = [
        {"start": 2},  # without init
        {"start": count, "init": X0},
        {"start": -1, "init": X0},
        {"start": 0, "init": X0[:1]},
    ]
    if name == "heun":
        bad.append({"start": 3, "init": X0})  # the correction half of a step
    for kwargs in bad:
        with pytest.raises(InvalidArgumentError):
            scheduler.sample(model, noise, steps=10, **kwargs)
    assert model.timesteps == []


def test_pndm_runge_kutta_warm_up_cannot_start_part_way() -> None:
    # diffusers' step_prk reads its timesteps from prk_timesteps by its own step count,
    # whatever the begin index, so a part-way run mixes noise levels; we refuse it.
    scheduler = ours("pndm", {"skip_prk_steps": False})
    with pytest.raises(InvalidArgumentError, match="skip_prk_steps=True"):
        scheduler.start_index(10, 0.5)
    model = DummyModel()
    with pytest.raises(InvalidArgumentError, match="skip_prk_steps=True"):
        scheduler.sample(model, torch.randn(SHAPE), steps=10, start=1, init=X0)
    assert model.timesteps == []
    # At full strength it starts at 0 and matches diffusers, blend included.
    assert scheduler.start_index(10, 1.0) == 0
    for inpaint in (False, True):
        sample = run_ours(scheduler, 10, 0, inpaint=inpaint)[0]
        check("pndm", sample, run_theirs(scheduler, 10, 0, inpaint=inpaint)[0])
