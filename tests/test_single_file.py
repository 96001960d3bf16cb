"""Single-file checkpoints (issue 13): the original CompVis/sgm layout loads to the same images
as the diffusers folder it was written from, and as diffusers' ``from_single_file``.

The tiny files are written from the tiny pipelines by the inverse key map (tests/test_keys.py
proves diffusers' own converter reads them back to the same weights); the published
architectures are checked on shapes alone (no weights allocated).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models
import torch
from safetensors.torch import save_file
from test_keys import FAMILY, layout_of, our_state

import latentkit
from latentkit.checkpoints import keys as K
from latentkit.checkpoints.configs import FAMILIES, clip_tokenizer

TOL = 1e-4
SIZE = 32


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def written(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    kind = request.param
    pipe = tiny_models.build_pipeline(kind)
    root = tmp_path_factory.mktemp(f"single-{kind}")
    pipe.save_pretrained(str(root / "folder"), safe_serialization=True)
    layout = layout_of(pipe, FAMILY[kind])
    original = {k: v.contiguous() for k, v in K.to_original(our_state(pipe), layout=layout)}
    save_file(original, str(root / "model.safetensors"))
    return kind, root


def images(pipe: Any, **kw: Any) -> np.ndarray:
    kw = {"steps": 3, "seed": 5, "height": SIZE, "width": SIZE, "output_type": "np", **kw}
    return np.asarray(pipe.generate("a photo of a red cat", progress=False, **kw).images)


def test_single_file_equals_its_folder_and_diffusers(written: tuple[str, Path]) -> None:
    import diffusers

    kind, root = written
    folder = latentkit.load_pipeline(root / "folder", device="cpu", progress=False)
    single = latentkit.load_pipeline(
        root / "model.safetensors", config=root / "folder", device="cpu", progress=False
    )
    assert single.family == folder.family
    for a, b in zip(
        (single.unet, single.vae, *(t.text_encoder for t in single.text)),
        (folder.unet, folder.vae, *(t.text_encoder for t in folder.text)),
        strict=True,
    ):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # The weights are bit-identical (above); images agree to float rounding.
    assert np.abs(images(single) - images(folder)).max() <= TOL

    cls = (
        diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    )
    kw = {} if kind == "sdxl" else {"safety_checker": None}
    reference = cls.from_single_file(
        str(root / "model.safetensors"), config=str(root / "folder"), local_files_only=True, **kw
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        "a photo of a red cat",
        num_inference_steps=3,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images
    assert np.abs(images(single) - expected).max() <= TOL


def test_prediction_type_and_vae_override(written: tuple[str, Path], tmp_path: Path) -> None:
    kind, root = written
    single = latentkit.load_pipeline(
        root / "model.safetensors",
        config=root / "folder",
        prediction_type="v_prediction",
        device="cpu",
        progress=False,
    )
    assert single.scheduler.prediction_type == "v_prediction"
    # A VAE swapped in from a diffusers folder, from a single file in diffusers' layout and
    # from one in the original layout all load the same weights.
    vae_folder = root / "folder" / "vae"
    flat = tmp_path / "vae.safetensors"
    shutil.copy(next(vae_folder.glob("*.safetensors")), flat)
    pipe = latentkit.load_pipeline(root / "folder", device="cpu", progress=False)
    original = tmp_path / "vae-original.safetensors"
    layout = layout_of(tiny_models.build_pipeline(kind), FAMILY[kind])
    state = {f"vae.{k}": v for k, v in pipe.vae.state_dict().items()}
    vae_layout = K.CheckpointLayout("sd1", (layout.component("vae"),))
    converted = {
        k.removeprefix("first_stage_model."): v.contiguous()
        for k, v in K.to_original(state, layout=vae_layout)
    }
    save_file(converted, str(original))
    for source in (vae_folder, flat, original):
        swapped = latentkit.load_pipeline(root / "folder", vae=source, device="cpu", progress=False)
        sa, sb = swapped.vae.state_dict(), pipe.vae.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb), source


def test_published_architectures_load_from_their_tensors_alone() -> None:
    """Each published family, on shapes only: the tensors' layout is detected, the published
    configs build modules whose every parameter one key of the file fills, shape for shape."""
    from latentkit.checkpoints.single_file import FAMILY_NAMES, _configs
    from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from latentkit.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
    from latentkit.models.unet import UNet2DCondition, UNetConfig

    for family, published in FAMILIES.items():
        with torch.device("meta"):
            modules = {
                "unet": UNet2DCondition(UNetConfig.from_dict(published["unet"])),
                "vae": AutoencoderKL(AutoencoderKLConfig.from_dict(published["vae"])),
                **{
                    e: CLIPTextEncoder(CLIPTextConfig.from_dict(published[e]))
                    for e in ("text_encoder", "text_encoder_2")
                    if e in published
                },
            }
        ours = {f"{c}.{k}": v for c, m in modules.items() for k, v in m.state_dict().items()}
        open_clip = None
        if family != "sd1":
            encoder = "text_encoder" if family == "sd2" else "text_encoder_2"
            layers = published[encoder]["num_hidden_layers"]
            open_clip = K.OpenCLIPLayout(
                layers=layers, file_layers=layers + (family == "sd2"), projection=family != "sd2"
            )
        layout = K.checkpoint_layout(
            family,
            unet=K.UNetLayout.from_config(modules["unet"].config),
            vae=K.VAELayout.from_config(modules["vae"].config),
            open_clip=open_clip,
        )
        shapes = {k: tuple(v.shape) for k, v in K.to_original(ours, layout=layout)}
        if family == "sd2":  # the file's 24th OpenCLIP layer, unused by SD 2.x
            extra = "cond_stage_model.model.transformer.resblocks.23.ln_1.weight"
            shapes[extra] = (1024,)
        detected = K.detect_layout(shapes)
        assert detected.family == family and FAMILY_NAMES[family]
        configs = _configs(detected, None, None)
        assert configs["unet"]["in_channels"] == 4
        expected_prediction = "v_prediction" if family == "sd2" else "epsilon"
        assert configs["scheduler"]["prediction_type"] == expected_prediction


def test_bundled_clip_tokenizer_gives_clips_ids() -> None:
    # CLIP ViT-L/14's published ids for this prompt (openai/clip-vit-large-patch14).
    assert clip_tokenizer()("a photo of a cat").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
    ]
    assert clip_tokenizer(pad_token="!").pad_token_id == 0


def test_pickle_checkpoints_need_opt_in(written: tuple[str, Path], tmp_path: Path) -> None:
    _, root = written
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(root / "model.safetensors"))}, ckpt)
    with pytest.raises(latentkit.PickleWeightsError, match="allow_pickle=True"):
        latentkit.load_pipeline(ckpt, config=root / "folder", progress=False)
    pipe = latentkit.load_pipeline(
        ckpt, config=root / "folder", allow_pickle=True, device="cpu", progress=False
    )
    folder = latentkit.load_pipeline(root / "folder", device="cpu", progress=False)
    assert np.abs(images(pipe) - images(folder)).max() <= TOL


def test_bad_single_files_are_typed_errors(tmp_path: Path, sd1_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(latentkit.LatentkitError):
        latentkit.load_pipeline(junk, progress=False)
    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(other))
    with pytest.raises(latentkit.LatentkitError):
        latentkit.load_pipeline(other, progress=False)
    with pytest.raises(latentkit.InvalidArgumentError, match="prediction_type"):
        latentkit.load_pipeline(other, prediction_type="x0", progress=False)  # type: ignore[arg-type]
