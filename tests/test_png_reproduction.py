"""PNGs that regenerate their image (issue 18, "PNG metadata that reproduces the image").

Every ``generate`` keyword that changes the pixels is in the ``parameters`` text or named in
`NOT_RECORDED`. Each recorded one is written into a PNG, read back with ``from_png`` and
regenerated through ``to_options`` (and the CLI's ``--params-from``) to identical pixels; a
regeneration without it differs, so each case shows the option was needed and restored.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import latentkit
from latentkit.cli import main
from latentkit.conditioners.control import a1111_model
from latentkit.errors import InvalidArgumentError
from latentkit.request import FIELDS
from latentkit.results import (
    _CORE_FIELDS,
    NOT_RECORDED,
    RECORDED_OPTIONS,
    GenerationParameters,
)

BASE: dict[str, Any] = dict(prompt="a cat", negative_prompt="blurry", steps=4, seed=1)
CONTROL_KEYWORDS = {"control_scale", "control_start", "control_end", "guess_mode"}
CORE_KEYWORDS = {
    "prompt",
    "negative_prompt",
    "steps",
    "scheduler",
    "guidance_scale",
    "seed",
    "height",
    "width",
    "strength",
    "clip_skip",
    "guidance_rescale",
}


def picture(size: tuple[int, int] = (16, 16), seed: int = 0) -> Image.Image:
    """A smooth random picture (width, height = size)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(size[1] // 4, 1), max(size[0] // 4, 1), 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def lines(size: tuple[int, int] = (16, 16), seed: int = 0) -> Image.Image:
    """A control image: white strokes on black."""
    rng = np.random.default_rng(100 + seed)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[rng.integers(size[1]), :] = 255
    array[:, rng.integers(size[0])] = 255
    return Image.fromarray(array)


def half_mask(size: tuple[int, int] = (16, 16)) -> Image.Image:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[:, size[0] // 2 :] = 255
    return Image.fromarray(array)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def regenerates(
    pipe: latentkit.LatentDiffusion,
    tmp_path: Path,
    inputs: dict[str, Any],
    option: dict[str, Any],
    *,
    base: dict[str, Any] = BASE,
) -> GenerationParameters:
    """Generate with ``option``, save the PNG, regenerate from it: the same pixels; and
    without ``option``: other pixels. Returns the parameters read back."""
    result = pipe.generate(**base, **option, **inputs, progress=False)
    path = result.save(tmp_path / "made.png", overwrite=True)[0]
    params = GenerationParameters.from_png(path)
    options = params.to_options()
    for name, value in option.items():  # read back exactly, not merely close
        assert _listed(options[name]) == _listed(value), name
    again = pipe.generate(**options, **inputs, progress=False)
    assert np.array_equal(pixels(again.images[0]), pixels(Image.open(path)))
    plain = pipe.generate(**base, **inputs, progress=False)
    assert not np.array_equal(pixels(plain.images[0]), pixels(Image.open(path))), (
        f"{option} does not change this image: the case proves nothing"
    )
    return params


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", progress=False)


def test_every_keyword_is_recorded_or_said_not_to_be() -> None:
    recorded = {name for name, _, _ in RECORDED_OPTIONS}
    parts = [CORE_KEYWORDS, recorded, CONTROL_KEYWORDS, {"prompt_syntax"}, set(NOT_RECORDED)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)), "a keyword in two places"
    assert set().union(*parts) == set(FIELDS)
    keys = [key for _, key, _ in RECORDED_OPTIONS]
    assert len(set(keys)) == len(keys) and not set(keys) & _CORE_FIELDS


@pytest.mark.parametrize(
    "option",
    [
        dict(guidance_interval=(1.0, math.inf)),
        dict(feature_cache=2),
        dict(scheduler="euler", timesteps=[999, 700, 400, 100]),
        dict(scheduler="euler", sigmas=[14.6, 4.0, 1.25, 0.3, 0.0]),
        dict(denoising_end=0.6),
        dict(prompt="a (red:1.5) cat", prompt_syntax="plain"),
    ],
    ids=["guidance_interval", "feature_cache", "timesteps", "sigmas", "denoising_end", "plain"],
)
def test_text_to_image_options_regenerate(
    sd1: latentkit.LatentDiffusion, tmp_path: Path, option: dict[str, Any]
) -> None:
    base = {**BASE, "prompt": option.get("prompt", BASE["prompt"])}
    base.update({k: v for k, v in option.items() if k == "scheduler"})
    rest = {k: v for k, v in option.items() if k not in ("prompt", "scheduler")}
    if "timesteps" in rest or "sigmas" in rest:
        del base["steps"]  # the values' count
    params = regenerates(sd1, tmp_path, {}, rest, base=base)
    assert params.input_images == ()


def test_prompt_syntax_plain_is_a1111s_emphasis_none(sd1: latentkit.LatentDiffusion) -> None:
    params = sd1.generate("a (b:1.2)", steps=1, prompt_syntax="plain", progress=False)
    assert "Emphasis: None" in params.parameters[0].a1111()
    text = "x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8, Emphasis: None"
    assert GenerationParameters.from_a1111(text).to_options()["prompt_syntax"] == "plain"
    original = text.replace("None", "Original")
    assert "prompt_syntax" not in GenerationParameters.from_a1111(original).to_options()


@pytest.mark.parametrize(
    "option",
    [
        dict(strength=0.55),
        dict(denoising_start=0.5),
        dict(outpaint=(8, 0, 0, 8)),
    ],
    ids=["strength", "denoising_start", "outpaint"],
)
def test_image_options_regenerate_with_the_picture(
    sd1: latentkit.LatentDiffusion, tmp_path: Path, option: dict[str, Any]
) -> None:
    params = regenerates(sd1, tmp_path, {"image": picture()}, option)
    assert params.input_images == ("image",)
    if "outpaint" in option:  # the canvas follows the picture: no size keywords
        assert "width" not in params.to_options() and (params.width, params.height) == (24, 24)


def test_inpainting_says_a_mask_was_used(sd1: latentkit.LatentDiffusion, tmp_path: Path) -> None:
    inputs = {"image": picture(), "mask_image": half_mask()}
    result = sd1.generate(**BASE, **inputs, progress=False)
    path = result.save(tmp_path / "inpainted.png")[0]
    params = GenerationParameters.from_png(path)
    assert dict(params.extras)["Mask blur"] == "0"
    assert params.input_images == ("image", "mask_image")
    again = sd1.generate(**params.to_options(), **inputs, progress=False)
    assert np.array_equal(pixels(again.images[0]), pixels(Image.open(path)))


def test_controlnet_settings_regenerate(
    sd1: latentkit.LatentDiffusion, sd1_controlnet_path: Path, tmp_path: Path
) -> None:
    pipe = sd1.with_controlnet(sd1_controlnet_path)
    option = dict(control_scale=0.6, control_start=0.25, control_end=0.75, guess_mode=True)
    params = regenerates(pipe, tmp_path, {"control_image": lines()}, option)
    assert params.input_images == ("control_image",)
    (unit,) = params.controlnets()
    weights = (sd1_controlnet_path / "diffusion_pytorch_model.safetensors").read_bytes()
    short = hashlib.sha256(weights[0x100000:0x110000]).hexdigest()[:8]  # A1111's model_hash
    assert unit["Model"] == f"{sd1_controlnet_path.name} [{short}]"
    assert (unit["Control Mode"], unit["Resize Mode"]) == (
        "ControlNet is more important",
        "Just Resize",
    )
    # A1111's quote(): the unit holds "," and ":", so the field is one JSON string.
    assert 'ControlNet 0: "Module: none, Model: ' in params.a1111()


def test_several_controlnets_regenerate(
    sd1: latentkit.LatentDiffusion, sd1_controlnet_path: Path, tmp_path: Path
) -> None:
    pipe = sd1.with_controlnet(sd1_controlnet_path).with_controlnet(sd1_controlnet_path)
    option = dict(control_scale=[0.5, 1.5], control_end=[1.0, 0.5])
    params = regenerates(pipe, tmp_path, {"control_image": [lines(), lines(seed=1)]}, option)
    assert len(params.controlnets()) == 2


def test_a_scale_left_to_the_task_default_is_written_as_used(
    sd1: latentkit.LatentDiffusion, sd1_controlnet_path: Path
) -> None:
    pipe = sd1.with_controlnet(sd1_controlnet_path)
    made = pipe.generate(**BASE, image=picture(), control_image=lines(), progress=False)
    options = made.parameters[0].to_options()
    assert options["control_scale"] == 0.8  # diffusers' image-to-image default
    with pytest.raises(InvalidArgumentError, match="control_image"):
        pipe.generate(**options, image=picture(), progress=False)


def test_upscaler_noise_level_regenerates(upscale_path: Path, tmp_path: Path) -> None:
    pipe = latentkit.load_pipeline(upscale_path, device="cpu", progress=False)
    base = {**BASE, "steps": 3}
    params = regenerates(
        pipe, tmp_path, {"image": picture((8, 8))}, dict(noise_level=80), base=base
    )
    assert params.input_images == ("image",) and "height" not in params.to_options()


def test_sdxl_second_prompts_and_micro_conditioning_regenerate(
    sdxl_path: Path, tmp_path: Path
) -> None:
    pipe = latentkit.load_pipeline(sdxl_path, device="cpu", progress=False)
    option = dict(
        prompt_2="a dog",
        negative_prompt_2="ugly",
        original_size=(64, 48),
        target_size=(32, 40),
        crops_coords_top_left=(4, 8),
        negative_original_size=(16, 24),
        negative_target_size=(24, 16),
        negative_crops_coords_top_left=(2, 0),
    )
    base = {**BASE, "height": 32, "width": 32}
    params = regenerates(pipe, tmp_path, {}, option, base=base)
    fields = dict(params.extras)
    assert (fields["Original size"], fields["Crop top left"]) == ("48x64", "4, 8")


def test_sdxl_refiner_aesthetic_scores_regenerate(sdxl_refiner_path: Path, tmp_path: Path) -> None:
    pipe = latentkit.load_pipeline(sdxl_refiner_path, device="cpu", progress=False)
    option = dict(aesthetic_score=9.0, negative_aesthetic_score=0.5)
    base = {**BASE, "steps": 5}
    regenerates(pipe, tmp_path, {"image": picture((32, 32))}, option, base=base)


def run(*argv: str) -> int:
    return main([*argv, "-q"])


def test_cli_params_from_restores_the_options_it_has_no_flags_for(
    sd1: latentkit.LatentDiffusion, sd1_path: Path, tmp_path: Path
) -> None:
    made = sd1.generate(**BASE, guidance_interval=(1.0, math.inf), feature_cache=2, progress=False)
    first = made.save(tmp_path / "a.png")[0]
    second = tmp_path / "b.png"
    assert (
        run("generate", "--params-from", str(first), "--model", str(sd1_path), "-o", str(second))
        == 0
    )
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(second)))
    assert GenerationParameters.from_png(second).extras == made.parameters[0].extras


def test_cli_params_from_with_a_controlnet(
    sd1_path: Path, sd1_controlnet_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    control = tmp_path / "lines.png"
    lines().save(control)
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    model = ("--model", str(sd1_path))
    net = ("--controlnet", str(sd1_controlnet_path), "--control-image", str(control))
    small = ("-s", "3", "--steps", "4", "-W", "16", "-H", "16")
    settings = ("--control-scale", "0.6", "--control-end", "0.7", "--guess-mode")
    made = run("generate", "a cat", *small, *net, *settings, *model, "-o", str(first))
    assert made == 0
    capsys.readouterr()
    # Without the ControlNet and its control image: refused before any model loads.
    assert run("generate", "--params-from", str(first), *model, "-o", str(second)) == 2
    err = capsys.readouterr().err
    assert "1 ControlNet(s)" in err and "--control-image" in err and not second.exists()
    code = run("generate", "--params-from", str(first), *net, *model, "-o", str(second))
    assert code == 0
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(second)))
    # A flag given wins over the PNG: another scale, other pixels.
    third = tmp_path / "c.png"
    stronger = ("--control-scale", "1.5")
    code = run("generate", "--params-from", str(first), *net, *stronger, *model, "-o", str(third))
    assert code == 0
    assert not np.array_equal(pixels(Image.open(first)), pixels(Image.open(third)))


def test_cli_params_from_needs_the_input_picture(
    sd1: latentkit.LatentDiffusion,
    sd1_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "in.png"
    picture().save(source)
    made = sd1.generate(**BASE, image=picture(), strength=0.55, progress=False)
    first = made.save(tmp_path / "a.png")[0]
    second = tmp_path / "b.png"
    model = ("--model", str(sd1_path))
    assert run("generate", "--params-from", str(first), *model, "-o", str(second)) == 2
    assert "--image" in capsys.readouterr().err and not second.exists()
    code = run(
        "generate", "--params-from", str(first), "--image", str(source), *model, "-o", str(second)
    )
    assert code == 0
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(second)))


A1111_CONTROLNET = (
    "a house\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, "
    'Size: 512x512, Model: v1-5, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny '
    "[d14c016b], Weight: 0.7, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: "
    "100, Threshold B: 200, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, "
    'Control Mode: Balanced", ControlNet 1: "Module: none, Model: control_v11f1p_sd15_depth '
    "[cfd03158], Weight: 1, Guidance Start: 0, Guidance End: 1, Control Mode: ControlNet is "
    'more important", Version: v1.9.4'
)


def test_a1111_controlnet_units_read_as_the_extension_writes_them() -> None:
    params = GenerationParameters.from_a1111(A1111_CONTROLNET)
    assert GenerationParameters.from_a1111(params.a1111()) == params
    assert [u["Model"] for u in params.controlnets()] == [
        "control_v11p_sd15_canny [d14c016b]",
        "control_v11f1p_sd15_depth [cfd03158]",
    ]
    options = params.to_options()
    assert (options["control_scale"], options["control_start"], options["control_end"]) == (
        [0.7, 1.0],
        [0.1, 0.0],
        [0.9, 1.0],
    )
    assert options["guess_mode"] is False  # only one unit in "ControlNet is more important"
    assert params.input_images == ("control_image",)


def test_hires_fix_strength_is_not_an_input_picture() -> None:
    text = (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent"
    )
    params = GenerationParameters.from_a1111(text)
    assert params.input_images == () and "strength" not in params.to_options()
    img2img = GenerationParameters.from_a1111(text.split(", Hires")[0])
    assert img2img.input_images == ("image",) and img2img.to_options()["strength"] == 0.7


def test_every_recorded_kind_reads_back_equal() -> None:
    from latentkit.results import option_fields

    values = {
        "prompt_2": 'a "dog", sitting: still',
        "guidance_interval": (0.1 + 0.2, math.inf),
        "feature_cache": 3,
        "sigmas": (14.6, 1 / 3, 0.0),
        "denoising_end": 0.1 + 0.7,
        "outpaint": (0, 64, 8, 0),
        "original_size": (1024, 768),
    }
    params = GenerationParameters(
        prompt="p",
        negative_prompt="",
        steps=2,
        scheduler="Euler",
        guidance_scale=7.0,
        seed=1,
        width=8,
        height=8,
        model="m",
        extras=tuple(option_fields(values)),
    )
    text = params.a1111()
    assert 'Prompt 2: "a \\"dog\\", sitting: still"' in text  # JSON-quoted, as A1111 quotes
    assert text.endswith("Original size: 768x1024")  # (height, width) written WxH
    read = GenerationParameters.from_a1111(text)
    assert read == params
    options = read.to_options()
    assert {k: options[k] for k in values} == values


@pytest.mark.parametrize(
    ("field", "match"),
    [
        ("Feature cache: two", "'Feature cache' must be an integer"),
        ('Guidance interval: "a, b"', "numbers separated by commas"),
        ("Denoising end: nan", "'Denoising end' must be a number"),
        ("Original size: 10", "WxH"),
        ('ControlNet 0: "Model: x, Weight: strong"', "'ControlNet 0 Weight' must be a number"),
    ],
)
def test_unreadable_option_values_raise_typed_errors(field: str, match: str) -> None:
    text = f"p\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8, {field}"
    with pytest.raises(InvalidArgumentError, match=match):
        GenerationParameters.from_a1111(text).to_options()


def test_a1111_model_names_and_hashes_a_controlnet_as_the_extension_does(tmp_path: Path) -> None:
    big = tmp_path / "control_sd15_canny.safetensors"
    data = np.random.default_rng(0).integers(0, 256, 0x100000 + 0x20000, dtype=np.uint8).tobytes()
    big.write_bytes(data)
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert a1111_model(str(big), big) == f"control_sd15_canny [{expected}]"
    small = tmp_path / "small.pth"
    small.write_bytes(b"x" * 100)  # under 1 MiB: A1111 hashes nothing
    assert a1111_model(str(small), small) == "small [e3b0c442]"
    assert a1111_model("org/net,v2: best", None) == "org/net_v2_ best"
