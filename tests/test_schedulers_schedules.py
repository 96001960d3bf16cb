"""A1111's schedule types (``schedule=``) on every sigma-based sampler.

Each schedule function against its closed form or published table; every sigma-based
registration runs with every schedule; where diffusers has the same combination (Euler with
custom sigmas, Karras and exponential flags) the result equals it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from test_schedulers import SD15_PNDM_CONFIG, SD_BETAS, SHAPE, DummyModel, relative_error

from latentkit import schedulers
from latentkit.cli import main
from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Scheduler
from latentkit.schedulers.common import (
    ALIGN_YOUR_STEPS,
    TabulatedSigmas,
    align_your_steps_sigmas,
    sgm_uniform_sigmas,
    sigma_table,
    sigma_to_t,
    t_to_sigma,
)
from latentkit.schedulers.dpm_solver import LogSNRSolver

diffusers = pytest.importorskip("diffusers")
from diffusers import EulerDiscreteScheduler  # noqa: E402
from diffusers.schedulers.scheduling_utils import AysSchedules  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SCHEDULES = ("karras", "exponential", "sgm_uniform", "align_your_steps", "align_your_steps_sdxl")
SIGMA_BASED = [
    name for name in schedulers.names() if issubclass(schedulers.registry[name], TabulatedSigmas)
]
SD_TABLE = sigma_table(schedulers.create("euler", **SD_BETAS).alphas_cumprod)  # type: ignore[attr-defined]

# As NVIDIA's Align Your Steps "how to" page publishes them (10 steps, 11 noise levels), and
# A1111's modules/sd_schedulers.py carries them.
PUBLISHED = {
    "align_your_steps": [
        14.615,
        6.475,
        3.861,
        2.697,
        1.886,
        1.396,
        0.963,
        0.652,
        0.399,
        0.152,
        0.029,
    ],
    "align_your_steps_sdxl": [
        14.615,
        6.315,
        3.771,
        2.181,
        1.342,
        0.862,
        0.555,
        0.380,
        0.234,
        0.113,
        0.029,
    ],
}


def boundaries(scheduler: Scheduler, steps: int) -> torch.Tensor:
    """The step boundaries without the final sigma (one per step, whatever the evaluations)."""
    return scheduler._schedule(steps)[1][:-1]  # type: ignore[attr-defined,no-any-return]


# --------------------------------------------------------------------------- the functions


def test_align_your_steps_tables_are_the_published_ones() -> None:
    assert {k: list(v) for k, v in ALIGN_YOUR_STEPS.items()} == PUBLISHED
    # 10 steps: the table's first 10 levels, then 0: diffusers' AysSchedules exactly.
    for key, theirs in (
        ("align_your_steps", "StableDiffusionSigmas"),
        ("align_your_steps_sdxl", "StableDiffusionXLSigmas"),
    ):
        ours = align_your_steps_sigmas(ALIGN_YOUR_STEPS[key], 10)
        assert [*ours.tolist(), 0.0] == AysSchedules[theirs]


@pytest.mark.parametrize("count", [1, 2, 5, 9, 11, 20, 32])
@pytest.mark.parametrize("key", sorted(ALIGN_YOUR_STEPS))
def test_align_your_steps_resamples_log_linearly(count: int, key: str) -> None:
    # count + 1 levels at evenly spaced positions of the table, log sigma linear between its
    # entries; the last (the smallest sigma) gives way to the sampler's final 0.
    table = ALIGN_YOUR_STEPS[key]
    expected = []
    for j in range(count):
        position = j / count * (len(table) - 1)
        k = min(int(position), len(table) - 2)
        w = position - k
        expected.append(math.exp((1 - w) * math.log(table[k]) + w * math.log(table[k + 1])))
    ours = align_your_steps_sigmas(table, count)
    assert ours.tolist() == pytest.approx(expected, rel=1e-12)
    assert ours[0] == pytest.approx(table[0], rel=1e-12)
    assert (np.diff(ours) < 0).all()


@pytest.mark.parametrize("count", [1, 2, 7, 10, 50])
def test_sgm_uniform_is_evenly_spaced_in_timestep(count: int) -> None:
    # sgm's / A1111's "SGM Uniform": count + 1 timesteps evenly spaced from t(sigma_max) to
    # t(sigma_min), the last dropped; sigma between training steps log-linearly interpolated.
    sigma_min, sigma_max = float(SD_TABLE[0]), float(SD_TABLE[-1])
    ours = sgm_uniform_sigmas(sigma_min, sigma_max, count, table=SD_TABLE)
    log_table = np.log(SD_TABLE.astype(np.float64))
    t_max, t_min = sigma_to_t(np.array([sigma_max, sigma_min]), log_table)
    assert (t_max, t_min) == (999, 0)
    timesteps = [t_max - j * (t_max - t_min) / count for j in range(count)]
    expected = np.exp(np.interp(timesteps, np.arange(1000), log_table))
    assert ours.tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert ours[0] == pytest.approx(sigma_max, rel=1e-6)
    # Within the table's range: from sigma_max down to one stride above sigma_min.
    assert ours[-1] > sigma_min
    # Narrower ends stay inside them.
    inner = sgm_uniform_sigmas(0.5, 5.0, count, table=SD_TABLE)
    assert inner[0] == pytest.approx(5.0, rel=1e-6) and inner[-1] > 0.5


def test_t_to_sigma_inverts_sigma_to_t() -> None:
    log_table = np.log(SD_TABLE)
    t = np.random.default_rng(0).uniform(0, 999, 200)
    assert sigma_to_t(t_to_sigma(t, log_table), log_table) == pytest.approx(t, abs=1e-6)
    assert t_to_sigma(np.array([0.0, 999.0]), log_table) == pytest.approx(
        [SD_TABLE[0], SD_TABLE[-1]], rel=1e-6
    )


# --------------------------------------------------------------------------- the option


def test_labels_and_values() -> None:
    euler = schedulers.create("euler", schedule="sgm_uniform")
    for label in ("SGM Uniform", "SGMUniform", "sgm-uniform"):
        assert schedulers.create("euler", schedule=label) == euler
    assert schedulers.create("euler", schedule="Align Your Steps").schedule == "align_your_steps"  # type: ignore[attr-defined]
    assert schedulers.create("euler", schedule="Automatic") == schedulers.create("euler")
    with pytest.raises(InvalidArgumentError, match="sgm_uniform"):
        schedulers.create("euler", schedule="polyexponential")


@pytest.mark.parametrize(
    "name", [n for n in SIGMA_BASED if "use_karras_sigmas" in schedulers.options(n)]
)
def test_karras_and_exponential_are_diffusers_flags(name: str) -> None:
    # schedule="karras" is use_karras_sigmas=True, so diffusers' tested combination; the
    # schedule replaces the flags a config or an alias preset brought.
    assert schedulers.create(name, schedule="karras") == schedulers.create(
        name, use_karras_sigmas=True
    )
    assert schedulers.create(name, schedule="Exponential") == schedulers.create(
        name, use_exponential_sigmas=True
    )
    assert schedulers.create(name, use_karras_sigmas=True, schedule="exponential") == (
        schedulers.create(name, use_exponential_sigmas=True)
    )
    config = schedulers.create(name, schedule="sgm_uniform").to_config()
    assert config["schedule"] == "sgm_uniform" and config["use_karras_sigmas"] is False
    assert "schedule" not in schedulers.create(name, schedule="karras").to_config()


def test_schedule_survives_config_round_trips_and_model_configs() -> None:
    chosen = schedulers.create("DPM++ 2M", schedule="align_your_steps")
    fitted = schedulers.for_model(chosen, SD15_PNDM_CONFIG)
    assert fitted.schedule == "align_your_steps"  # type: ignore[attr-defined]
    assert fitted.beta_schedule == "scaled_linear"  # type: ignore[attr-defined]
    assert schedulers.from_config(fitted.to_config()) == fitted  # type: ignore[attr-defined]
    # Euler a has no diffusers flags: Karras lives in the schedule option.
    assert schedulers.create("Euler a", schedule="karras").to_config()["schedule"] == "karras"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "schedule"), list(itertools.product(SIGMA_BASED, SCHEDULES)))
def test_every_sigma_based_sampler_runs_every_schedule(name: str, schedule: str) -> None:
    kwargs: dict[str, Any] = (
        {"noise_sampler_seed": 0} if "noise_sampler_seed" in schedulers.options(name) else {}
    )
    if name == "dpm-solver":
        kwargs["final_sigmas_type"] = "sigma_min"  # as diffusers requires for this algorithm
    scheduler = schedulers.create(name, **SD_BETAS, schedule=schedule, **kwargs)
    plain = schedulers.create(name, **SD_BETAS, **kwargs)
    log_table = np.log(SD_TABLE)
    for steps in (1, 2, 5, 10):
        # The step boundaries are the schedule's, between the ends Karras sigmas take in
        # diffusers: the table's for the DPM-Solver family and UniPC, else those of the
        # spaced timesteps (the whole table with linspace spacing, but for 1 step).
        if isinstance(scheduler, LogSNRSolver):
            sigma_min, sigma_max = float(SD_TABLE[0]), float(SD_TABLE[-1])
        else:
            ends = boundaries(plain, steps)
            sigma_min, sigma_max = float(ends[-1]), float(ends[0])
        if schedule in ALIGN_YOUR_STEPS:
            expected = align_your_steps_sigmas(ALIGN_YOUR_STEPS[schedule], steps)
        elif schedule == "sgm_uniform":
            expected = sgm_uniform_sigmas(sigma_min, sigma_max, steps, table=SD_TABLE)
        elif schedule == "karras":
            ramp = np.linspace(0, 1, steps)
            expected = (
                sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))
            ) ** 7
        else:
            expected = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))
        assert boundaries(scheduler, steps).tolist() == pytest.approx(expected.tolist(), rel=1e-6)
        # The network is asked at the matching training timesteps (integers for the
        # DPM-Solver family and UniPC: truncated for exponential sigmas as in diffusers,
        # else rounded; fractional for the others).
        firsts = scheduler.timesteps(steps)
        if scheduler.evaluations_per_step == 2:  # type: ignore[attr-defined]
            firsts = firsts[::2]  # Heun and the two-stage samplers: each step's first
        exact = sigma_to_t(expected, log_table)
        assert firsts.double().numpy() == pytest.approx(exact, abs=1)
        generator = torch.Generator().manual_seed(steps)
        noise = torch.randn(SHAPE, generator=generator)
        run = list(scheduler.sample(DummyModel(), noise, steps=steps, generator=generator))
        assert len(run) == len(scheduler.timesteps(steps))
        assert torch.isfinite(run[-1].sample).all()


# --------------------------------------------------------------------------- against diffusers


def euler_with_sigmas(sigmas: list[float], model: DummyModel) -> torch.Tensor:
    """diffusers' Euler given the sigmas (with the final 0), driven as its pipeline does."""
    theirs = EulerDiscreteScheduler(**SD_BETAS)
    theirs.set_timesteps(sigmas=sigmas)
    generator = torch.Generator().manual_seed(0)
    latents = randn_tensor(SHAPE, generator=generator) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        output = model(theirs.scale_model_input(latents, t), t)
        latents = theirs.step(output, t, latents, generator=generator, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("schedule", ["sgm_uniform", "align_your_steps", "align_your_steps_sdxl"])
def test_euler_with_a1111_schedules_equals_diffusers_euler_given_those_sigmas(
    schedule: str,
) -> None:
    scheduler = schedulers.create("euler", **SD_BETAS, schedule=schedule)
    for steps in (1, 4, 10, 25):
        sigmas = scheduler.sigmas(steps)  # type: ignore[attr-defined]
        their_model, our_model = DummyModel(), DummyModel()
        theirs = euler_with_sigmas(sigmas.tolist(), their_model)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(SHAPE, generator=generator)
        *_, last = scheduler.sample(our_model, noise, steps=steps, generator=generator)
        assert relative_error(last.sample, theirs) <= 1e-5, steps
        # diffusers finds the timesteps of the float32 sigmas, latentkit of the float64 ones.
        ours_t = torch.stack(our_model.timesteps).double()
        theirs_t = torch.stack(their_model.timesteps).double()
        assert ours_t.numpy() == pytest.approx(theirs_t.numpy(), abs=1e-3)


def test_aliases_are_listed_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedulers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line.split(maxsplit=1)[1:] for line in lines}
    assert by_name["dpm2"] == ["DPM2, DPM2 Karras"]
    assert by_name["dpm2-ancestral"] == ["DPM2 a, DPM2 a Karras"]
    assert by_name["dpm-solver++-2s-sde"] == ["DPM++ SDE, DPM++ SDE Karras"]
    assert by_name["dpm-solver++-2s-ancestral"] == ["DPM++ 2S a, DPM++ 2S a Karras"]
    assert schedulers.create("dpm++_2s_a_karras") == schedulers.create(
        "dpm-solver++-2s-ancestral", schedule="karras"
    )
