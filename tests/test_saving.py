"""save_pipeline writes a folder that latentkit and diffusers both load to the same images;
the configs' to_dict is the inverse of from_dict and a valid diffusers config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models
import torch

import latentkit
from latentkit import schedulers
from latentkit.conditioners.text import TextConditioner
from latentkit.errors import InvalidArgumentError
from latentkit.lab.training import build_word_tokenizer
from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from latentkit.models.unet import UNet2DCondition, UNetConfig
from latentkit.saving import save_pipeline

SIZE = 32  # pixels; the tiny VAE downsamples by 2
PROMPT = "a small red circle on a blue square"
WORDS = ["a", "small", "large", "red", "blue", "circle", "square", "on"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared machine their
    synchronisation dominates (training here ran 40x slower with 2 threads and a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_parts() -> dict[str, Any]:
    """Random tiny latentkit modules, a CLIP text encoder and a word tokenizer (16 tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_word_tokenizer(WORDS, model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DCondition(UNetConfig.from_dict(tiny_models.sd1_unet_kwargs()))
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(tiny_models.vae_kwargs()))
    with torch.no_grad():
        unet.conv_out.weight.mul_(5.0)  # random weights give near-grey images otherwise
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = schedulers.create(
        "ddim",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,  # diffusers' pipeline forces SD's False (and steps_offset=1) anyway
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
    )


def in_memory(parts: dict[str, Any]) -> latentkit.LatentDiffusion:
    return latentkit.LatentDiffusion(
        unet=parts["unet"],
        vae=parts["vae"],
        text=TextConditioner(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"]),
        scheduler=parts["scheduler"],
        scheduler_config=parts["scheduler"].to_config(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        name="in-memory",
    )


def images(pipe: latentkit.LatentDiffusion) -> np.ndarray:
    result = pipe.generate(
        PROMPT, seed=7, steps=4, height=SIZE, width=SIZE, output_type="np", progress=False
    )
    return np.stack(result.images)


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return tiny_parts()


@pytest.fixture(scope="module")
def expected(parts: dict[str, Any]) -> np.ndarray:
    """The in-memory modules' image, before any saving."""
    out = images(in_memory(parts))
    assert out.std() > 0.01  # not a flat image, so the comparisons mean something
    return out


@pytest.fixture(scope="module")
def saved(parts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("saved") / "model", **parts)


def test_layout(saved: Path) -> None:
    index = tiny_models.read_json(saved / "model_index.json")
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for path in (
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (saved / path).is_file(), path


def test_loads_back_to_identical_images(expected: np.ndarray, saved: Path) -> None:
    loaded = latentkit.load_pipeline(saved, device="cpu", dtype="fp32", progress=False)
    assert loaded.text[0].window == 16
    np.testing.assert_array_equal(images(loaded), expected)


def test_diffusers_loads_the_same_model(expected: np.ndarray, saved: Path) -> None:
    import diffusers

    pipe: Any = diffusers.StableDiffusionPipeline.from_pretrained(str(saved))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    ref = pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(7),
        num_inference_steps=4,
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    assert np.abs(expected - ref).max() <= 1e-4


def test_refuses_to_overwrite(parts: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="overwrite=True"):
        save_pipeline(tmp_path, **parts)
    stale = tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    stale.parent.mkdir()
    stale.write_text("stale")
    save_pipeline(tmp_path, **parts, overwrite=True)
    assert not stale.exists()  # component folders are replaced whole
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files are left alone
    assert (tmp_path / "model_index.json").is_file()


def test_writes_into_an_empty_folder(parts: dict[str, Any], tmp_path: Path) -> None:
    save_pipeline(tmp_path, **parts)  # exists but empty: no overwrite needed
    assert (tmp_path / "model_index.json").is_file()


def test_generation_defaults_are_the_models_recommendation(
    parts: dict[str, Any], tmp_path: Path
) -> None:
    save_pipeline(tmp_path, **parts, generation_defaults={"steps": 3, "guidance_scale": 2.5})
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_latentkit_defaults"] == {"steps": 3, "guidance_scale": 2.5}
    pipe = latentkit.load_pipeline(tmp_path, device="cpu", progress=False)
    calls: list[Any] = []
    out = pipe.generate(
        "a red circle", seed=0, height=16, width=16, callback=calls.append, progress=False
    )
    assert (out.parameters[0].steps, out.parameters[0].guidance_scale) == (3, 2.5)
    assert len(calls) == 3
    # The caller's values win.
    out = pipe.generate(
        "a red circle", seed=0, steps=2, guidance_scale=1.0, height=16, width=16, progress=False
    )
    assert (out.parameters[0].steps, out.parameters[0].guidance_scale) == (2, 1.0)


@pytest.mark.parametrize(
    "defaults", [{"steps": 0}, {"guidance_scale": -1}, {"sampler": "ddim"}, {"steps": True}]
)
def test_bad_generation_defaults_are_refused(
    parts: dict[str, Any], tmp_path: Path, defaults: dict[str, Any]
) -> None:
    with pytest.raises(InvalidArgumentError, match="_latentkit_defaults"):
        save_pipeline(tmp_path, **parts, generation_defaults=defaults)


@pytest.mark.parametrize("kwargs", [tiny_models.sd1_unet_kwargs(), tiny_models.sd2_unet_kwargs()])
def test_unet_config_round_trip(kwargs: dict[str, Any]) -> None:
    import diffusers

    config = UNetConfig.from_dict(kwargs)
    d = config.to_dict()
    assert UNetConfig.from_dict(d) == config
    ref = diffusers.UNet2DConditionModel.from_config(d)
    assert ref.config.attention_head_dim == list(config.num_attention_heads)
    ours = {k: tuple(v.shape) for k, v in UNet2DCondition(config).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_vae_config_round_trip() -> None:
    import diffusers

    config = AutoencoderKLConfig.from_dict(
        {**tiny_models.vae_kwargs(), "scaling_factor": 0.5, "sample_size": [16, 24]}
    )
    d = config.to_dict()
    assert AutoencoderKLConfig.from_dict(d) == config
    ref = diffusers.AutoencoderKL.from_config(d)
    assert ref.config.scaling_factor == 0.5
    ours = {k: tuple(v.shape) for k, v in AutoencoderKL(config).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_saved_scheduler_config_lets_ddim_run_on_latents(
    parts: dict[str, Any], tmp_path: Path
) -> None:
    from latentkit import schedulers

    save_pipeline(tmp_path, **parts)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["clip_sample"] is False
    # A DDIM made from the model's config, as a scheduler swap makes it, must not clip.
    assert schedulers.create("ddim", config=config).clip_sample is False  # type: ignore[attr-defined]
