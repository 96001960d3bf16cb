"""The x4 upscaler family gives diffusers' ``StableDiffusionUpscalePipeline`` images.

The tiny upscaler is written by diffusers (tests/tiny_models.py): a 7-channel UNet with a
noise-level class embedding and cross-attention-only levels, a 3-level VAE (factor 4,
scaling factor 0.08333), the DDPM low-resolution scheduler. Tolerances: 1e-4 max abs on fp32
images in [0, 1] (as every pipeline test), 1e-5 for the UNet alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit
from latentkit.loading import select_files
from latentkit.models.unet import UNet2DCondition, UNetConfig
from latentkit.tiles import map_tiles, tile_starts

TOL = 1e-4
LOW = (16, 12)  # the low-resolution input (H, W): latents of this size, output 4x


@pytest.fixture(scope="module")
def pipe(upscale_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(upscale_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(upscale_path: Path) -> Any:
    import diffusers

    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(upscale_path))
    ref.set_progress_bar_config(disable=True)
    return ref


def low_res(seed: int = 0, size: tuple[int, int] = LOW) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))


def theirs(ref: Any, seed: int | list[int], **kw: Any) -> np.ndarray:
    generator = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    return np.asarray(ref(generator=generator, output_type="np", **kw).images)


def ours(pipe: latentkit.LatentDiffusion, seed: int | list[int], **kw: Any) -> np.ndarray:
    return np.stack(pipe.generate(seed=seed, output_type="np", progress=False, **kw).images)


# ---------------------------------------------------------------- the UNet


# stabilityai/stable-diffusion-x4-upscaler unet/config.json
X4_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.9.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 7,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "out_channels": 4,
    "sample_size": 128,
    "up_block_types": [
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    ],
    "use_linear_projection": True,
}


def test_full_size_x4_unet_keys_equal_diffusers_on_meta() -> None:
    import diffusers

    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(X4_UNET)
        unet = UNet2DCondition(UNetConfig.from_dict(X4_UNET))
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours["class_embedding.weight"] == (1000, 1024)
    # only_cross_attention: the first attention reads the 1024-wide text, not the image.
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    assert ours[key] == (512, 1024)
    config = UNetConfig.from_dict(X4_UNET)
    assert UNetConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "flags",
    [
        dict(only_cross_attention=(True, True, False)),  # the x4 layout
        dict(only_cross_attention=True),  # one flag for every block
        # diffusers' cross-attention mid block ignores the flag: it always self-attends.
        dict(only_cross_attention=(False, True, True), mid_block_only_cross_attention=True),
    ],
    ids=["per-block", "all", "mid"],
)
def test_unet_with_class_labels_matches_diffusers(flags: dict[str, Any]) -> None:
    import diffusers
    import tiny_models

    torch.manual_seed(0)
    kwargs = tiny_models.upscale_unet_kwargs() | {"num_class_embeds": 50} | flags
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():
        ref.class_embedding.weight.mul_(5.0)  # so a wrong label shows
    config = UNetConfig.from_dict(dict(ref.config))
    with torch.device("meta"):
        unet = UNet2DCondition(config)
    unet.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(2, 7, 12, 10)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, 32)
    labels = torch.tensor([20, 3])
    with torch.no_grad():
        expected = ref(x, t, context, class_labels=labels).sample
        got = unet(x, t, context, class_labels=labels)
        other = unet(x, t, context, class_labels=torch.tensor([21, 3]))
    assert (got - expected).abs().max() <= 1e-5
    assert (other - got).abs().max() > 1e-3  # the label is read


def test_class_labels_are_required_exactly_when_the_unet_embeds_them() -> None:
    import tiny_models

    torch.manual_seed(0)
    config = UNetConfig.from_dict(tiny_models.upscale_unet_kwargs())
    unet = UNet2DCondition(config)
    x, t, context = torch.randn(1, 7, 8, 8), torch.tensor(5), torch.randn(1, 3, 32)
    with pytest.raises(latentkit.InvalidArgumentError, match="needs class labels"):
        unet(x, t, context)
    with pytest.raises(latentkit.InvalidArgumentError, match="class_labels must be 1 ints"):
        unet(x, t, context, class_labels=torch.tensor([1.0]))
    plain = UNet2DCondition(UNetConfig.from_dict(tiny_models.sd1_unet_kwargs()))
    with pytest.raises(latentkit.InvalidArgumentError, match="takes no class labels"):
        plain(torch.randn(1, 4, 8, 8), t, context, class_labels=torch.tensor([1]))


# ---------------------------------------------------------------- the pipeline


def test_family_and_components(pipe: latentkit.LatentDiffusion, upscale_path: Path) -> None:
    assert pipe.family == "stable-diffusion-upscale"
    assert pipe.vae.scale_factor == 4 and pipe.vae.scaling_factor == 0.08333
    assert pipe.unet.config.in_channels == 7
    low = pipe.component_configs["low_res_scheduler"]
    assert low["_class_name"] == "DDPMScheduler"
    assert "stable-diffusion-upscale" in latentkit.pipelines.names()


@pytest.mark.parametrize(
    "kw",
    [
        dict(prompt="a photo of a red cat"),
        dict(prompt="a red cat", negative_prompt="blurry", noise_level=0),
        dict(prompt="a red cat", noise_level=150, guidance_scale=4.0),
        dict(prompt="a cat", guidance_scale=1.0),  # unguided: one branch, one label row
        dict(prompt="a cat", num_images_per_prompt=2),
        dict(prompt="a cat", eta=0.7),  # DDIM with eta draws more noise
    ],
    ids=["prompt", "negative-level0", "level150", "unguided", "num_images", "eta"],
)
def test_upscale_matches_diffusers(pipe: Any, reference: Any, kw: dict[str, Any]) -> None:
    image = low_res()
    expected = theirs(reference, 7, image=image, num_inference_steps=3, **kw)
    mine = dict(kw)
    mine["num_images"] = mine.pop("num_images_per_prompt", 1)
    scheduler = None
    if "eta" in mine:
        scheduler = latentkit.schedulers.create("ddim", eta=mine.pop("eta"))
    got = ours(pipe, 7, image=image, steps=3, scheduler=scheduler, **mine)
    assert got.shape == expected.shape == (mine["num_images"], LOW[0] * 4, LOW[1] * 4, 3)
    assert np.abs(got - expected).max() <= TOL
    assert got.std() > 1e-2


def test_noise_level_changes_the_image(pipe: Any) -> None:
    kw = dict(prompt="a cat", image=low_res(), steps=3)
    assert (
        np.abs(ours(pipe, 1, noise_level=10, **kw) - ours(pipe, 1, noise_level=60, **kw)).max()
        > 1e-2
    )


def test_defaults_are_diffusers_75_steps_guidance_9(pipe: Any, reference: Any) -> None:
    image = low_res(4, (8, 8))
    expected = theirs(reference, 3, prompt="a cat", image=image)  # noise_level 20 by default
    result = pipe.generate("a cat", image=image, seed=3, output_type="np", progress=False)
    assert result.parameters[0].steps == 75 and result.parameters[0].guidance_scale == 9.0
    assert np.abs(np.stack(result.images) - expected).max() <= TOL


@pytest.mark.parametrize(
    ("ours_name", "theirs_cls"),
    [("euler", "EulerDiscreteScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler")],
)
def test_swapped_schedulers_match_diffusers(
    pipe: Any, upscale_path: Path, ours_name: str, theirs_cls: str
) -> None:
    import diffusers

    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(upscale_path))
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, theirs_cls).from_config(ref.scheduler.config)
    image = low_res(2)
    expected = theirs(ref, 5, prompt="a cat", image=image, num_inference_steps=4)
    got = ours(pipe, 5, prompt="a cat", image=image, steps=4, scheduler=ours_name)
    assert np.abs(got - expected).max() <= TOL


def test_per_image_seeds_and_array_input(pipe: Any, reference: Any) -> None:
    array = np.asarray(low_res(5)).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1  # diffusers: [-1, 1]
    expected = theirs(
        reference, [3, 4], prompt="a cat", image=tensor, num_images_per_prompt=2,
        num_inference_steps=3,
    )  # fmt: skip
    got = ours(pipe, [3, 4], prompt="a cat", image=array, num_images=2, steps=3)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(), "pass image="),
        (dict(image=low_res(), noise_level=351), "at most 350"),
        (dict(image=low_res(), height=64), "height does not go with an upscaler"),
        (dict(image=low_res(), strength=0.5), "strength does not go with"),
        (dict(image=low_res(), mask_image=low_res()), "mask_image does not go with"),
        (dict(image=low_res(), outpaint=(8, 0, 0, 0)), "outpaint does not go with"),
        (dict(image=torch.zeros(1, 4, 8, 8)), "not latents"),
        (dict(image=low_res(), original_size=(8, 8)), "original_size: not a keyword"),
    ],
)
def test_refusals(pipe: Any, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        pipe.generate("a cat", steps=2, progress=False, **kw)


def test_noise_level_is_refused_by_other_families(sd1_path: Path) -> None:
    sd = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    with pytest.raises(latentkit.InvalidArgumentError, match="noise_level: not a keyword"):
        sd.generate("a cat", steps=2, noise_level=30, progress=False)


def test_low_res_scheduler_is_fetched_when_present_and_required(
    upscale_path: Path, tmp_path: Path
) -> None:
    listing = [str(p.relative_to(upscale_path)) for p in upscale_path.rglob("*") if p.is_file()]
    needed, _ = select_files(listing, variant=None, allow_pickle=False, name="x4")
    assert "low_res_scheduler/scheduler_config.json" in needed
    without = [f for f in listing if not f.startswith("low_res_scheduler/")]
    needed, _ = select_files(without, variant=None, allow_pickle=False, name="x4")
    assert not any(f.startswith("low_res_scheduler/") for f in needed)
    folder = tmp_path / "x4"
    shutil.copytree(upscale_path, folder)
    shutil.rmtree(folder / "low_res_scheduler")
    with pytest.raises(latentkit.MissingComponentError, match="low_res_scheduler"):
        latentkit.load_pipeline(folder, device="cpu", progress=False)


# ---------------------------------------------------------------- tiles


def test_tile_starts_cover_and_end_flush() -> None:
    for size in range(1, 60):
        for tile, stride in ((8, 6), (16, 12), (5, 1)):
            starts = tile_starts(size, tile, stride)
            covered = set().union(*(range(s, min(s + tile, size)) for s in starts))
            assert covered == set(range(size))
            assert starts[-1] == max(size - tile, 0)


def test_map_tiles_of_a_pointwise_map_is_the_map() -> None:
    """Closed form: when each output pixel depends on its input pixel only, every window
    predicts the same values, and their weighted average is those values."""
    x = torch.randn(2, 7, 37, 29)
    weight = torch.randn(4, 7, 1, 1)

    def pointwise(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, weight)

    assert (map_tiles(pointwise, x, tile=12, overlap=4) - pointwise(x)).abs().max() <= 1e-5
    small = torch.randn(1, 7, 10, 12)
    assert torch.equal(map_tiles(pointwise, small, tile=12, overlap=4), pointwise(small))


def test_tiled_unet_runs_on_tiles_only_and_stays_close(
    upscale_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiling = latentkit.Tiling(tile_size=48, overlap=0.25)  # 12 latents, 3 shared
    tiled = latentkit.load_pipeline(
        upscale_path,
        device="cpu",
        progress=False,
        performance=latentkit.Performance(unet_tiling=tiling),
    )
    plain = latentkit.load_pipeline(upscale_path, device="cpu", progress=False)
    assert tiled.runtime is not None
    shapes: list[tuple[int, ...]] = []
    call = tiled.runtime.unet

    def spy(x: torch.Tensor, *args: Any) -> torch.Tensor:
        shapes.append(tuple(x.shape[-2:]))
        return call(x, *args)

    monkeypatch.setattr(tiled.runtime, "unet", spy)
    kw = dict(prompt="a cat", image=low_res(6, (20, 16)), steps=3)
    a, b = ours(tiled, 2, **kw), ours(plain, 2, **kw)
    assert a.shape == b.shape == (1, 80, 64, 3)
    # 20x16 latents: windows at rows 0, 8 and columns 0, 4; 4 windows at each of 3 steps.
    assert set(shapes) == {(12, 12)} and len(shapes) == 4 * 3
    # Windows see less context than the whole, so the image differs (measured 0.015 mean);
    # far less than another seed's image does (0.14): a misplaced window would not.
    another_seed = ours(plain, 3, **kw)
    assert 1e-3 < np.abs(a - b).mean() < 0.25 * np.abs(another_seed - b).mean()


# ---------------------------------------------------------------- the command line


def test_cli_upscale(
    upscale_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from latentkit import cli

    low_res(8).save(tmp_path / "in.png")
    out = tmp_path / "big.png"
    argv = ["upscale", str(tmp_path / "in.png"), "-o", str(out), "--model", str(upscale_path)]
    argv += ["--steps", "2", "--seed", "3", "--noise-level", "40", "--prompt", "a cat", "-q"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        assert image.size == (LOW[1] * 4, LOW[0] * 4)
        assert "Steps: 2" in image.text["parameters"]
    expected = ours(
        latentkit.load_pipeline(upscale_path, device="cpu", progress=False),
        3,
        prompt="a cat",
        image=low_res(8),
        steps=2,
        noise_level=40,
    )
    with Image.open(out) as image:
        assert np.abs(np.asarray(image) / 255.0 - expected[0]).max() <= 1 / 255 + 1e-6
    # Tiled, into the default name in the current folder; a bad level is a clean error.
    tiled = ["upscale", str(tmp_path / "in.png"), "--model", str(upscale_path), "--tile", "32"]
    assert (
        cli.main([*tiled, "--steps", "1", "-q", "--device", "cpu", "-o", str(tmp_path / "t.png")])
        == 0
    )
    assert cli.main([*argv, "--overwrite", "--noise-level", "999"]) == 2
    assert "noise_level must be at most 350" in capsys.readouterr().err


def test_unet_tiling_is_generic_and_exact_when_one_tile_covers_the_latents(
    sd1_path: Path, sd1_controlnet_path: Path
) -> None:
    """Any family tiles its UNet the same way; a window at least as large as the latents is
    the untiled call, bit for bit. ControlNets (whole-image residuals) are refused."""
    big = latentkit.Tiling(tile_size=64)  # 32 latents: more than 16x16
    tiled = latentkit.load_pipeline(
        sd1_path, device="cpu", progress=False, performance=latentkit.Performance(unet_tiling=big)
    )
    plain = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    kw = dict(prompt="a cat", steps=2, height=32, width=32)
    assert np.array_equal(ours(tiled, 4, **kw), ours(plain, 4, **kw))
    small = latentkit.Performance(unet_tiling=latentkit.Tiling(tile_size=16))
    windows = latentkit.load_pipeline(sd1_path, device="cpu", progress=False, performance=small)
    assert np.abs(ours(windows, 4, **kw) - ours(plain, 4, **kw)).max() > 1e-3
    with pytest.raises(latentkit.InvalidArgumentError, match="unet_tiling does not go with"):
        tiled.with_controlnet(str(sd1_controlnet_path), progress=False).generate(
            "a cat", control_image=np.zeros((32, 32, 3), np.float32), steps=2, progress=False
        )
