"""Mask conditioning for inpainting models: the mask and the masked picture as channels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from latentkit.conditioners import register
from latentkit.noise import first_generator
from latentkit.protocols import Autoencoder, ConditionTarget, Generators


@dataclass(frozen=True)
class MaskedImage:
    """A picture and where to repaint it, both at the output size."""

    pixels: torch.Tensor
    """(1, 3, H, W) in [-1, 1]."""
    mask: torch.Tensor
    """(1, 1, H, W): 1 where the picture is repainted, 0 where it is kept."""


@register("mask")
class MaskConditioner:
    """Inpainting input (Rombach et al. 2022, sec. 4.5 / SD inpainting): the mask at latent
    resolution and the latents of the picture with the masked region blanked, concatenated
    to the UNet's input channels (1 + 4 extra channels, 9 in all)."""

    name: ClassVar[str] = "mask"
    target: ClassVar[ConditionTarget] = "concat"

    def __init__(self, *, autoencoder: Autoencoder) -> None:
        self.autoencoder = autoencoder

    def encode(
        self,
        value: MaskedImage,
        *,
        device: torch.device,
        dtype: torch.dtype,
        generator: Generators = None,
    ) -> torch.Tensor:
        """(1, 1 + latent channels, h, w): mask, then masked-picture latents (diffusers' order).

        The masked picture's latents are sampled from the autoencoder's posterior with
        ``generator`` (its first generator when there is a list, as diffusers does).
        """
        factor = self.autoencoder.scale_factor
        h, w = value.pixels.shape[-2] // factor, value.pixels.shape[-1] // factor
        mask = F.interpolate(value.mask, size=(h, w)).to(device=device, dtype=dtype)
        pixels = value.pixels.to(device=device, dtype=dtype)
        masked = pixels * (value.mask.to(device=device, dtype=dtype) < 0.5)
        latents = self.autoencoder.encode(masked, generator=first_generator(generator))
        return torch.cat([mask, latents], dim=1)
