"""ControlNet (Zhang et al. 2023) gives diffusers' images on the same weights and seeds.

Tiny ControlNets are written by diffusers (``ControlNetModel.from_unet`` of the tiny
pipelines' UNets, every weight perturbed so the zero convolutions are not zero:
tests/tiny_models.py); latentkit and diffusers' ControlNet pipelines load the same folders.
Tolerances: 1e-4 max abs on fp32 images in [0, 1] (the project's bar); 1e-5 on network
outputs (measured 0.0).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit
from latentkit.conditioners.control import ControlNetConditioner, ControlRun
from latentkit.models.controlnet import ControlNet, ControlNetConfig
from latentkit.protocols import ControlResiduals

TOL = 1e-4  # images
NET_TOL = 1e-5  # network outputs
SIZE = 32  # pixels: 16 latents (the tiny VAE downsamples by 2)
STEPS = 4


def picture(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A smooth random picture (width, height = size)."""
    rng = np.random.default_rng(seed)
    smooth = rng.random((size[1] // 4, size[0] // 4, 3))
    return Image.fromarray((smooth * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def edges(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A control image: white strokes on black (what an edge detector gives)."""
    rng = np.random.default_rng(100 + seed)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for _ in range(4):
        if rng.random() < 0.5:
            array[rng.integers(size[1]), :] = 255
        else:
            array[:, rng.integers(size[0])] = 255
    return Image.fromarray(array)


def half_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def nets(models_root: Path) -> dict[str, Path]:
    """Tiny ControlNet folders: two for SD 1.x (for multi-ControlNet), one for SD 2.x and
    two for SDXL."""
    import tiny_models

    return {
        "sd1": tiny_models.save_controlnet("sd1", models_root, 0),
        "sd1-b": tiny_models.save_controlnet("sd1", models_root, 1),
        "sd2": tiny_models.save_controlnet("sd2", models_root, 0),
        "sdxl": tiny_models.save_controlnet("sdxl", models_root, 0),
        "sdxl-b": tiny_models.save_controlnet("sdxl", models_root, 1),
    }


def load(path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return load(sd1_path)


@pytest.fixture(scope="module")
def sdxl(sdxl_path: Path) -> latentkit.LatentDiffusion:
    return load(sdxl_path)


def reference(cls_name: str, path: Path, controlnets: list[Path], **kw: Any) -> Any:
    import diffusers

    nets = [diffusers.ControlNetModel.from_pretrained(str(p)) for p in controlnets]
    extra = {} if "XL" in cls_name else {"safety_checker": None}
    pipe = getattr(diffusers, cls_name).from_pretrained(
        str(path), controlnet=nets[0] if len(nets) == 1 else nets, **extra, **kw
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs(pipe: Any, seed: int, **kw: Any) -> np.ndarray:
    out = pipe(
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        num_inference_steps=STEPS,
        **kw,
    )
    return np.asarray(out.images)


def ours(
    pipe: latentkit.LatentDiffusion, seed: int, prompt: Any = "a red cat", **kw: Any
) -> np.ndarray:
    result = pipe.generate(prompt, seed=seed, steps=STEPS, output_type="np", progress=False, **kw)
    return np.asarray(result.images)


def their_keywords(kw: dict[str, Any]) -> dict[str, Any]:
    """latentkit's keywords spelled as diffusers' ControlNet pipelines spell them."""
    names = {
        "control_scale": "controlnet_conditioning_scale",
        "control_start": "control_guidance_start",
        "control_end": "control_guidance_end",
        "num_images": "num_images_per_prompt",
    }
    out = {names.get(k, k): v for k, v in kw.items() if k != "control_image"}
    return out


# ---------------------------------------------------------------- the networks


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("guess", [False, True])
def test_controlnet_network_matches_diffusers(
    nets: dict[str, Path], kind: str, guess: bool
) -> None:
    import diffusers

    from latentkit.models.unet import time_ids_embedding

    theirs_net = diffusers.ControlNetModel.from_pretrained(str(nets[kind])).eval()
    config = ControlNetConfig.from_dict(dict(theirs_net.config))
    mine = ControlNet(config).eval()
    state = theirs_net.state_dict()
    assert set(mine.state_dict()) == set(state)  # module paths equal diffusers' keys
    mine.load_state_dict(state)
    torch.manual_seed(0)
    x, image = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 16, 16)
    context = torch.randn(2, 5, config.unet.cross_attention_dim)
    added, vector = None, None
    if kind == "sdxl":
        pooled, ids = torch.randn(2, 40), torch.rand(2, 6) * 64
        added = {"text_embeds": pooled, "time_ids": ids}
        sinusoids = time_ids_embedding(ids, 8, flip_sin_to_cos=True, freq_shift=0)
        vector = torch.cat([pooled, sinusoids], dim=-1)
    with torch.no_grad():
        down, mid = theirs_net(
            x,
            torch.tensor(421),
            encoder_hidden_states=context,
            controlnet_cond=image,
            conditioning_scale=0.7,
            guess_mode=guess,
            added_cond_kwargs=added,
            return_dict=False,
        )
        got = mine(x, torch.tensor(421.0), context, image, vector, scale=0.7, ramp=guess)
    assert len(got.down) == len(down) == mine.skip_count
    for a, b in zip(got.down, down, strict=True):
        assert (a - b).abs().max() <= NET_TOL
    assert (got.mid - mid).abs().max() <= NET_TOL
    assert mid.abs().mean() > 1e-2  # the zero convolutions are not zero


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_from_unet_copies_the_encoder_as_diffusers_does(models_root: Path, kind: str) -> None:
    """`ControlNet.from_unet` gives diffusers' ``ControlNetModel.from_unet``: the same config
    and keys, the UNet's encoder weights, zero convolutions that are zero; so before training
    its residuals are zero and the UNet draws as without it (Zhang et al. 2023, sec. 3.1)."""
    import diffusers
    import tiny_models

    folder = tiny_models.save_pipeline(kind, models_root)
    theirs = diffusers.ControlNetModel.from_unet(
        diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet")),
        conditioning_embedding_out_channels=(8, 16),
    )
    unet = load(folder).unet
    mine = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    assert mine.control_config == ControlNetConfig.from_dict(dict(theirs.config))
    state = theirs.state_dict()
    assert set(mine.state_dict()) == set(state)
    # The control embedding's first layers are freshly initialised in both (at random).
    fresh = ("controlnet_cond_embedding.conv_in.", "controlnet_cond_embedding.blocks.")
    for key, value in mine.state_dict().items():
        if not key.startswith(fresh):
            assert torch.equal(value, state[key]), key
    assert not any(
        torch.equal(mine.state_dict()[k], state[k]) for k in state if k.startswith(fresh)
    )
    torch.manual_seed(0)
    x, image = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 16, 16)
    context = torch.randn(2, 5, mine.control_config.unet.cross_attention_dim)
    vector = torch.randn(2, mine.control_config.unet.vector_dim) if kind == "sdxl" else None
    with torch.no_grad():
        residuals = mine(x, torch.tensor(421.0), context, image, vector)
        plain = unet(x, torch.tensor(421.0), context, vector)
        controlled = unet(x, torch.tensor(421.0), context, vector, control=residuals)
    assert all(not r.any() for r in (*residuals.down, residuals.mid))
    assert torch.equal(plain, controlled)


def test_save_controlnet_writes_what_diffusers_and_with_controlnet_read(
    sd1: Any, tmp_path: Path
) -> None:
    import diffusers

    from latentkit.errors import InvalidArgumentError
    from latentkit.saving import save_controlnet

    mine = ControlNet.from_unet(sd1.unet, conditioning_embedding_out_channels=(8, 16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained weights: the zero convolutions are not zero
        for p in mine.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    folder = save_controlnet(tmp_path / "net", mine)
    assert sorted(f.name for f in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    state = mine.state_dict()
    theirs = diffusers.ControlNetModel.from_pretrained(str(folder)).state_dict()
    assert set(theirs) == set(state)
    assert all(torch.equal(theirs[k], v) for k, v in state.items())
    attached = sd1.with_controlnet(folder, progress=False).controls[0].network
    assert attached.control_config == mine.control_config
    assert all(torch.equal(attached.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(InvalidArgumentError, match="overwrite=True"):
        save_controlnet(folder, mine)
    assert save_controlnet(folder, mine, overwrite=True) == folder


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_unet_adds_residuals_where_diffusers_does(models_root: Path, kind: str) -> None:
    import diffusers
    import tiny_models

    from latentkit.models.unet import UNet2DCondition, UNetConfig

    folder = tiny_models.save_pipeline(kind, models_root) / "unet"
    theirs_unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder)).eval()
    mine = UNet2DCondition(UNetConfig.from_dict(dict(theirs_unet.config))).eval()
    mine.load_state_dict(theirs_unet.state_dict())
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, mine.config.cross_attention_dim)
    with torch.no_grad():
        skips = mine.encode(mine.conv_in(x), torch.zeros(2, 4 * 32), context)[1]
    down = tuple(torch.randn_like(s) for s in skips)
    mid = torch.randn_like(skips[-1])
    added, vector = None, None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(2, 40), "time_ids": torch.rand(2, 6) * 64}
        vector = torch.cat(
            [
                added["text_embeds"],
                latentkit.models.unet.time_ids_embedding(
                    added["time_ids"], 8, flip_sin_to_cos=True, freq_shift=0
                ),
            ],
            dim=-1,
        )
    with torch.no_grad():
        expected = theirs_unet(
            x,
            300,
            encoder_hidden_states=context,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        got = mine(x, 300, context, vector, ControlResiduals(down, mid))
        plain = mine(x, 300, context, vector)
    assert (got - expected).abs().max() <= NET_TOL
    assert (got - plain).abs().max() > 1e-2
    with pytest.raises(latentkit.InvalidArgumentError, match="skip residuals"):
        mine(x, 300, context, vector, ControlResiduals(down[:-1], mid))


def test_config_reads_and_writes_diffusers_configs(nets: dict[str, Path]) -> None:
    import json

    for kind in ("sd1", "sdxl"):
        data = json.loads((nets[kind] / "config.json").read_text())
        config = ControlNetConfig.from_dict(data)
        assert config.downscale == 2 and config.conditioning_embedding_out_channels == (8, 16)
        assert ControlNetConfig.from_dict(config.to_dict()) == config
    sdxl = ControlNetConfig.from_dict(json.loads((nets["sdxl"] / "config.json").read_text()))
    assert sdxl.unet.vector_dim == 40 + 6 * 8 and sdxl.unet.transformer_depths == (1, 2, 3)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"_class_name": "ControlNetXSAdapter"}, latentkit.UnsupportedModelError, "ControlNetXS"),
        ({"mid_block_type": "UNetMidBlock2D"}, latentkit.UnsupportedModelError, "mid_block_type"),
        (
            {"controlnet_conditioning_channel_order": "rgba"},
            latentkit.UnsupportedModelError,
            "channel_order",
        ),
        ({"conditioning_embedding_out_channels": []}, latentkit.InvalidArgumentError, "list"),
        ({"conditioning_channels": 0}, latentkit.InvalidArgumentError, "conditioning_channels"),
        ({"global_pool_conditions": "yes"}, latentkit.InvalidArgumentError, "global_pool"),
        ({"block_out_channels": [0, 64]}, latentkit.InvalidArgumentError, "block_out_channels"),
    ],
)
def test_config_refusals(
    nets: dict[str, Path], change: dict[str, Any], error: type[Exception], match: str
) -> None:
    import json

    data = json.loads((nets["sd1"] / "config.json").read_text())
    with pytest.raises(error, match=match):
        ControlNetConfig.from_dict({**data, **change})


# ---------------------------------------------------------------- text-to-image parity


SD1_CASES = {
    "single": (["sd1"], dict()),
    "scale": (["sd1"], dict(control_scale=0.6)),
    "window": (["sd1"], dict(control_start=0.25, control_end=0.75)),
    "guess": (["sd1"], dict(guess_mode=True, guidance_scale=4.0)),
    "unguided": (["sd1"], dict(guidance_scale=1.0)),
    "guess-unguided": (["sd1"], dict(guess_mode=True, guidance_scale=1.0)),
    "negative-batch": (
        ["sd1"],
        dict(prompt=["a red cat", "a photo"], negative_prompt=["blurry", "dark"], num_images=2),
    ),
    "multi": (["sd1", "sd1-b"], dict(control_scale=[0.5, 1.2])),
    "multi-window": (
        ["sd1", "sd1-b"],
        dict(control_scale=[1.0, 0.8], control_start=[0.0, 0.5], control_end=[0.5, 1.0]),
    ),
    "multi-guess": (["sd1", "sd1-b"], dict(guess_mode=True, control_scale=[0.7, 1.1])),
}


@pytest.mark.parametrize("case", sorted(SD1_CASES))
def test_sd1_text_to_image_matches_diffusers(
    sd1: Any, sd1_path: Path, nets: dict[str, Path], case: str
) -> None:
    names, kw = SD1_CASES[case]
    kw = dict(kw)
    prompt = kw.pop("prompt", "a red cat")
    images = [edges(i) for i in range(len(names))]
    control = images[0] if len(names) == 1 else images
    ref = reference("StableDiffusionControlNetPipeline", sd1_path, [nets[n] for n in names])
    expected = theirs(ref, 7, prompt=prompt, image=control, **their_keywords(kw))
    pipe = sd1
    for name in names:
        pipe = pipe.with_controlnet(nets[name])
    got = ours(pipe, 7, prompt, control_image=control, **kw)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL
    # The ControlNet matters: without it the image differs.
    plain = ours(sd1, 7, prompt, height=SIZE, width=SIZE, **_without_control(kw))
    assert np.abs(plain - expected).max() > 1e-2


def _without_control(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if not k.startswith("control") and k != "guess_mode"}


def test_sd2_matches_diffusers(sd2_path: Path, nets: dict[str, Path]) -> None:
    """SD 2.x: v-prediction DDIM, 1024-wide context, linear projections."""
    ref = reference("StableDiffusionControlNetPipeline", sd2_path, [nets["sd2"]])
    expected = theirs(ref, 3, prompt="a red cat", image=edges(2), controlnet_conditioning_scale=0.9)
    pipe = load(sd2_path).with_controlnet(nets["sd2"])
    got = ours(pipe, 3, control_image=edges(2), control_scale=0.9)
    assert np.abs(got - expected).max() <= TOL


SDXL_CASES = {
    "single": (["sdxl"], dict()),
    "guess": (["sdxl"], dict(guess_mode=True)),
    "window": (["sdxl"], dict(control_start=0.3, control_end=0.8, control_scale=0.7)),
    "negative": (["sdxl"], dict(negative_prompt="blurry", prompt_2="a photo")),
    "multi": (["sdxl", "sdxl-b"], dict(control_scale=[0.6, 1.3])),
    "end": (["sdxl"], dict(denoising_end=0.6, control_end=0.9)),
}


@pytest.mark.parametrize("case", sorted(SDXL_CASES))
def test_sdxl_text_to_image_matches_diffusers(
    sdxl: Any, sdxl_path: Path, nets: dict[str, Path], case: str
) -> None:
    names, kw = SDXL_CASES[case]
    images = [edges(i) for i in range(len(names))]
    control = images[0] if len(names) == 1 else images
    ref = reference("StableDiffusionXLControlNetPipeline", sdxl_path, [nets[n] for n in names])
    expected = theirs(ref, 5, prompt="a red cat", image=control, **their_keywords(kw))
    pipe = sdxl
    for name in names:
        pipe = pipe.with_controlnet(nets[name])
    got = ours(pipe, 5, control_image=control, **kw)
    assert np.abs(got - expected).max() <= TOL


# ---------------------------------------------------------------- image tasks parity


@pytest.mark.parametrize("guess", [False, True])
def test_sd1_image_to_image_matches_diffusers(
    sd1: Any, sd1_path: Path, nets: dict[str, Path], guess: bool
) -> None:
    # Without control_scale: diffusers' image-to-image default, 0.8.
    kw: dict[str, Any] = dict(strength=0.75, control_end=0.7, guess_mode=guess)
    if guess:
        kw["control_scale"] = 1.3
    ref = reference("StableDiffusionControlNetImg2ImgPipeline", sd1_path, [nets["sd1"]])
    expected = theirs(
        ref, 11, prompt="a red cat", image=picture(1), control_image=edges(1), **their_keywords(kw)
    )
    got = ours(sd1.with_controlnet(nets["sd1"]), 11, image=picture(1), control_image=edges(1), **kw)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("model", ["sd1", "inpaint"])
def test_sd1_inpainting_matches_diffusers(
    sd1_path: Path, inpaint_path: Path, nets: dict[str, Path], model: str
) -> None:
    """A 4-channel model inpaints by blending; the 9-channel inpainting model reads the mask
    and masked picture; the ControlNet reads the 4 latent channels either way."""
    path = sd1_path if model == "sd1" else inpaint_path
    # The 4-channel model without control_scale: diffusers' inpainting default, 0.5.
    kw: dict[str, Any] = (
        dict(strength=0.8) if model == "sd1" else dict(strength=1.0, control_scale=0.9)
    )
    ref = reference("StableDiffusionControlNetInpaintPipeline", path, [nets["sd1"]])
    expected = theirs(
        ref,
        13,
        prompt="a red cat",
        image=picture(2),
        mask_image=half_mask(),
        control_image=edges(3),
        **their_keywords(kw),
    )
    pipe = load(path).with_controlnet(nets["sd1"])
    got = ours(pipe, 13, image=picture(2), mask_image=half_mask(), control_image=edges(3), **kw)
    assert np.abs(got - expected).max() <= TOL


def test_sdxl_image_to_image_matches_diffusers(
    sdxl: Any, sdxl_path: Path, nets: dict[str, Path]
) -> None:
    kw = dict(strength=0.6)  # control_scale: diffusers' SDXL image-to-image default, 0.8
    ref = reference("StableDiffusionXLControlNetImg2ImgPipeline", sdxl_path, [nets["sdxl"]])
    expected = theirs(
        ref, 17, prompt="a red cat", image=picture(4), control_image=edges(4), **their_keywords(kw)
    )
    got = ours(
        sdxl.with_controlnet(nets["sdxl"]), 17, image=picture(4), control_image=edges(4), **kw
    )
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("model", ["sdxl", "sdxl_inpaint"])
def test_sdxl_inpainting_matches_diffusers(
    sdxl_path: Path, sdxl_inpaint_path: Path, nets: dict[str, Path], model: str
) -> None:
    path = sdxl_path if model == "sdxl" else sdxl_inpaint_path
    # The base without control_scale: diffusers' SDXL inpainting default, 1.0.
    kw: dict[str, Any] = (
        dict(strength=0.9) if model == "sdxl" else dict(strength=0.9, control_scale=1.1)
    )
    ref = reference("StableDiffusionXLControlNetInpaintPipeline", path, [nets["sdxl"]])
    expected = theirs(
        ref,
        19,
        prompt="a red cat",
        image=picture(5),
        mask_image=half_mask(),
        control_image=edges(5),
        **their_keywords(kw),
    )
    pipe = load(path).with_controlnet(nets["sdxl"])
    got = ours(pipe, 19, image=picture(5), mask_image=half_mask(), control_image=edges(5), **kw)
    assert np.abs(got - expected).max() <= TOL


# ---------------------------------------------------------------- the pipeline contract


def test_base_pipeline_is_unchanged(sd1: Any, nets: dict[str, Path]) -> None:
    before = ours(sd1, 2, height=SIZE, width=SIZE)
    controlled = sd1.with_controlnet(nets["sd1"])
    twice = controlled.with_controlnet(nets["sd1-b"])
    assert sd1.controls == () and len(controlled.controls) == 1 and len(twice.controls) == 2
    assert twice.controls[0] is controlled.controls[0]  # shared, not reloaded
    after = ours(sd1, 2, height=SIZE, width=SIZE)
    assert np.array_equal(before, after)  # bit-identical
    assert controlled.unet is sd1.unet  # the new pipeline shares the weights


def test_a_loaded_controlnet_attaches_to_several_pipelines(
    sd1: Any, inpaint_path: Path, nets: dict[str, Path]
) -> None:
    control = sd1.with_controlnet(nets["sd1"]).controls[0]
    assert isinstance(control, ControlNetConditioner)
    assert control.target == "control" and "controlnet" in latentkit.conditioners.names()
    again = ours(sd1.with_controlnet(control), 4, control_image=edges())
    loaded = ours(sd1.with_controlnet(nets["sd1"]), 4, control_image=edges())
    assert np.array_equal(again, loaded)
    assert load(inpaint_path).with_controlnet(control).controls == (control,)


def test_control_image_inputs_are_equivalent(
    sd1: Any, nets: dict[str, Path], tmp_path: Path
) -> None:
    pipe = sd1.with_controlnet(nets["sd1"])
    image = edges(4)
    path = tmp_path / "edges.png"
    image.save(path)
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    results = [ours(pipe, 1, control_image=v) for v in (image, path, str(path), array, tensor)]
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_output_size_follows_the_control_image(
    sd1: Any, sd1_path: Path, nets: dict[str, Path]
) -> None:
    """Text-to-image without height/width takes the control image's size (as diffusers);
    an image of another size is resized to the output."""
    control = edges(0, size=(24, 16))  # width 24, height 16
    ref = reference("StableDiffusionControlNetPipeline", sd1_path, [nets["sd1"]])
    expected = theirs(ref, 9, prompt="a red cat", image=control)
    pipe = sd1.with_controlnet(nets["sd1"])
    got = ours(pipe, 9, control_image=control)
    assert got.shape == expected.shape == (1, 16, 24, 3)
    assert np.abs(got - expected).max() <= TOL
    sized = pipe.generate("a cat", control_image=control, height=SIZE, width=SIZE, steps=1)
    assert sized.images[0].size == (SIZE, SIZE)


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentkit.models.unet import UNet2DCondition, UNetEncoder

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a network ran before the argument check")

    for cls in (UNet2DCondition, UNetEncoder, ControlNet):
        monkeypatch.setattr(cls, "forward", boom)
    monkeypatch.setattr(latentkit.models.autoencoder.AutoencoderKL, "encode", boom)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(control_image=[edges(0), edges(1), edges(2)]), "3 control images for 2"),
        (dict(control_image=edges(0)), "1 control images for 2"),
        (dict(control_image=[edges(0)] * 2, control_scale=[1.0]), "control_scale has 1"),
        (
            dict(control_image=[edges(0)] * 2, control_start=[0.1, 0.2, 0.3]),
            "control_start has 3",
        ),
        (
            dict(control_image=[edges(0)] * 2, control_start=[0.1, 0.6], control_end=[0.5, 0.5]),
            r"control_start \(0.6\) must be below control_end \(0.5\) for ControlNet 1",
        ),
        (dict(control_image=[edges(0)] * 2, control_start=0.5, control_end=0.5), "below"),
        (dict(control_image=[edges(0)] * 2, control_end=1.5), r"control_end must be .* \[0, 1\]"),
        (dict(control_image=[edges(0)] * 2, control_scale=float("nan")), "control_scale"),
        (dict(control_image=[edges(0)] * 2, control_scale="strong"), "control_scale"),
        (dict(control_image=[edges(0)] * 2, guess_mode="yes"), "guess_mode must be True"),
        (dict(control_image=[]), "non-empty"),
        (dict(control_image=[edges(0), 42]), "must be a PIL image"),
        (dict(control_image=[edges(0), "/no/such.png"]), "no image file"),
        (dict(), "pass control_image="),
        (dict(control_scale=0.5), "control_scale needs control_image"),
        (dict(guess_mode=True), "guess_mode needs control_image"),
    ],
)
def test_bad_control_arguments(
    sd1: Any, nets: dict[str, Path], no_heavy_work: None, kwargs: dict[str, Any], match: str
) -> None:
    pipe = sd1.with_controlnet(nets["sd1"]).with_controlnet(nets["sd1-b"])
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        pipe.generate("a cat", steps=2, progress=False, **kwargs)


def test_control_image_without_a_controlnet(sd1: Any, no_heavy_work: None) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match="needs a ControlNet"):
        sd1.generate("a cat", control_image=edges(), progress=False)


@pytest.mark.parametrize(
    ("pipeline", "net", "match"),
    [
        ("sd1", "sdxl", "cross_attention_dim=80 vs 32.*vector_dim=88 vs None"),
        ("sdxl", "sd1", "cross_attention_dim=32 vs 80"),
        ("sd1", "sd2", "cross_attention_dim=1024 vs 32"),
    ],
)
def test_controlnet_for_another_base_is_refused_before_loading(
    pipeline: str,
    net: str,
    match: str,
    nets: dict[str, Path],
    models_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tiny_models

    pipe = load(tiny_models.save_pipeline(pipeline, models_root))

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the weights were read before the check")

    monkeypatch.setattr(latentkit.loading, "read_state_dict", boom)
    with pytest.raises(latentkit.UnsupportedModelError, match=match):
        pipe.with_controlnet(nets[net])


def test_a_loaded_controlnet_for_another_base_is_refused(
    sd1: Any, sdxl: Any, nets: dict[str, Path]
) -> None:
    xl = sdxl.with_controlnet(nets["sdxl"]).controls[0]
    with pytest.raises(latentkit.UnsupportedModelError, match="does not fit"):
        sd1.with_controlnet(xl)


# ---------------------------------------------------------------- files


def test_controlnet_files(sd1: Any, nets: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    with pytest.raises(latentkit.ModelNotFoundError):
        sd1.with_controlnet(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(latentkit.MissingComponentError, match=r"config\.json"):
        sd1.with_controlnet(empty)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(nets["sd1"] / "config.json", no_weights)
    with pytest.raises(latentkit.MissingComponentError, match="no ControlNet weights"):
        sd1.with_controlnet(no_weights)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(nets["sd1"] / "config.json", pickled)
    from safetensors.torch import load_file

    torch.save(
        load_file(nets["sd1"] / "diffusion_pytorch_model.safetensors"),
        pickled / "diffusion_pytorch_model.bin",
    )
    with pytest.raises(latentkit.PickleWeightsError):
        sd1.with_controlnet(pickled)
    a = ours(sd1.with_controlnet(pickled, allow_pickle=True), 3, control_image=edges())
    b = ours(sd1.with_controlnet(nets["sd1"]), 3, control_image=edges())
    assert np.array_equal(a, b)
    # A variant's weights are preferred when asked for.
    variant = tmp_path / "variant"
    shutil.copytree(nets["sd1"], variant)
    other = nets["sd1-b"] / "diffusion_pytorch_model.safetensors"
    shutil.copy(other, variant / "diffusion_pytorch_model.fp16.safetensors")
    c = ours(sd1.with_controlnet(variant, variant="fp16"), 3, control_image=edges())
    d = ours(sd1.with_controlnet(nets["sd1-b"]), 3, control_image=edges())
    assert np.array_equal(c, d)
    # Broken weights: a typed error naming the file.
    broken = tmp_path / "broken"
    shutil.copytree(nets["sd1"], broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(latentkit.errors.CorruptFileError):
        sd1.with_controlnet(broken)


def test_controlnet_from_the_hub_cache_offline(
    sd1: Any, nets: dict[str, Path], tmp_path: Path
) -> None:
    """A Hub repo id resolves through the Hugging Face cache (here offline): only
    ``config.json`` and the weights at the repo's root."""
    import shutil

    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-controlnet"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(nets["sd1"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = sd1.with_controlnet("someone/tiny-controlnet", cache_dir=tmp_path, local_files_only=True)
    assert pipe.controls[0].source == "someone/tiny-controlnet"
    a = ours(pipe, 6, control_image=edges())
    b = ours(sd1.with_controlnet(nets["sd1"]), 6, control_image=edges())
    assert np.array_equal(a, b)
    with pytest.raises(latentkit.ModelNotCachedError):
        sd1.with_controlnet("someone/absent", cache_dir=tmp_path, local_files_only=True)
    # A single file in a repo: org/repo/file.
    original_file(nets["sd1"], snapshot / "canny.safetensors")
    single = sd1.with_controlnet(
        "someone/tiny-controlnet/canny.safetensors", cache_dir=tmp_path, local_files_only=True
    )
    assert np.array_equal(ours(single, 6, control_image=edges()), b)


# ---------------------------------------------------------------- the loop


def test_control_window_follows_diffusers_keep_rule() -> None:
    """diffusers' ``controlnet_keep``: on at evaluation i of n iff start <= i/n and
    (i+1)/n <= end."""
    run = ControlRun(
        [], [], scales=[], windows=[(0.25, 0.75), (0.0, 0.5)], guess_mode=False, evaluations=8
    )
    assert [k[0] for k in run.keep] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert [k[1] for k in run.keep] == [1, 1, 1, 1, 0, 0, 0, 0]


def test_controlnet_runs_only_inside_its_window(sd1: Any, nets: dict[str, Path]) -> None:
    pipe = sd1.with_controlnet(nets["sd1"])
    calls = []
    network = pipe.controls[0].network
    handle = network.register_forward_hook(lambda *a: calls.append(1))
    try:
        ours(pipe, 1, control_image=edges(), control_start=0.5, scheduler="ddim")
    finally:
        handle.remove()
    assert len(calls) == STEPS // 2


def test_compiled_unet_takes_residuals(sd1_path: Path, nets: dict[str, Path]) -> None:
    """A compiled UNet (aot_eager: traced, not code-generated) takes the residuals too."""
    plain = load(sd1_path).with_controlnet(nets["sd1"])
    compiled = latentkit.load_pipeline(
        sd1_path,
        device="cpu",
        progress=False,
        performance=latentkit.Performance(compile=True, compile_backend="aot_eager"),
    ).with_controlnet(nets["sd1"])
    a = ours(plain, 8, control_image=edges())
    b = ours(compiled, 8, control_image=edges())
    assert np.abs(a - b).max() <= TOL


def test_threads_share_a_controlled_pipeline(sd1: Any, nets: dict[str, Path]) -> None:
    pipe = sd1.with_controlnet(nets["sd1"])
    expected = [ours(pipe, s, control_image=edges(s)) for s in range(3)]
    got: dict[int, np.ndarray] = {}

    def work(s: int) -> None:
        got[s] = ours(pipe, s, control_image=edges(s))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(3):
        assert np.array_equal(got[s], expected[s])


# ---------------------------------------------------------------- command line


def test_command_line_matches_the_python_call(
    sd1: Any, sd1_path: Path, nets: dict[str, Path], tmp_path: Path
) -> None:
    from latentkit.cli import main

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"control-{i}.png")
        edges(i).save(paths[-1])
    out = tmp_path / "out.png"
    args = ["generate", "a red cat", "-o", str(out), "--model", str(sd1_path), "--quiet"]
    args += ["--steps", str(STEPS), "--seed", "7", "--device", "cpu"]
    args += ["--controlnet", str(nets["sd1"]), "--controlnet", str(nets["sd1-b"])]
    args += ["--control-image", str(paths[0]), "--control-image", str(paths[1])]
    args += ["--control-scale", "0.5", "--control-scale", "1.2", "--control-end", "0.75"]
    args += ["--guess-mode"]
    assert main(args) == 0
    pipe = sd1.with_controlnet(nets["sd1"]).with_controlnet(nets["sd1-b"])
    expected = pipe.generate(
        "a red cat",
        steps=STEPS,
        seed=7,
        control_image=[edges(0), edges(1)],
        control_scale=[0.5, 1.2],
        control_end=0.75,
        guess_mode=True,
        progress=False,
    ).images[0]
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--control-image", "x.png"], "--control-image need"),
        (["--guess-mode"], "--guess-mode need"),
        (
            ["--controlnet", "a", "--controlnet", "b", "--control-image", "x.png"],
            "1 --control-image for 2",
        ),
        (["--controlnet", "a", "--control-image", "/no/such.png"], "no image file"),
    ],
)
def test_command_line_control_errors_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], match: str
) -> None:
    from latentkit.cli import main

    args = ["generate", "a cat", "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / "none")]
    assert main([*args, "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and "does not exist" not in err  # failed before the model was looked up


# ---------------------------------------------------------------- single files


def original_file(folder: Path, out: Path, *, prefix: str = "control_model.") -> Path:
    """The ControlNet in ``folder`` written as an original (lllyasviel / A1111) single file,
    its keys named by latentkit's key map (`latentkit.checkpoints.keys.controlnet_keys`)."""
    import json

    from safetensors.torch import load_file, save_file

    from latentkit.checkpoints.keys import UNetLayout, controlnet_keys

    config = ControlNetConfig.from_dict(json.loads((folder / "config.json").read_text()))
    keymap = controlnet_keys(
        UNetLayout.from_config(config.unet),
        hint_convs=2 * len(config.conditioning_embedding_out_channels),
    )
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    names = {k: keymap.original(k) for k in state}
    assert all(names.values()), [k for k, v in names.items() if not v]
    tensors = {prefix + str(names[k]): v for k, v in state.items()}
    if out.suffix == ".safetensors":
        save_file(tensors, out)
    else:
        torch.save(tensors, out)
    return out


def test_single_file_keys_are_the_ones_diffusers_reads(models_root: Path, tmp_path: Path) -> None:
    """A file written with latentkit's key map (SD 1.5's control embedding widths 16, 32,
    96, 256, which diffusers' converter assumes) is read by diffusers'
    ``ControlNetModel.from_single_file`` to the very weights it was written from, and by
    latentkit too, with the config read off its tensors and the base UNet."""
    import diffusers
    import tiny_models
    from safetensors.torch import load_file

    from latentkit.conditioners.control import load_single_file
    from latentkit.models.unet import UNetConfig

    sd1 = tiny_models.save_pipeline("sd1", models_root)
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd1 / "unet"))
    net = diffusers.ControlNetModel.from_unet(unet)  # diffusers' default embedding widths
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    folder = tmp_path / "controlnet"
    net.save_pretrained(str(folder))
    expected = load_file(folder / "diffusion_pytorch_model.safetensors")
    path = original_file(folder, tmp_path / "control_sd15_tiny.safetensors")

    theirs_net = diffusers.ControlNetModel.from_single_file(
        str(path), config=str(folder), local_files_only=True
    )
    theirs_state = theirs_net.state_dict()
    assert set(theirs_state) == set(expected)
    assert all(torch.equal(theirs_state[k], expected[k]) for k in expected)

    base = UNetConfig.from_dict(dict(unet.config))
    mine = load_single_file(path, base=base, device=torch.device("cpu"), dtype=torch.float32)
    state = mine.network.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    config = mine.network.control_config
    assert config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    assert config.unet.in_channels == 4 and config.unet.cross_attention_dim == 32


def test_single_file_controlnets_in_a_pipeline(
    sd1: Any, nets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    expected = ours(sd1.with_controlnet(nets["sd1"]), 2, control_image=edges())
    files = [
        original_file(nets["sd1"], tmp_path / "canny.safetensors"),
        original_file(nets["sd1"], tmp_path / "canny-bare.pth", prefix=""),
        shutil.copy(
            nets["sd1"] / "diffusion_pytorch_model.safetensors", tmp_path / "diff.safetensors"
        ),
    ]
    for path in files:
        pipe = sd1.with_controlnet(path, allow_pickle=True)
        assert pipe.controls[0].source == str(path)
        assert np.array_equal(ours(pipe, 2, control_image=edges()), expected), path.name
    with pytest.raises(latentkit.PickleWeightsError):
        sd1.with_controlnet(files[1])
    # Not a ControlNet: the UNet's weights.
    unet_file = shutil.copy(
        nets["sd1"].parent / "sd1" / "unet" / "diffusion_pytorch_model.safetensors",
        tmp_path / "unet.safetensors",
    )
    with pytest.raises(latentkit.WeightMismatchError, match="not a ControlNet file"):
        sd1.with_controlnet(unet_file)
    # Another base: refused from the tensors' shapes, before any tensor is read.
    xl = original_file(nets["sdxl"], tmp_path / "xl.safetensors")
    from latentkit.checkpoints.single_file import Checkpoint

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a tensor was read before the check")

    monkeypatch.setattr(Checkpoint, "__getitem__", boom)
    with pytest.raises(latentkit.UnsupportedModelError, match="cross_attention_dim=80 vs 32"):
        sd1.with_controlnet(xl)
