"""Issue 14, classes 1, 2 and 4, as attacks: the public front door (one checked `Request`),
resource limits before allocation, and NaN never returned as an image."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hardening import attack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import latentkit
from latentkit.errors import InvalidArgumentError, NonFiniteError
from latentkit.request import FIELDS, Request

GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.floats(), st.floats()),
)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(FIELDS), value=GARBAGE)
def test_any_value_for_any_keyword_is_accepted_or_a_typed_error(field: str, value: Any) -> None:
    """No keyword value ever escapes as a raw TypeError/ValueError/OverflowError."""
    options = {"prompt": "a cat", field: value}
    if field in ("prompt_embeds",):
        options.pop("prompt")
    try:
        Request.create(**options)
    except InvalidArgumentError as e:
        assert field in str(e) or "prompt" in str(e) or "image=" in str(e), str(e)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(progress="no"), ["progress"]),
        (dict(guidance_scale=1e30), ["guidance_scale"]),
        (dict(guidance_scale=math.nan), ["guidance_scale"]),
        (dict(steps=True), ["steps"]),
        (dict(steps=2.0), ["steps"]),
        (dict(num_images=10**6), ["max_images", "set_limits"]),
        (dict(height=10**6, width=10**6), ["max_pixels", "set_limits"]),
        (dict(steps=10**9), ["max_steps"]),
        (dict(prompt=42), ["prompt"]),
        (dict(prompt={"a": 1}), ["prompt"]),
        (dict(negative_prompt=[1, 2]), ["negative_prompt"]),
        (dict(stpes=4), ["stpes", "steps"]),  # a typo names the keyword it meant
        (dict(seed="7"), ["seed"]),
        (dict(original_size=(0, 5)), ["original_size"]),
        (dict(denoising_end=math.inf), ["denoising_end"]),
        (dict(prompt="(" * 32_000 + "x"), ["nests brackets"]),  # used to hang
        (dict(prompt="(red:1" + "0" * 45 + ")"), ["emphasis weight"]),
    ],
)
def test_front_door_attacks(sd1_path: Path, kwargs: dict[str, Any], names: list[str]) -> None:
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    args = {"prompt": "a cat", "progress": False, **kwargs}
    attack(lambda: pipe.generate(**args), error=InvalidArgumentError, names=names, seconds=5)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(device="xpu"), ["xpu"]),
        (dict(device="meta"), ["meta"]),
        (dict(device="cuda"), ["cuda"]),
        (dict(device=None), ["device"]),
        (dict(device=["cpu"]), ["device"]),
        (dict(dtype=None), ["dtype"]),
        (dict(dtype="int8"), ["dtype"]),
        (dict(allow_pickle="false"), ["allow_pickle"]),
        (dict(local_files_only="no"), ["local_files_only"]),
        (dict(progress=1), ["progress"]),
    ],
)
def test_load_pipeline_attacks(sd1_path: Path, kwargs: dict[str, Any], names: list[str]) -> None:
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    attack(
        lambda: latentkit.load_pipeline(sd1_path, **kwargs),
        error=InvalidArgumentError,
        names=names,
        seconds=5,
    )


def test_bytes_path_is_a_typed_error() -> None:
    attack(lambda: latentkit.load_pipeline(b"/tmp"), error=InvalidArgumentError, names=["source"])


def test_limits_can_be_raised_and_restored() -> None:
    before = latentkit.limits()
    try:
        latentkit.set_limits(max_images=10**6)
        Request(prompt="a", num_images=10**5)
        with pytest.raises(InvalidArgumentError, match="unknown limit"):
            latentkit.set_limits(max_gpus=1)
        with pytest.raises(InvalidArgumentError, match="max_pixels"):
            latentkit.set_limits(max_pixels=0)
    finally:
        latentkit.set_limits(**{k: getattr(before, k) for k in ("max_images", "max_pixels")})
    assert latentkit.limits() == before


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path, sd1_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "bomb.png"
    # A 20000x20000 1-bit PNG is tiny on disk and 400 megapixels decoded.
    Image.new("1", (20_000, 20_000)).save(path, optimize=True)
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    attack(
        lambda: pipe.generate("a cat", image=str(path), progress=False),
        error=InvalidArgumentError,
        names=["bomb.png", "max_input_pixels"],
        seconds=10,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(0, 40), closed=st.booleans())
def test_bracket_nesting_is_bounded_and_linear(depth: int, closed: bool) -> None:
    from latentkit.conditioners.text import MAX_NESTING, parse_emphasis

    prompt = "(" * depth + "x" + (")" * depth if closed else "")
    if depth > MAX_NESTING:
        with pytest.raises(InvalidArgumentError, match="nests brackets"):
            parse_emphasis(prompt)
    else:
        ((text, weight),) = parse_emphasis(prompt)
        assert text == "x" and weight == pytest.approx(1.1**depth)


def test_nan_weights_never_become_a_black_image(sd1_path: Path) -> None:
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    with torch.no_grad():
        saved = pipe.unet.conv_out.bias.clone()
        pipe.unet.conv_out.bias[0] = float("nan")
    try:
        error = attack(
            lambda: pipe.generate("a cat", steps=2, progress=False),
            error=NonFiniteError,
            names=["step 1", "conv_out.bias", "broken"],
            seconds=30,
        )
        assert isinstance(error, ArithmeticError)
    finally:
        with torch.no_grad():
            pipe.unet.conv_out.bias.copy_(saved)
    assert np.isfinite(
        np.stack(pipe.generate("a cat", steps=2, progress=False, output_type="np").images)
    ).all()


def test_half_precision_vae_overflow_is_decoded_again_in_float32(
    sd1_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", dtype="bf16", progress=False)
    reference = pipe.generate("a cat", steps=2, seed=1, progress=False, output_type="latent")
    real = type(pipe.vae).decode
    calls: list[torch.dtype] = []

    def overflowing(self: Any, latents: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls.append(latents.dtype)
        out = real(self, latents, **kw)
        return out if latents.dtype == torch.float32 else out * float("inf")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipe.vae), "decode", overflowing)
        result = pipe.generate("a cat", steps=2, seed=1, progress=False, output_type="np")
    assert calls == [torch.bfloat16, torch.float32]
    assert np.isfinite(result.images[0]).all()
    assert "decoding again in float32" in caplog.text
    assert len(reference.images) == 1


def test_cli_writes_no_png_for_nan(
    sd1_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from latentkit.cli import main
    from latentkit.models.unet import UNet2DCondition

    real = UNet2DCondition.forward

    def poisoned(self: Any, *args: Any, **kw: Any) -> torch.Tensor:
        return real(self, *args, **kw) * float("nan")

    monkeypatch.setattr(UNet2DCondition, "forward", poisoned)
    out = tmp_path / "nan.png"
    code = main(
        ["generate", "a cat", "-o", str(out), "--model", str(sd1_path), "--steps", "2", "-q"]
    )
    assert code == 2 and not out.exists()
