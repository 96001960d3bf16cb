"""Properties every registered scheduler has, over its options (hypothesis).

Written over ``latentkit.schedulers.names()``, so a new registration is covered without
touching this file: timesteps are decreasing training timesteps, samples stay finite, shape
and dtype are preserved, and one scheduler object serves several threads at once.
"""

from __future__ import annotations

import threading
import typing
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentkit import schedulers
from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Scheduler

NAMES = schedulers.names()
SD: dict[str, Any] = {
    # Stable Diffusion's training schedule, as its scheduler_config.json gives it.
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}
SHAPE = (2, 4, 8, 8)
PATTERN = torch.linspace(-1, 1, 4 * 8 * 8).reshape(1, 4, 8, 8)

# Families whose timestep lists repeat on purpose, and why; the others strictly decrease.
REPEATS = {
    "heun": "the correction of each step evaluates at the next step's timestep, so every inner timestep is listed twice",
    "pndm": "the Runge-Kutta warm-up evaluates midpoints twice, and PLMS's pseudo improved Euler the second timestep",
    "dpm-solver++": "rounded timesteps of close Karras sigmas may repeat, as in diffusers",
    "dpm-solver": "rounded timesteps of close Karras sigmas may repeat, as in diffusers",
    "dpm-solver++-sde": "rounded timesteps of close Karras sigmas may repeat, as in diffusers",
    "dpm-solver-singlestep": "rounded timesteps of close Karras sigmas may repeat, as in diffusers",
    "unipc": "rounded timesteps of close Karras sigmas may repeat, as in diffusers",
}

# Samplers whose timesteps rise again on purpose, and why; between the rises they never increase.
RISES = {
    "restart": "each restart goes back up to s_max (between restarts, Heun's repeats)",
}

# Samplers with two evaluations per step (every second timestep a midpoint's): the midpoint
# timestep lies between its step's two up to their rounding to integers (Karras timesteps of
# the KDPM2 classes, as diffusers rounds them, may repeat too) and to float32 (an ancestral
# midpoint sqrt(sigma * sigma_down) is sigma_next itself when eta = 1).
TWO_STAGE = {"dpm2", "dpm2-ancestral", "dpm-solver++-2s-ancestral", "dpm-solver++-2s-sde"}


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A simple deterministic stand-in for a network: smooth in ``x`` and ``t``."""
    return 0.1 * x + torch.sin(t.float() / 100).to(x.dtype) * PATTERN[:, : x.shape[1]].to(x.dtype)


def choices(name: str, option: str) -> tuple[Any, ...]:
    """The values a Literal-typed option of scheduler ``name`` accepts (empty if it has none)."""
    cls = schedulers.registry[name]
    if option not in schedulers.options(name):
        return ()
    hint = typing.get_type_hints(cls).get(option)
    return tuple(v for v in typing.get_args(hint) if isinstance(v, str))


@st.composite
def configured(draw: st.DrawFn, names: list[str] = NAMES) -> Scheduler:
    """A registered scheduler on Stable Diffusion's betas with drawn options."""
    name = draw(st.sampled_from(names))
    accepted = set(schedulers.options(name))
    opts = {k: v for k, v in SD.items() if k in accepted}
    for option in ("timestep_spacing", "prediction_type"):
        values = choices(name, option)
        if values:
            opts[option] = draw(st.sampled_from(values))
    if "use_karras_sigmas" in accepted:
        opts["use_karras_sigmas"] = draw(st.booleans())
    if "skip_prk_steps" in accepted:
        opts["skip_prk_steps"] = draw(st.booleans())
    return schedulers.create(name, **opts)


def timesteps_or_refusal(scheduler: Scheduler, steps: int) -> torch.Tensor | None:
    """The timesteps, or None where the scheduler refuses the combination with a message."""
    try:
        return scheduler.timesteps(steps)
    except InvalidArgumentError as e:
        # Documented refusals: PNDM's Runge-Kutta warm-up under 4 steps; leading spacing
        # that repeats a timestep or reaches past the last training step.
        assert "steps" in str(e) or "spacing" in str(e), str(e)
        return None


@settings(max_examples=80, deadline=None)
@given(scheduler=configured(), steps=st.integers(1, 100))
def test_timesteps_are_decreasing_training_timesteps(scheduler: Scheduler, steps: int) -> None:
    timesteps = timesteps_or_refusal(scheduler, steps)
    if timesteps is None:
        return
    name = type(scheduler).name
    assert timesteps.ndim == 1 and len(timesteps) >= 1
    assert torch.isfinite(timesteps.double()).all()
    num_train = getattr(scheduler, "num_train_timesteps", 1000)
    assert timesteps.min() >= 0 and timesteps.max() < num_train, timesteps
    taken = timesteps.double().diff()
    if name in TWO_STAGE:
        # Each step's first timestep, then its midpoint's, which lies between that step's
        # two up to rounding (see TWO_STAGE).
        firsts, mids = timesteps[::2].double(), timesteps[1::2].double()
        assert (firsts.diff() <= 0).all(), f"{name}: timesteps must not increase: {timesteps}"
        assert ((mids <= firsts[:-1] + 0.5) & (mids >= firsts[1:] - 0.5)).all(), timesteps
    elif name in RISES:
        rises = int((taken > 0).sum())
        assert rises == scheduler.restarts(steps)[1], f"{name}: {timesteps}"  # type: ignore[attr-defined]
    elif name in REPEATS:
        assert (taken <= 0).all(), f"{name}: timesteps must not increase: {timesteps}"
    else:
        assert (taken < 0).all(), f"{name}: timesteps must strictly decrease: {timesteps}"


@settings(max_examples=40, deadline=None)
@given(
    scheduler=configured(),
    steps=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_samples_are_finite_and_keep_shape_and_dtype(
    scheduler: Scheduler, steps: int, dtype: torch.dtype, seed: int
) -> None:
    if timesteps_or_refusal(scheduler, steps) is None:
        return
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator).to(dtype)
    yielded = list(scheduler.sample(model, noise, steps=steps, generator=generator))
    assert len(yielded) == len(scheduler.timesteps(steps))
    assert [s.index for s in yielded] == list(range(len(yielded)))
    for step in yielded:
        assert step.sample.shape == noise.shape and step.sample.dtype == dtype
        assert torch.isfinite(step.sample).all(), f"{type(scheduler).name}: non-finite sample"


@pytest.mark.parametrize("name", NAMES)
def test_one_scheduler_serves_many_threads(name: str) -> None:
    """Threads sampling at once through one object get what each would get alone."""
    accepted = set(schedulers.options(name))
    scheduler = schedulers.create(name, **{k: v for k, v in SD.items() if k in accepted})
    steps, seeds = 6, [0, 1, 2, 3]

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(SHAPE, generator=generator)
        *_, last = scheduler.sample(model, noise, steps=steps, generator=generator)
        return last.sample

    expected = [run(seed) for seed in seeds]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(seeds))

    def worker(seed: int) -> None:
        barrier.wait()  # start together, so the loops interleave
        for _ in range(3):
            results[seed] = run(seed)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, sample in zip(seeds, expected, strict=True):
        assert torch.equal(results[seed], sample), f"{name}: thread with seed {seed} differs"
