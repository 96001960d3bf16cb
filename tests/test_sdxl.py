"""SDXL (base, refiner, inpainting) gives diffusers' images on the same weights and seeds.

The tiny models are written by diffusers (tests/tiny_models.py); both libraries load the
same folders. Tolerance: 1e-4 max abs on fp32 images in [0, 1], as for SD 1.x/2.x.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit

TOL = 1e-4
SIZE = 32  # pixels: 16 latents (the tiny VAE downsamples by 2), divisible by the refiner's 8


@pytest.fixture(scope="module")
def base(sdxl_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sdxl_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def refiner(sdxl_refiner_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sdxl_refiner_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def inpaint(sdxl_inpaint_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sdxl_inpaint_path, device="cpu", progress=False)


def reference(kind: str, path: Path) -> Any:
    import diffusers

    cls = {
        "base": diffusers.StableDiffusionXLPipeline,
        "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
    }[kind]
    pipe = cls.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs(pipe: Any, seed: int, **kw: Any) -> np.ndarray:
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw)
    return np.asarray(out.images)


def ours(pipe: latentkit.LatentDiffusion, seed: int, **kw: Any) -> np.ndarray:
    result = pipe.generate(seed=seed, output_type="np", progress=False, **kw)
    return np.stack(result.images)


def picture(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((SIZE, SIZE, 3)).astype(np.float32)


def half_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[:, SIZE // 2 :] = 1.0
    return mask


def test_family_is_detected(base: Any, refiner: Any, inpaint: Any, sd1_path: Path) -> None:
    assert base.family == refiner.family == inpaint.family == "stable-diffusion-xl"
    assert latentkit.load_pipeline(sd1_path, device="cpu", progress=False).family == (
        "stable-diffusion"
    )
    assert [len(p.text) for p in (base, refiner)] == [2, 1]
    assert base.default_size == (16, 16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(prompt="a photo of a red cat"),  # force_zeros_for_empty_prompt: zero negatives
        dict(prompt="a photo of a red cat", negative_prompt="blurry"),
        dict(
            prompt="a photo",
            prompt_2="a red cat",
            negative_prompt="blurry",
            negative_prompt_2="dark",
        ),
        dict(prompt=["a cat", "a red photo"], negative_prompt="blurry", num_images_per_prompt=2),
        dict(prompt="a cat", guidance_scale=1.0),
        dict(prompt="a cat", guidance_rescale=0.7),
        dict(
            prompt="a cat",
            negative_prompt="x",
            original_size=(64, 48),
            target_size=(40, 32),
            crops_coords_top_left=(4, 8),
            negative_original_size=(16, 16),
            negative_target_size=(24, 24),
            negative_crops_coords_top_left=(4, 8),
        ),
        dict(prompt="a cat", clip_skip=1),  # zero negatives: only the prompt's layer moves
        dict(prompt="a cat", denoising_end=0.6),
    ],
    ids=[
        "zeros",
        "negative",
        "prompt_2",
        "batch",
        "unguided",
        "rescale",
        "micro",
        "clip_skip",
        "end",
    ],
)
def test_base_matches_diffusers(base: Any, sdxl_path: Path, kw: dict[str, Any]) -> None:
    ref = reference("base", sdxl_path)
    common = dict(num_inference_steps=4, height=SIZE, width=SIZE)
    expected = theirs(ref, 7, **common, **kw)
    mine = dict(kw)
    mine["num_images"] = mine.pop("num_images_per_prompt", 1)
    if "denoising_end" in kw:
        # diffusers decodes the latents where denoising stopped; so do we.
        pass
    got = ours(base, 7, steps=4, height=SIZE, width=SIZE, **mine)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("scheduler", latentkit.schedulers.names())
def test_every_scheduler_runs_sdxl(base: Any, scheduler: str) -> None:
    images = ours(base, 1, prompt="a cat", steps=3, height=SIZE, width=SIZE, scheduler=scheduler)
    assert np.isfinite(images).all() and images.std() > 1e-3


@pytest.mark.parametrize(
    ("ours_name", "theirs_cls"),
    [
        ("ddim", "DDIMScheduler"),
        ("dpm-solver++", "DPMSolverMultistepScheduler"),
        ("euler-ancestral", "EulerAncestralDiscreteScheduler"),
        ("heun", "HeunDiscreteScheduler"),
    ],
)
def test_swapped_schedulers_match_diffusers(
    base: Any, sdxl_path: Path, ours_name: str, theirs_cls: str
) -> None:
    import diffusers

    ref = reference("base", sdxl_path)
    ref.scheduler = getattr(diffusers, theirs_cls).from_config(ref.scheduler.config)
    expected = theirs(ref, 5, prompt="a cat", num_inference_steps=4, height=SIZE, width=SIZE)
    got = ours(base, 5, prompt="a cat", steps=4, height=SIZE, width=SIZE, scheduler=ours_name)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_base_img2img_matches_diffusers(base: Any, sdxl_path: Path, strength: float) -> None:
    ref = reference("img2img", sdxl_path)
    expected = theirs(
        ref, 2, prompt="a cat", image=picture(), strength=strength, num_inference_steps=4
    )
    got = ours(base, 2, prompt="a cat", image=picture(), strength=strength, steps=4)
    assert np.abs(got - expected).max() <= TOL


def test_refiner_matches_diffusers(refiner: Any, sdxl_refiner_path: Path) -> None:
    ref = reference("img2img", sdxl_refiner_path)
    kw = dict(prompt="a cat", negative_prompt="blurry", image=picture(), strength=0.6)
    expected = theirs(
        ref, 4, num_inference_steps=5, aesthetic_score=7.0, negative_aesthetic_score=2.0, **kw
    )
    got = ours(refiner, 4, steps=5, aesthetic_score=7.0, negative_aesthetic_score=2.0, **kw)
    assert np.abs(got - expected).max() <= TOL
    # The defaults (6.0 / 2.5) are diffusers' too.
    expected = theirs(ref, 4, num_inference_steps=5, **kw)
    assert np.abs(ours(refiner, 4, steps=5, **kw) - expected).max() <= TOL


@pytest.mark.parametrize("scheduler", [None, "dpm-solver++", "euler-ancestral"])
def test_ensemble_of_experts_handoff(
    base: Any, refiner: Any, sdxl_path: Path, sdxl_refiner_path: Path, scheduler: str | None
) -> None:
    import diffusers

    ref_base = reference("base", sdxl_path)
    ref_refiner = reference("img2img", sdxl_refiner_path)
    if scheduler is not None:
        cls = {
            "dpm-solver++": "DPMSolverMultistepScheduler",
            "euler-ancestral": "EulerAncestralDiscreteScheduler",
        }[scheduler]
        for p in (ref_base, ref_refiner):
            p.scheduler = getattr(diffusers, cls).from_config(p.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(11)
    kw = dict(prompt="a red cat", num_inference_steps=10, height=SIZE, width=SIZE)
    latents = ref_base(**kw, denoising_end=0.8, output_type="latent", generator=generator).images
    expected = ref_refiner(
        prompt="a red cat",
        num_inference_steps=10,
        denoising_start=0.8,
        image=latents,
        generator=generator,
        output_type="np",
    ).images

    handed = base.generate(
        "a red cat",
        steps=10,
        height=SIZE,
        width=SIZE,
        denoising_end=0.8,
        output_type="latent",
        seed=11,
        progress=False,
        scheduler=scheduler,
    )
    # Latents reach |60|: compare relative to their scale (fp32 rounding over 8 steps).
    handed_latents = handed.images
    assert (handed_latents - latents).abs().max() <= 1e-5 * latents.abs().max()
    # The refiner continues the base's generator: diffusers shares one between the two calls.
    final = refiner.generate(
        "a red cat",
        steps=10,
        denoising_start=0.8,
        image=handed.images,
        seed=11,
        output_type="np",
        progress=False,
        scheduler=scheduler,
    )
    if scheduler == "euler-ancestral":
        # An ancestral sampler draws fresh noise in the refiner's steps: diffusers draws it
        # from the base's generator, already advanced; a seed restarts it. Same shape, finite.
        assert np.isfinite(np.stack(final.images)).all()
        return
    assert np.abs(np.stack(final.images) - expected).max() <= TOL


def test_inpainting_with_the_base_matches_diffusers(base: Any, sdxl_path: Path) -> None:
    ref = reference("inpaint", sdxl_path)
    # diffusers' SDXL inpainting defaults to the UNet's size, not the picture's: say it.
    kw = dict(
        prompt="a cat",
        image=picture(),
        mask_image=half_mask(),
        strength=0.75,
        height=SIZE,
        width=SIZE,
        guidance_scale=7.5,
    )
    expected = theirs(ref, 6, num_inference_steps=4, **kw)
    got = ours(base, 6, steps=4, **kw)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_model_matches_diffusers(
    inpaint: Any, sdxl_inpaint_path: Path, strength: float
) -> None:
    ref = reference("inpaint", sdxl_inpaint_path)
    kw = dict(
        prompt="a cat",
        image=picture(),
        mask_image=half_mask(),
        strength=strength,
        height=SIZE,
        width=SIZE,
        guidance_scale=7.5,
    )
    expected = theirs(ref, 6, num_inference_steps=4, **kw)
    got = ours(inpaint, 6, steps=4, **kw)
    assert np.abs(got - expected).max() <= TOL


def test_long_and_weighted_prompts_use_both_encoders(base: Any) -> None:
    long = " ".join(["cat"] * 100)
    got = base.generate(long, steps=2, height=SIZE, width=SIZE, progress=False, output_type="np")
    assert np.isfinite(got.images[0]).all()
    text = base._conditioning(
        latentkit.Request(prompt=long, negative_prompt="dog"),
        [[long], [long]],
        [["dog"], ["dog"]],
        True,
        (SIZE, SIZE),
    )
    assert text.context.shape == (2, 154, base.unet.config.cross_attention_dim)
    plain = ours(base, 1, prompt="a red cat", steps=2, height=SIZE, width=SIZE)
    weighted = ours(base, 1, prompt="a (red:1.5) cat", steps=2, height=SIZE, width=SIZE)
    assert np.abs(plain - weighted).max() > 1e-4


def test_threads_share_one_sdxl_pipeline(base: Any) -> None:
    expected = {
        s: ours(base, s, prompt="a cat", steps=2, height=SIZE, width=SIZE) for s in range(4)
    }
    results: dict[int, np.ndarray] = {}

    def work(s: int) -> None:
        results[s] = ours(base, s, prompt="a cat", steps=2, height=SIZE, width=SIZE)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(4):
        assert np.array_equal(results[s], expected[s])


@pytest.mark.parametrize(
    ("pipe_name", "kw", "match"),
    [
        ("sd1", dict(prompt_2="x"), "prompt_2: not a keyword"),
        ("sd1", dict(original_size=(8, 8)), "original_size"),
        ("base", dict(aesthetic_score=7.0), "refiners only"),
        ("refiner", dict(target_size=(8, 8), image=None), "does not condition"),
        ("base", dict(denoising_start=0.8, denoising_end=0.5), "must be below"),
        ("base", dict(image=torch.zeros(1, 1, 4, 8, 8)), r"\(B, 4, h, w\)"),
        ("base", dict(image=torch.zeros(1, 4, 8, 8), height=32), "do not match"),
        ("base", dict(image=torch.zeros(3, 4, 8, 8), strength=1.0), "latents for 3 images"),
        ("base", dict(denoising_end=1.5), "denoising_end must be"),
        ("base", dict(prompt_embeds=torch.zeros(1, 77, 80), prompt=None), "pooled_prompt_embeds"),
    ],
)
def test_bad_sdxl_input_is_a_typed_error_before_any_network(
    base: Any,
    refiner: Any,
    sd1_path: Path,
    pipe_name: str,
    kw: dict[str, Any],
    match: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipes = {"base": base, "refiner": refiner}
    pipe = pipes.get(pipe_name) or latentkit.load_pipeline(sd1_path, device="cpu", progress=False)

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a network ran before the argument check")

    monkeypatch.setattr(type(pipe.unet), "forward", boom)
    kw = {"prompt": "a cat", **kw}
    if kw.get("image", 1) is None:
        kw.pop("image")
        kw["image"] = picture()
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        pipe.generate(steps=2, progress=False, **kw)


# The listing of stabilityai/stable-diffusion-xl-base-1.0 (the files that matter here).
SDXL_BASE_FILES = [
    "model_index.json",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    *(
        f"{folder}/{name}"
        for folder in ("tokenizer", "tokenizer_2")
        for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
    ),
    *(
        f"{folder}/{stem}{variant}.{ext}"
        for folder, stem in (
            ("text_encoder", "model"),
            ("text_encoder_2", "model"),
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
        )
        for variant in ("", ".fp16")
        for ext in ("safetensors", "bin" if folder.startswith("text") else "safetensors")
    ),
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "text_encoder_2/flax_model.msgpack",
    "unet/config.json",
    "unet/diffusion_flax_model.msgpack",
    "unet/openvino_model.bin",
    "vae/config.json",
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_decoder/model.onnx",
]


def test_only_the_files_sdxl_needs_are_selected() -> None:
    from latentkit.loading import select_files

    needed, weights = select_files(SDXL_BASE_FILES, variant="fp16", allow_pickle=False, name="x")
    assert sorted(f for fs in weights.values() for f in fs) == [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert {f.split("/")[0] for f in needed} == {
        "model_index.json",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "unet",
        "vae",
    }
    # The refiner has the second encoder only.
    refiner = [f for f in SDXL_BASE_FILES if not f.startswith(("text_encoder/", "tokenizer/"))]
    _, weights = select_files(refiner, variant="fp16", allow_pickle=False, name="refiner")
    assert set(weights) == {"unet", "vae", "text_encoder_2"}


def test_a_missing_listed_encoder_is_a_typed_error(sdxl_path: Path, tmp_path: Path) -> None:
    import shutil

    broken = Path(shutil.copytree(sdxl_path, tmp_path / "sdxl"))
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(latentkit.MissingComponentError, match="text_encoder"):
        latentkit.load_pipeline(broken, device="cpu", progress=False)


def test_half_precision_runs_the_vae_in_float32(sdxl_path: Path) -> None:
    pipe = latentkit.load_pipeline(sdxl_path, device="cpu", dtype="fp16", progress=False)
    assert pipe.unet.conv_in.weight.dtype == torch.float16
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.float32  # force_upcast
    images = ours(pipe, 1, prompt="a cat", steps=2, height=SIZE, width=SIZE)
    assert np.isfinite(images).all()
    picture_out = ours(pipe, 1, prompt="a cat", steps=2, image=picture(), strength=0.5)
    assert np.isfinite(picture_out).all()


def test_cli_generates_with_sdxl(sdxl_path: Path, tmp_path: Path) -> None:
    from PIL import Image

    from latentkit.cli import main

    out = tmp_path / "x.png"
    argv = ["generate", "a cat", "-o", str(out), "--model", str(sdxl_path), "--steps", "2"]
    assert main([*argv, "--seed", "3", "-W", str(SIZE), "-H", str(SIZE), "-q"]) == 0
    with Image.open(out) as image:
        assert image.size == (SIZE, SIZE)
        assert "Seed: 3" in image.text["parameters"]
