"""Image-to-image and inpainting through `generate()`: parity with diffusers' pipelines on the
same files, seed and scheduler, and clear errors for bad image inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit

TOL = 1e-4  # max abs difference on fp32 CPU images in [0, 1]
SIZE = 32


def picture(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.random((size[1] // 4, size[0] // 4, 3))
    return Image.fromarray((smooth * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def half_mask(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, : size[0] // 2] = 255  # repaint the left half
    return Image.fromarray(mask)


def diffusers_pipe(kind: str, path: Path, scheduler: str | None) -> Any:
    import diffusers

    cls = {
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[kind]
    pipe = cls.from_pretrained(str(path), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def generators(seed: int | list[int]) -> Any:
    if isinstance(seed, list):
        return [torch.Generator("cpu").manual_seed(s) for s in seed]
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def inpaint(inpaint_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(inpaint_path, device="cpu", progress=False)


SCHEDULERS = [
    (None, None),
    ("ddim", "DDIMScheduler"),
    ("dpm-solver++", "DPMSolverMultistepScheduler"),
    ("euler-ancestral", "EulerAncestralDiscreteScheduler"),
    ("heun", "HeunDiscreteScheduler"),
]


@pytest.mark.parametrize(("ours_name", "theirs"), SCHEDULERS)
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers(
    sd1: Any, sd1_path: Path, ours_name: Any, theirs: Any, strength: float
) -> None:
    image = picture()
    ref = diffusers_pipe("img2img", sd1_path, theirs)(
        prompt="a red cat",
        image=image,
        strength=strength,
        num_inference_steps=6,
        generator=generators(4),
        output_type="np",
    ).images
    got = sd1.generate(
        "a red cat",
        image=image,
        strength=strength,
        steps=6,
        seed=4,
        scheduler=ours_name,
        output_type="np",
        progress=False,
    ).images
    assert np.abs(np.stack(got) - ref).max() <= TOL


def test_img2img_batch_with_seed_list_matches_diffusers(sd1: Any, sd1_path: Path) -> None:
    image = picture(1)
    ref = diffusers_pipe("img2img", sd1_path, None)(
        prompt="a cat",
        image=image,
        strength=0.7,
        num_inference_steps=5,
        num_images_per_prompt=2,
        generator=generators([8, 9]),
        output_type="np",
    ).images
    got = sd1.generate(
        "a cat",
        image=image,
        strength=0.7,
        steps=5,
        num_images=2,
        seed=[8, 9],
        output_type="np",
        progress=False,
    ).images
    assert np.abs(np.stack(got) - ref).max() <= TOL


@pytest.mark.parametrize(("ours_name", "theirs"), SCHEDULERS[:4])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_model_matches_diffusers(
    inpaint: Any, inpaint_path: Path, ours_name: Any, theirs: Any, strength: float
) -> None:
    image, mask = picture(2), half_mask()
    ref = diffusers_pipe("inpaint", inpaint_path, theirs)(
        prompt="a red cat",
        image=image,
        mask_image=mask,
        strength=strength,
        height=SIZE,
        width=SIZE,
        num_inference_steps=6,
        generator=generators(5),
        output_type="np",
    ).images
    got = inpaint.generate(
        "a red cat",
        image=image,
        mask_image=mask,
        strength=strength,
        steps=6,
        seed=5,
        scheduler=ours_name,
        output_type="np",
        progress=False,
    ).images
    assert np.abs(np.stack(got) - ref).max() <= TOL


@pytest.mark.parametrize(("ours_name", "theirs"), SCHEDULERS[:4])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_blended_inpainting_on_a_4_channel_model_matches_diffusers(
    sd1: Any, sd1_path: Path, ours_name: Any, theirs: Any, strength: float
) -> None:
    image, mask = picture(3), half_mask()
    ref = diffusers_pipe("inpaint", sd1_path, theirs)(
        prompt="a cat",
        image=image,
        mask_image=mask,
        strength=strength,
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        generator=generators(6),
        output_type="np",
    ).images
    got = sd1.generate(
        "a cat",
        image=image,
        mask_image=mask,
        strength=strength,
        steps=5,
        seed=6,
        scheduler=ours_name,
        output_type="np",
        progress=False,
    ).images
    assert np.abs(np.stack(got) - ref).max() <= TOL


def test_blending_keeps_the_known_region(sd1: Any) -> None:
    image, mask = picture(3), half_mask()
    kept = sd1.generate(
        "a cat", image=image, mask_image=mask, steps=4, seed=1, output_type="latent", progress=False
    ).images[0]
    clean = sd1.vae.encode(
        latentkit.images.image_tensor(image, (SIZE, SIZE)),
        generator=torch.Generator().manual_seed(1),
    )
    # Outside the mask (right half of the latents) the result is the image's own latents.
    assert torch.equal(kept[:, :, SIZE // 4 :], clean[0, :, :, SIZE // 4 :])


def test_image_inputs_are_equivalent(sd1: Any, tmp_path: Path) -> None:
    image = picture(5)
    path = tmp_path / "in.png"
    image.save(path)
    array = np.array(image)
    kw: dict[str, Any] = dict(steps=3, seed=2, strength=0.5, output_type="np", progress=False)
    outs = [
        sd1.generate("a cat", image=x, **kw).images[0]
        for x in (
            image,
            str(path),
            path,
            array,
            array.astype(np.float32) / 255,
            torch.from_numpy(array).permute(2, 0, 1).float() / 255,
        )
    ]
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])


def test_output_size_follows_the_image_rounded_down(sd1: Any) -> None:
    result = sd1.generate("a cat", image=picture(0, (37, 21)), steps=2, seed=0, progress=False)
    assert result.images[0].size == (36, 20)  # the tiny VAE's factor is 2
    assert (
        result.parameters[0].strength == 0.8
        and "Denoising strength: 0.8" in result.parameters[0].a1111()
    )
    # A mask of another size is resized to the image's.
    sized = sd1.generate(
        "a cat",
        image=picture(0, (32, 32)),
        mask_image=half_mask((64, 48)),
        steps=2,
        seed=0,
        progress=False,
    )
    assert sized.images[0].size == (32, 32)
    # height/width resize the image.
    assert sd1.generate(
        "a cat", image=picture(), height=16, width=24, steps=2, seed=0, progress=False
    ).images[0].size == (24, 16)


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentkit.models.unet import UNet2DCondition

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the network ran before the argument check")

    monkeypatch.setattr(UNet2DCondition, "forward", boom)
    monkeypatch.setattr(latentkit.models.autoencoder.AutoencoderKL, "encode", boom)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image=picture(), strength=1.5), r"strength must be a finite number in \[0, 1\]"),
        (dict(image=picture(), strength=-0.1), r"strength must be a finite number in \[0, 1\]"),
        (dict(image=picture(), strength=0.01), "strength"),  # no step left
        (dict(mask_image=half_mask()), "mask_image needs image="),
        (dict(strength=0.5), "needs image="),
        (dict(image="/no/such/picture.png"), "no image file"),
        (dict(image=42), "must be a PIL image"),
        (dict(image=np.full((8, 8, 3), 2.0)), r"\[0, 1\]"),
    ],
)
def test_bad_image_arguments(
    sd1: Any, no_heavy_work: None, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        sd1.generate("a cat", steps=4, progress=False, **kwargs)


def test_unreadable_image_file(sd1: Any, tmp_path: Path, no_heavy_work: None) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(latentkit.InvalidArgumentError, match="cannot read"):
        sd1.generate("a cat", image=bad, progress=False)


def test_inpainting_model_needs_image_and_mask(inpaint: Any, no_heavy_work: None) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match="in_channels=9"):
        inpaint.generate("a cat", progress=False)
    with pytest.raises(latentkit.InvalidArgumentError, match="in_channels=9"):
        inpaint.generate("a cat", image=picture(), progress=False)
