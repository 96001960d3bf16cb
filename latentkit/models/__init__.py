"""Stable Diffusion's networks, written to load diffusers checkpoints by key with no conversion."""

from latentkit.models.autoencoder import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    rename_legacy_key,
)
from latentkit.models.unet import UNet2DCondition, UNetConfig

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussian",
    "UNet2DCondition",
    "UNetConfig",
    "rename_legacy_key",
]
