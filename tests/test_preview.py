"""The cheap latent preview (issue 18): the linear latent→RGB map equals its matrix product
exactly, the picture has the output size, the factors follow the family, and it costs a
small fraction of a VAE decode."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit
from latentkit import preview as P

SIZE = 32


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", progress=False)


def test_rgb_is_the_matrix_product() -> None:
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    for factors in (P.SD, P.SDXL, P.UPSCALE):
        matrix = np.array(factors.factors, dtype=np.float64)
        bias = np.array(factors.bias, dtype=np.float64)
        # Closed form, per pixel: rgb[b, k, y, x] = sum_c latents[b, c, y, x] * M[c, k] + bias[k].
        expected = np.einsum("bcyx,ck->bkyx", latents.double().numpy(), matrix)
        expected += bias[None, :, None, None]
        got = P.preview_rgb(latents, factors)
        assert got.shape == (2, 3, 5, 7) and got.dtype == torch.float32
        assert np.abs(got.double().numpy() - expected).max() <= 1e-6


def test_picture_pixels_and_nearest_enlargement() -> None:
    latents = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(1)) * 2
    image = P.preview(latents, factors=P.SD, size=(24, 32))
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 24)
    rgb = P.preview_rgb(latents, P.SD)[0].clamp(-1, 1)
    expected = ((rgb + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = np.asarray(image)
    # Nearest: every 8×8 block is its latent pixel's colour.
    assert np.array_equal(pixels[::8, ::8], expected)
    assert np.array_equal(pixels, expected.repeat(8, axis=0).repeat(8, axis=1))
    smooth = np.asarray(P.preview(latents, factors=P.SD, size=(24, 32), resample="bilinear"))
    assert smooth.shape == pixels.shape and not np.array_equal(smooth, pixels)


def test_factors_follow_the_family() -> None:
    assert P.latent_rgb(family="stable-diffusion") is P.SD
    assert P.latent_rgb(family="stable-diffusion-xl") is P.SDXL
    assert P.latent_rgb(family="elsewhere", scaling_factor=0.13025) is P.SDXL
    assert P.latent_rgb(scaling_factor=0.18215) is P.SD
    with pytest.raises(latentkit.InvalidArgumentError, match="known families"):
        P.latent_rgb(family="elsewhere", scaling_factor=1.0)
    with pytest.raises(latentkit.InvalidArgumentError, match="4"):
        P.preview_rgb(torch.zeros(1, 16, 2, 2), P.SD)


def test_pipeline_preview_in_a_callback(sd1: Any) -> None:
    pictures: list[Image.Image] = []

    def show(step: latentkit.SamplerStep) -> None:
        pictures.append(sd1.preview(step.sample))

    result = sd1.generate(
        "a cat",
        scheduler="ddim",
        steps=3,
        seed=1,
        height=SIZE,
        width=SIZE,
        callback=show,
        progress=False,
    )
    assert len(pictures) == 3
    assert all(p.size == result.images[0].size == (SIZE, SIZE) for p in pictures)
    latents = torch.randn(1, 4, SIZE // 8 * 2, SIZE // 8 * 2)
    scale = sd1.vae.scale_factor
    assert sd1.preview(latents).size == (latents.shape[-1] * scale, latents.shape[-2] * scale)
    same = sd1.preview(latents)
    assert np.array_equal(
        np.asarray(same),
        np.asarray(P.preview(latents, factors=P.SD, size=same.size[::-1])),
    )


def test_much_cheaper_than_the_vae_decode(sd1: Any) -> None:
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))

    def fastest(fn: Any) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        decode = fastest(lambda: sd1.vae.decode(latents / sd1.vae.scaling_factor))
    cheap = fastest(lambda: sd1.preview(latents))
    # Even the tiny test VAE (a few channels) decodes several times slower than the map.
    assert cheap * 3 < decode, (cheap, decode)
