"""Depth-to-image parity with diffusers, and the mask and depth conditioners on their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_image_tasks import generators, half_mask, picture

import latentkit
from latentkit.conditioners import DepthConditioner, DepthInput, MaskConditioner, MaskedImage

TOL = 1e-4
SIZE = 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def depth(depth_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(depth_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(depth_path: Path) -> Any:
    import diffusers

    pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(depth_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def depth_ramp(size: int = SIZE) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 2, size), indexing="ij")
    return (x + y * y)[None]  # (1, H, W), not monotonic in one axis only


@pytest.mark.parametrize("scheduler", [None, "DPMSolverMultistepScheduler"])
def test_depth_to_image_with_the_models_estimator_matches_diffusers(
    depth: Any, reference: Any, scheduler: Any
) -> None:
    import diffusers

    image = picture(7)
    if scheduler is not None:  # a new pipeline on the same modules: the fixture stays as loaded
        swapped = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
        reference = type(reference)(**{**reference.components, "scheduler": swapped})
        reference.set_progress_bar_config(disable=True)
    ref = reference(
        prompt="a cat",
        image=image,
        strength=0.7,
        num_inference_steps=5,
        generator=generators(2),
        output_type="np",
    ).images
    ours = depth.generate(
        "a cat",
        image=image,
        strength=0.7,
        steps=5,
        seed=2,
        output_type="np",
        progress=False,
        scheduler=None if scheduler is None else "dpm-solver++",
    ).images
    assert np.abs(np.stack(ours) - ref).max() <= TOL


def test_depth_to_image_with_a_given_map_matches_diffusers(depth: Any, reference: Any) -> None:
    image, depth_map = picture(8), depth_ramp()
    ref = reference(
        prompt="a cat",
        image=image,
        depth_map=depth_map,
        num_inference_steps=4,
        num_images_per_prompt=2,
        generator=generators([3, 4]),
        output_type="np",
    ).images
    ours = depth.generate(
        "a cat",
        image=image,
        depth_map=depth_map,
        steps=4,
        num_images=2,
        seed=[3, 4],
        output_type="np",
        progress=False,
    ).images
    assert np.abs(np.stack(ours) - ref).max() <= TOL
    # The depth really conditions the output.
    flipped = depth.generate(
        "a cat",
        image=image,
        depth_map=depth_map.flip(-1),
        steps=4,
        num_images=2,
        seed=[3, 4],
        output_type="np",
        progress=False,
    ).images
    assert np.abs(np.stack(flipped) - np.stack(ours)).max() > 1e-3


def test_depth_map_alone_generates_from_noise(depth: Any) -> None:
    from PIL import Image

    as_image = Image.fromarray((depth_ramp()[0].numpy() / 3 * 255).astype(np.uint8))
    result = depth.generate("a cat", depth_map=as_image, steps=3, seed=0, progress=False)
    assert result.images[0].size == (SIZE, SIZE) and result.parameters[0].strength == 0.8


def test_depth_conditioner_resizes_and_normalises() -> None:
    cond = DepthConditioner()
    out = cond.encode(
        DepthInput(latent_size=(8, 12), depth_map=depth_ramp()), device=CPU, dtype=torch.float32
    )
    assert out.shape == (1, 1, 8, 12) and out.dtype == torch.float32
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    half = cond.encode(
        DepthInput(latent_size=(8, 12), depth_map=depth_ramp()), device=CPU, dtype=torch.bfloat16
    )
    assert half.dtype == torch.bfloat16
    with pytest.raises(latentkit.InvalidArgumentError, match="no depth estimator"):
        cond.encode(
            DepthInput(latent_size=(8, 8), picture=picture()), device=CPU, dtype=torch.float32
        )


def test_depth_conditioner_estimates_with_the_models_estimator(depth: Any, reference: Any) -> None:
    image = picture(9)
    ours = depth.depth.encode(
        DepthInput(latent_size=(16, 16), picture=image), device=CPU, dtype=torch.float32
    )
    theirs = reference.prepare_depth_map(image, None, 1, False, torch.float32, CPU)
    assert torch.equal(ours, theirs)


def test_mask_conditioner_channels(sd1_path: Path) -> None:
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    cond = MaskConditioner(autoencoder=pipe.vae)
    pixels = latentkit.images.image_tensor(picture(), (SIZE, SIZE))
    mask = latentkit.images.mask_tensor(half_mask(), (SIZE, SIZE))
    out = cond.encode(
        MaskedImage(pixels=pixels, mask=mask),
        device=CPU,
        dtype=torch.float32,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (1, 1 + 4, SIZE // 2, SIZE // 2)
    assert set(out[0, 0].unique().tolist()) == {0.0, 1.0} and out[0, 0, :, : SIZE // 4].eq(1).all()
    again = cond.encode(
        MaskedImage(pixels=pixels, mask=mask),
        device=CPU,
        dtype=torch.float32,
        generator=[torch.Generator().manual_seed(0)],
    )
    assert torch.equal(out, again)  # a list uses its first generator, as diffusers does


def test_extra_channels_are_batched_for_num_images_and_guidance(
    inpaint_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from latentkit.models.unet import UNet2DCondition

    pipe = latentkit.load_pipeline(inpaint_path, device="cpu", progress=False)
    shapes: list[tuple[int, ...]] = []
    real = UNet2DCondition.forward

    def spy(self: Any, x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return real(self, x, *a, **k)

    monkeypatch.setattr(UNet2DCondition, "forward", spy)
    pipe.generate(
        ["a", "b"], image=picture(), mask_image=half_mask(), num_images=3, steps=1, progress=False
    )
    assert shapes[0] == (
        2 * 2 * 3,
        9,
        SIZE // 2,
        SIZE // 2,
    )  # CFG × prompts × images, 4 + 1 + 4 channels
    shapes.clear()
    pipe.generate(
        "a", image=picture(), mask_image=half_mask(), guidance_scale=1.0, steps=1, progress=False
    )
    assert shapes[0] == (1, 9, SIZE // 2, SIZE // 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(), r"in_channels=5\): pass image= or depth_map="),
        (dict(image=picture(), mask_image=half_mask()), "cannot inpaint"),
    ],
)
def test_depth_model_errors(depth: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        depth.generate("a cat", progress=False, **kwargs)


def test_depth_map_on_a_model_without_depth_channels(sd1_path: Path) -> None:
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    with pytest.raises(latentkit.InvalidArgumentError, match="in_channels=4"):
        pipe.generate("a cat", depth_map=depth_ramp(), progress=False)


def test_conditioners_are_registered() -> None:
    assert latentkit.conditioners.names() == ["controlnet", "depth", "mask", "size-ids", "text"]
