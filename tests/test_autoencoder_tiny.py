"""TAESD (`latentkit.models.autoencoder_tiny`) against diffusers' ``AutoencoderTiny`` on
identical weights: the network at 1e-5 (fp32), pipelines with ``vae=`` a TAESD folder against
diffusers' pipelines given the same ``AutoencoderTiny`` at 1e-4 (fp32 images in [0, 1])."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit
from latentkit.errors import InvalidArgumentError, InvalidConfigError, UnsupportedModelError
from latentkit.models.autoencoder import AutoencoderKLConfig
from latentkit.models.autoencoder_tiny import (
    AutoencoderTiny,
    AutoencoderTinyConfig,
    autoencoder_config,
    build_autoencoder,
)
from latentkit.performance import Performance

TOL = 1e-5  # the network, fp32
IMAGE_TOL = 1e-4  # pipeline images, fp32, [0, 1]
SIZE = 32


def tiny_kwargs(**overrides: Any) -> dict[str, Any]:
    """A TAESD with 3 stages (factor 4): TAESD's structure, 16 channels instead of 64."""
    return {
        "encoder_block_out_channels": (16, 16, 16),
        "decoder_block_out_channels": (16, 16, 16),
        "num_encoder_blocks": (1, 2, 1),
        "num_decoder_blocks": (1, 2, 1),
        **overrides,
    }


def pair(**kwargs: Any) -> tuple[Any, AutoencoderTiny]:
    from diffusers import AutoencoderTiny as Reference

    torch.manual_seed(0)
    reference = Reference(**kwargs).eval()
    with torch.device("meta"):
        ours = AutoencoderTiny(AutoencoderTinyConfig.from_dict(dict(reference.config)))
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return reference, ours.eval()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"act_fn": "silu"}, {"scaling_factor": 0.5}, {"latent_channels": 6}],
    ids=["taesd", "silu", "scaled", "6-channels"],
)
def test_encode_and_decode_match_diffusers(overrides: dict[str, Any]) -> None:
    reference, ours = pair(**tiny_kwargs(**overrides))
    scale = reference.config.scaling_factor
    images = torch.rand(2, 3, 32, 24) * 2 - 1
    latents = torch.randn(2, reference.config.latent_channels, 8, 6) * 2
    with torch.no_grad():
        # As diffusers' pipelines use it: encoder output times scaling_factor, and back.
        expected_latents = reference.encode(images).latents * scale
        expected_images = reference.decode(latents / scale).sample
        got_latents = ours.encode(images, generator=torch.Generator().manual_seed(0))
        got_images = ours.decode(latents)
    assert got_latents.shape == expected_latents.shape == (2, ours.latent_channels, 8, 6)
    assert (got_latents - expected_latents).abs().max() <= TOL
    assert (got_images - expected_images).abs().max() <= TOL
    assert ours.scale_factor == 4


def test_taesd_keys_equal_diffusers_and_build_on_meta() -> None:
    from diffusers import AutoencoderTiny as Reference

    reference = Reference()  # TAESD's published configuration
    with torch.device("meta"):
        ours = AutoencoderTiny(AutoencoderTinyConfig.from_dict(dict(reference.config)))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    assert all(p.is_meta for p in ours.parameters())
    assert ours.scale_factor == 8 and ours.scaling_factor == 1.0


def test_config_round_trips_and_chooses_the_class() -> None:
    config = AutoencoderTinyConfig.from_dict(tiny_kwargs())
    assert AutoencoderTinyConfig.from_dict(config.to_dict()) == config
    assert autoencoder_config(config.to_dict()) == config
    kl = AutoencoderKLConfig().to_dict()
    assert autoencoder_config(kl) == AutoencoderKLConfig.from_dict(kl)
    with torch.device("meta"):
        assert isinstance(build_autoencoder(config), AutoencoderTiny)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"act_fn": "tanh"}, UnsupportedModelError, "act_fn"),
        ({"upsample_fn": "bilinear"}, UnsupportedModelError, "upsample_fn"),
        ({"shift_factor": 0.1}, UnsupportedModelError, "shift_factor"),
        ({"num_encoder_blocks": (1, 1)}, InvalidConfigError, "num_encoder_blocks"),
        ({"decoder_block_out_channels": "64"}, InvalidConfigError, "decoder_block_out"),
        ({"upsampling_scaling_factor": 4}, UnsupportedModelError, "upsamples by 16"),
        ({"latent_channels": 0}, InvalidConfigError, "latent_channels"),
        ({"scaling_factor": float("nan")}, InvalidConfigError, "scaling_factor"),
    ],
)
def test_bad_configs_are_typed_errors(
    overrides: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        AutoencoderTinyConfig.from_dict(tiny_kwargs(**overrides))


# ---------------------------------------------------------------- pipelines with vae=


@pytest.fixture(scope="module")
def taesd(taesd_path: Path) -> tuple[Path, Any]:
    """A tiny TAESD folder (`tiny_models.save_taesd`, the tiny SD's factor 2) and diffusers'
    model read from it."""
    from diffusers import AutoencoderTiny as Reference

    return taesd_path, Reference.from_pretrained(str(taesd_path)).eval()


def test_text_to_image_with_taesd_matches_diffusers(
    sd1_path: Path, taesd: tuple[Path, Any]
) -> None:
    import diffusers

    folder, reference = taesd
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False, vae=folder)
    assert isinstance(pipe.vae, AutoencoderTiny)
    got = pipe.generate(
        ["a cat", "a dog"],
        seed=[1, 2],
        steps=3,
        height=SIZE,
        width=SIZE,
        output_type="np",
        progress=False,
    ).images
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd1_path), vae=reference, safety_checker=None
    )
    ref.set_progress_bar_config(disable=True)
    expected = ref(
        ["a cat", "a dog"],
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        num_inference_steps=3,
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    assert np.abs(np.stack(got) - expected).max() <= IMAGE_TOL
    plain = latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False)
    kl = plain.generate(
        ["a cat", "a dog"],
        seed=[1, 2],
        steps=3,
        height=SIZE,
        width=SIZE,
        output_type="np",
        progress=False,
    ).images
    assert np.abs(np.stack(kl) - np.stack(got)).max() > 1e-2  # another decoder really ran


def test_image_to_image_with_taesd_matches_diffusers(
    sd1_path: Path, taesd: tuple[Path, Any]
) -> None:
    """TAESD encodes without sampling, so the seed's noise is drawn as diffusers draws it."""
    import diffusers

    folder, reference = taesd
    picture = np.random.default_rng(0).random((SIZE, SIZE, 3)).astype(np.float32)
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False, vae=folder)
    got = pipe.generate(
        "a cat", image=picture, strength=0.7, seed=5, steps=4, output_type="np", progress=False
    ).images
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        str(sd1_path), vae=reference, safety_checker=None
    )
    ref.set_progress_bar_config(disable=True)
    expected = ref(
        "a cat",
        image=torch.from_numpy(picture).permute(2, 0, 1)[None] * 2 - 1,
        strength=0.7,
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=4,
        output_type="np",
    ).images
    assert np.abs(np.stack(got) - expected).max() <= IMAGE_TOL


def test_vae_tiling_is_refused_with_taesd_before_loading(
    sd1_path: Path, taesd: tuple[Path, Any]
) -> None:
    with pytest.raises(InvalidArgumentError, match="vae_tiling works with the KL"):
        latentkit.load_pipeline(
            sd1_path,
            device="cpu",
            progress=False,
            vae=taesd[0],
            performance=Performance(vae_tiling=True),
        )
