"""diffusers' ``timesteps=`` / ``sigmas=`` (issue 18): a call whose schedule is exactly the
given values. The schedules against diffusers' ``set_timesteps(timesteps=/sigmas=)``
(timesteps equal, sigmas ≤ 1e-6), whole runs against ``StableDiffusionPipeline(...,
timesteps=/sigmas=)`` on the tiny SD 1.x model (≤ 1e-4 on fp32 images), and the refusals,
raised before any network runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import SD15_SCHEDULER

import latentkit
from latentkit import schedulers
from latentkit.schedulers.custom import accepting, with_schedule

TOL = 1e-4
SIZE = 32
# Align Your Steps' published 10-step SD 1.5 noise levels (diffusers' AysSchedules
# "StableDiffusionSigmas"): the schedule of a call whose final noise level is 0.
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]
TIMESTEPS = [999, 850, 640, 420, 250, 101, 20]

# (our name, diffusers class, what it takes)
CASES = [
    ("euler", "EulerDiscreteScheduler", "timesteps"),
    ("euler", "EulerDiscreteScheduler", "sigmas"),
    ("dpm-solver++", "DPMSolverMultistepScheduler", "timesteps"),
    ("dpm-solver-singlestep", "DPMSolverSinglestepScheduler", "timesteps"),
    ("ddpm", "DDPMScheduler", "timesteps"),
    ("heun", "HeunDiscreteScheduler", "timesteps"),
]


def _values(kind: str) -> list[float]:
    return AYS_SD15 if kind == "sigmas" else [float(t) for t in TIMESTEPS]


def _theirs(class_name: str) -> Any:
    import diffusers

    return getattr(diffusers, class_name).from_config(SD15_SCHEDULER)


@pytest.mark.parametrize(("name", "class_name", "kind"), CASES)
def test_schedule_is_diffusers_set_timesteps(name: str, class_name: str, kind: str) -> None:
    theirs = _theirs(class_name)
    theirs.set_timesteps(**{kind: _values(kind)})
    ours = with_schedule(schedulers.create(name, config=SD15_SCHEDULER), **{kind: _values(kind)})
    steps = len(TIMESTEPS) if kind == "timesteps" else len(AYS_SD15) - 1
    assert torch.equal(ours.timesteps(steps).to(theirs.timesteps.dtype), theirs.timesteps)
    if hasattr(theirs, "sigmas") and name != "ddpm":
        assert torch.allclose(ours.sigmas(steps), theirs.sigmas.float(), rtol=0, atol=1e-6)
    # The scheduler is an ordinary one otherwise: its config is the model's, unchanged.
    assert "custom_schedule" not in ours.to_config()


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(sd1_path: Path) -> Any:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd1_path), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("name", "class_name", "kind"), CASES)
def test_generate_matches_diffusers(
    sd1: Any, reference: Any, name: str, class_name: str, kind: str
) -> None:
    import diffusers

    scheduler = getattr(diffusers, class_name).from_config(reference.scheduler.config)
    theirs = diffusers.StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler})
    theirs.set_progress_bar_config(disable=True)
    values = _values(kind)
    expected = theirs(
        "a cat",
        height=SIZE,
        width=SIZE,
        output_type="np",
        generator=torch.Generator().manual_seed(5),
        **{kind: values},
    ).images
    got = sd1.generate(
        "a cat",
        scheduler=name,
        seed=5,
        height=SIZE,
        width=SIZE,
        output_type="np",
        progress=False,
        **{kind: values},
    )
    assert np.abs(got.images - expected).max() <= TOL
    # steps follows from the values; giving the same count is accepted.
    assert got.parameters[0].steps == (len(values) - (kind == "sigmas"))
    plain = sd1.generate(
        "a cat",
        scheduler=name,
        seed=5,
        height=SIZE,
        width=SIZE,
        output_type="np",
        progress=False,
        steps=got.parameters[0].steps,
    )
    assert np.abs(plain.images - got.images).max() > 1e-3  # the values were used


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(scheduler="pndm", timesteps=[999, 500]),
            "pndm does not take custom timesteps.*euler",
        ),
        (dict(scheduler="ddim", timesteps=[999, 500]), "ddim does not take custom timesteps"),
        (dict(scheduler="dpm-solver++", sigmas=AYS_SD15), "schedulers that do: euler$"),
        (dict(scheduler="euler", timesteps=[999, 500], sigmas=[3.0, 0.0]), "not both"),
        (dict(scheduler="euler", timesteps=[999, 500], steps=3), "steps=3 disagrees"),
        (dict(scheduler="euler", timesteps=[500, 999]), "strictly descending"),
        (dict(scheduler="euler", timesteps=[999, 500, 500]), "strictly descending"),
        (dict(scheduler="euler", timesteps=[999.5, 500]), "whole numbers"),
        (dict(scheduler="euler", timesteps=[]), "at least 1"),
        (dict(scheduler="euler", sigmas=[14.0]), "at least 2"),
        (dict(scheduler="euler", sigmas=[3.0, float("nan")]), "finite numbers"),
        (dict(scheduler="euler", sigmas=[3.0, -1.0]), "≥ 0"),
        (dict(scheduler="euler", timesteps="999"), "finite numbers"),
        (dict(scheduler="euler", timesteps=[1000, 500]), "past the last training step 999"),
        (dict(scheduler="euler", sigmas=[20.0, 0.0]), "above the largest trained noise level"),
        (
            dict(scheduler=schedulers.create("euler", use_karras_sigmas=True), timesteps=[9, 1]),
            "do not go with the karras schedule",
        ),
    ],
)
def test_refusals_come_before_any_network(
    sd1: Any, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], match: str
) -> None:
    def boom(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a network ran")

    monkeypatch.setattr(sd1.unet, "forward", boom)
    monkeypatch.setattr(sd1.text[0].text_encoder, "forward", boom)
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        sd1.generate("a cat", height=SIZE, width=SIZE, progress=False, **kwargs)


def test_accepting_follows_diffusers_set_timesteps() -> None:
    import inspect

    import diffusers

    for kind in ("timesteps", "sigmas"):
        for name in accepting(kind):  # type: ignore[arg-type]
            cls = schedulers.registry[name]
            for class_name in cls.diffusers_names:  # type: ignore[attr-defined]
                params = inspect.signature(getattr(diffusers, class_name).set_timesteps).parameters
                assert kind in params, (name, class_name)
    assert accepting("sigmas") == ["euler"]


def test_tensor_and_array_values(sd1: Any) -> None:
    a = latentkit.Request.create("x", sigmas=torch.tensor(AYS_SD15, dtype=torch.float64))
    b = latentkit.Request.create("x", sigmas=np.array(AYS_SD15))
    assert a.sigmas == b.sigmas == tuple(AYS_SD15)
