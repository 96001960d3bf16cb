"""Tiled VAE decode and encode (`latentkit.models.autoencoder.Tiling`) against diffusers' tiling.

diffusers is only the reference: a tiny diffusers ``AutoencoderKL`` with seeded, perturbed
weights is loaded into ours by name (as in test_models.py), its ``enable_tiling()`` is the
oracle for the tiled outputs, fp32 on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import diffusers as _diffusers
import pytest
import torch
from torch import nn

from latentkit.errors import InvalidArgumentError
from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig, Tiling

diffusers: Any = _diffusers  # untyped; the reference is used as Any throughout

ATOL = 1e-5
"""Largest absolute difference allowed between our output and diffusers' (fp32, CPU)."""

SAMPLE_SIZE = 32  # pixels; with two blocks the scale factor is 2, so a latent tile is 16


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def vae_pair() -> tuple[Any, AutoencoderKL]:
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SAMPLE_SIZE,
    ).eval()
    # Move every weight (norm scales and biases included) off its init value.
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    with torch.device("meta"):
        vae = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(reference.config)))
    vae.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert vae.scale_factor == 2
    return reference, vae.eval()


@contextmanager
def reference_tiling(reference: Any, tiling: Tiling) -> Iterator[None]:
    """diffusers' tiling set up as ``tiling`` describes, switched off again afterwards."""
    size = SAMPLE_SIZE if tiling.tile_size is None else tiling.tile_size
    reference.enable_tiling()
    reference.tile_sample_min_size = size
    reference.tile_latent_min_size = size // 2
    reference.tile_overlap_factor = tiling.overlap
    try:
        yield
    finally:
        reference.disable_tiling()
        reference.tile_sample_min_size = SAMPLE_SIZE
        reference.tile_latent_min_size = SAMPLE_SIZE // 2
        reference.tile_overlap_factor = 0.25


TILINGS = [Tiling(), Tiling(tile_size=24, overlap=0.5), Tiling(tile_size=16, overlap=0.0)]
TILING_IDS = ["default", "24px-half", "16px-none"]


def latents(*shape: int, seed: int = 4) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("tiling", TILINGS, ids=TILING_IDS)
def test_tiled_decode_matches_diffusers(
    vae_pair: tuple[Any, AutoencoderKL], tiling: Tiling
) -> None:
    reference, vae = vae_pair
    scaled = latents(2, 4, 26, 38)  # several tiles down and across, not square
    with torch.no_grad(), reference_tiling(reference, tiling):
        # Ours takes scaled latents; dividing here gives diffusers the very `z` ours decodes.
        theirs = reference.decode(scaled / vae.scaling_factor).sample
        ours = vae.decode(scaled, tiling=tiling)
    assert ours.shape == (2, 3, 52, 76)
    assert max_diff(ours, theirs) <= ATOL  # measured 0.0 for all three tilings


@pytest.mark.parametrize("tiling", TILINGS, ids=TILING_IDS)
def test_tiled_posterior_matches_diffusers(
    vae_pair: tuple[Any, AutoencoderKL], tiling: Tiling
) -> None:
    reference, vae = vae_pair
    x = images(2, 3, 52, 76)
    with torch.no_grad(), reference_tiling(reference, tiling):
        theirs = reference.encode(x).latent_dist
        ours = vae.posterior(x, tiling=tiling)
        sampled = vae.encode(x, generator=torch.Generator().manual_seed(3), tiling=tiling)
    assert ours.mean.shape == (2, 4, 26, 38)
    # Measured 0.0 (mean and logvar) for all three tilings.
    assert max_diff(ours.mean, theirs.mean) <= ATOL
    assert max_diff(ours.logvar, theirs.logvar) <= ATOL
    expected = theirs.sample(torch.Generator().manual_seed(3)) * vae.scaling_factor
    assert max_diff(sampled, expected) <= ATOL


@pytest.mark.parametrize("side", [8, 16])
def test_input_within_one_tile_takes_the_plain_path(
    vae_pair: tuple[Any, AutoencoderKL], side: int
) -> None:
    _, vae = vae_pair
    z, x = latents(1, 4, side, side), images(1, 3, 2 * side, 2 * side)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tiling=Tiling()), vae.decode(z))
        tiled, plain = vae.posterior(x, tiling=Tiling()), vae.posterior(x)
    assert torch.equal(tiled.mean, plain.mean)
    assert torch.equal(tiled.logvar, plain.logvar)


def test_tiled_decode_is_close_to_untiled(vae_pair: tuple[Any, AutoencoderKL]) -> None:
    _, vae = vae_pair
    z = latents(1, 4, 26, 38)
    with torch.no_grad():
        tiled = vae.decode(z, tiling=Tiling())
        plain = vae.decode(z)
    assert tiled.shape == plain.shape == (1, 3, 52, 76)
    assert torch.isfinite(tiled).all()
    # Per-tile GroupNorm statistics make tiles differ from the whole. Measured on these random
    # weights with 16-latent tiles: mean |diff| 0.058 (13% of the mean |output| 0.435), max 0.90.
    # The bound below is that measurement with headroom, not a quality guarantee.
    difference = (tiled - plain).abs()
    assert 0 < difference.mean().item() < 0.2 * plain.abs().mean().item()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 0}, "tile_size"),
        ({"tile_size": -32}, "tile_size"),
        ({"tile_size": 32.0}, "tile_size"),
        ({"tile_size": True}, "tile_size"),
        ({"overlap": -0.1}, "overlap"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": float("nan")}, "overlap"),
    ],
)
def test_invalid_tiling_is_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Tiling(**kwargs)


def test_tiling_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        Tiling(32)  # type: ignore[call-arg]


def test_tile_size_must_be_a_multiple_of_the_scale_factor(
    vae_pair: tuple[Any, AutoencoderKL],
) -> None:
    _, vae = vae_pair
    with pytest.raises(InvalidArgumentError, match="multiple of the VAE's scale factor 2"):
        vae.decode(latents(1, 4, 40, 40), tiling=Tiling(tile_size=33))
    odd = AutoencoderKL(
        AutoencoderKLConfig(block_out_channels=(8, 16), norm_num_groups=4, sample_size=33)
    )
    with pytest.raises(InvalidArgumentError, match="sample_size 33"):
        odd.posterior(images(1, 3, 80, 80), tiling=Tiling())


@contextmanager
def largest_conv_output(module: nn.Module) -> Iterator[list[int]]:
    """Records the largest height or width of any Conv2d output inside ``module``."""
    largest = [0]

    def record(_: nn.Module, __: Any, output: torch.Tensor) -> None:
        largest[0] = max(largest[0], *output.shape[-2:])

    handles = [
        m.register_forward_hook(record) for m in module.modules() if isinstance(m, nn.Conv2d)
    ]
    try:
        yield largest
    finally:
        for handle in handles:
            handle.remove()


def test_tiling_bounds_the_largest_activation(vae_pair: tuple[Any, AutoencoderKL]) -> None:
    """What bounds memory: no activation inside the networks is larger than one tile."""
    _, vae = vae_pair
    z = latents(1, 4, 96, 80)  # a 192 x 160 image, 6 x 5 tiles of 32 pixels
    with torch.no_grad():
        with largest_conv_output(vae.decoder) as largest:
            decoded = vae.decode(z, tiling=Tiling())
        assert decoded.shape == (1, 3, 192, 160)
        assert largest[0] == SAMPLE_SIZE
        with largest_conv_output(vae.encoder) as largest:
            moments = vae.posterior(decoded, tiling=Tiling(tile_size=16))
        assert moments.mean.shape == (1, 4, 96, 80)
        assert largest[0] == 16
        with largest_conv_output(vae.decoder) as largest:
            vae.decode(z)
        assert largest[0] == 192  # untiled, for contrast
