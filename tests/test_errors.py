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
    monkeypatch.setattr(type(pipe.text[0]), "encode_tokens", boom)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(height=31), "height must be a positive multiple of 2"),
        (dict(width=0), "width must be an int ≥ 1"),
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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(guidance_scale="7"), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(num_images=True), "num_images"),
        (dict(steps=2.0), "steps"),
        (dict(seed=2**70), "seed must be an int"),
        (dict(seed=[1.5]), "seed must be an int"),
    ],
)
def test_bad_scalars_fail_before_the_text_encoder(
    pipe: Any, no_heavy_work: None, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        pipe.generate("a cat", progress=False, **kwargs)


def test_numpy_integer_seeds_are_accepted(pipe: Any) -> None:
    import numpy as np

    a = pipe.generate("a cat", steps=1, seed=np.int64(3), output_type="np", progress=False)
    b = pipe.generate("a cat", steps=1, seed=3, output_type="np", progress=False)
    assert a.seeds == [3] and np.array_equal(a.images[0], b.images[0])


def test_rgba_arrays_drop_alpha_and_bad_channel_counts_fail(pipe: Any) -> None:
    import numpy as np

    rgba = np.random.default_rng(0).random((32, 32, 4)).astype(np.float32)
    kw: dict[str, Any] = dict(steps=2, seed=1, output_type="np", progress=False)
    assert np.array_equal(
        pipe.generate("a cat", image=rgba, **kw).images[0],
        pipe.generate("a cat", image=rgba[..., :3], **kw).images[0],
    )
    with pytest.raises(latentkit.InvalidArgumentError, match="channels"):
        pipe.generate(
            "a cat",
            image=np.zeros((3, 32, 32), dtype=np.float32),
            height=32,
            width=32,
            progress=False,
        )


def test_a_loaded_pipeline_ignores_no_device_or_dtype(pipe: Any) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match="load_pipeline"):
        latentkit.generate("a cat", model=pipe, dtype="bf16")


def test_a_broken_plugin_does_not_break_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    import latentkit.registry as reg

    class Broken:
        name, value = "broken", "nowhere:Thing"

        def load(self) -> Any:
            raise ImportError("no module named nowhere")

    monkeypatch.setattr(reg, "entry_points", lambda *, group: [Broken()])
    registry: reg.Registry[Any] = reg.Registry("scheduler", "latentkit.schedulers")
    registry.add("ok", object())
    assert registry.names() == ["ok"]


def test_save_never_replaces_a_file_that_appeared_meanwhile(tmp_path: Any) -> None:
    from PIL import Image

    from latentkit.results import save_png

    target = tmp_path / "x.png"
    target.write_bytes(b"someone else's")
    with pytest.raises(latentkit.InvalidArgumentError, match="already exists"):
        save_png(Image.new("RGB", (4, 4)), target, None)
    assert target.read_bytes() == b"someone else's"


def test_png_records_the_sampler_in_a1111_terms_and_clip_skip(pipe: Any) -> None:
    result = pipe.generate(
        "a cat",
        steps=2,
        seed=1,
        scheduler="DPM++ 2M Karras",
        clip_skip=1,
        guidance_rescale=0.5,
        progress=False,
    )
    text = result.parameters[0].a1111()
    # A1111 writes the sampler and its schedule type apart, and counts clip skip from 1.
    assert (
        "Sampler: DPM++ 2M," in text
        and "Schedule type: Karras" in text
        and "Clip skip: 2" in text
        and "Guidance rescale: 0.5" in text
    )
