"""AUTOMATIC1111 sampler labels as scheduler names."""

from __future__ import annotations

from typing import Any

import pytest

from latentkit import schedulers

SD15: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
ALIASES = sorted(schedulers.A1111_ALIASES)


def test_every_alias_names_a_registration_and_valid_options() -> None:
    for alias, (name, preset) in schedulers.A1111_ALIASES.items():
        assert name in schedulers.names(), f"{alias!r} points at unregistered {name!r}"
        assert set(preset) <= set(schedulers.options(name)), alias


@pytest.mark.parametrize("alias", ALIASES)
def test_alias_creates_its_scheduler_with_the_preset(alias: str) -> None:
    name, preset = schedulers.A1111_ALIASES[alias]
    assert schedulers.create(alias) == schedulers.create(name, **preset)
    # As generate(..., scheduler=alias) resolves it: over the model's scheduler config.
    assert schedulers.create(alias, config=SD15) == schedulers.create(name, config=SD15, **preset)
    # A scheduler object made from an alias takes the rest from the model, like a name.
    fitted = schedulers.for_model(schedulers.create(alias), SD15)
    assert fitted == schedulers.create(name, config=SD15, **preset)
    assert alias in schedulers.aliases(name)


def test_dpm_2m_karras() -> None:
    assert schedulers.create("DPM++ 2M Karras") == schedulers.create(
        "dpm-solver++", use_karras_sigmas=True
    )
    # Labels match like names: case, spaces, dashes and underscores do not matter.
    assert schedulers.create("dpm++_2m_karras") == schedulers.create("DPM++ 2M Karras")
    # Explicit options win over the alias's preset.
    assert schedulers.create("DPM++ 2M Karras", use_karras_sigmas=False) == schedulers.create(
        "dpm-solver++"
    )


def test_euler_a_resolves_like_a_name() -> None:
    scheduler = schedulers.create("Euler a", config=SD15)
    assert type(scheduler).name == "euler-ancestral"
    assert scheduler.to_config()["beta_schedule"] == "scaled_linear"
    assert schedulers.aliases("euler-ancestral") == ["Euler a"]
