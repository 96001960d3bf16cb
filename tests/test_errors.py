"""Bad input gets a typed error before any heavy work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import latentkit


@pytest.fixture(scope="module")
def pipe(sd1_path: Path) -> Any:
    return latentkit.load_pipeline(sd1_path, device="cpu", progress=False)


@pytest.fixture
def no_heavy_work(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the text encoder or the UNet runs."""

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("heavy work ran before the argument check")

    monkeypatch.setattr(type(pipe.unet), "forward", boom)
    monkeypatch.setattr(type(pipe.text), "encode", boom)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(height=31), "height must be a positive multiple of 2"),
        (dict(width=0), "width must be a positive multiple of 2"),
        (dict(steps=0), "steps must be an int ≥ 1"),
        (dict(num_images=0), "num_images"),
        (dict(output_type="jpeg"), "output_type must be one of"),
        (dict(seed=[1, 2]), "one per image"),
        (dict(guidance_rescale=2.0), "guidance_rescale"),
        (dict(negative_prompt=["a", "b"]), "negative prompts"),
    ],
)
def test_bad_arguments(pipe: Any, no_heavy_work: None, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match) as info:
        pipe.generate("a cat", progress=False, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, latentkit.LatentkitError)


def test_unknown_scheduler_lists_valid_names(pipe: Any, no_heavy_work: None) -> None:
    with pytest.raises(latentkit.UnknownNameError) as info:
        pipe.generate("a cat", scheduler="warp-drive", progress=False)
    for name in ("ddim", "dpm-solver++", "pndm"):
        assert name in str(info.value)
    with pytest.raises(latentkit.UnknownNameError, match="eta"):
        pipe.generate("a cat", scheduler=latentkit.schedulers.create("ddim", etaa=1.0))


def test_bad_device_and_dtype() -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match="dtype"):
        latentkit.load_pipeline("./whatever", dtype="int8")
    with pytest.raises(latentkit.InvalidArgumentError, match="device"):
        latentkit.load_pipeline("./whatever", device="quantum")


def test_vae_factor_in_message_for_a_real_sized_model(pipe: Any, no_heavy_work: None) -> None:
    # The tiny VAE has factor 2; Stable Diffusion's has 8. The message names it and suggests a fix.
    with pytest.raises(latentkit.InvalidArgumentError, match=r"factor.*try 32"):
        pipe.generate("a cat", height=33, progress=False)
