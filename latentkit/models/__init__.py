"""Stable Diffusion's networks, written to load the published checkpoints by key with no conversion."""

from latentkit.models.autoencoder import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    rename_legacy_key,
)
from latentkit.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
from latentkit.models.text_encoder import CLIPTextConfig, CLIPTextEncoder, TextEncoderOutput
from latentkit.models.unet import UNet2DCondition, UNetConfig

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "AutoencoderTiny",
    "AutoencoderTinyConfig",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "DiagonalGaussian",
    "TextEncoderOutput",
    "UNet2DCondition",
    "UNetConfig",
    "rename_legacy_key",
]
