"""A cheap preview of latents: a fixed linear map from latent channels to RGB.

Stable Diffusion's autoencoder latents are close enough to a linear function of the image's
colours at each 8×8 patch that one 4×3 matrix (plus a bias) gives a recognisable, blurry
picture: what AUTOMATIC1111 calls "Approx cheap" and ComfyUI "Latent2RGB". It costs one
small matrix product per latent pixel, no network, so a step callback can show progress at
every evaluation (the VAE decode costs far more; `latentkit.models.autoencoder_tiny`'s TAESD
is the middle ground).

The factors are the ones ComfyUI publishes per latent space (``comfy/latent_formats.py``,
classes ``SD15``, ``SDXL`` and ``SD_X4``; github.com/comfyanonymous/ComfyUI, read at commit
040a3243468ecefd1f2802592d90458f1ce4d65f). They apply to the latents the UNet denoises (the
autoencoder's latents times its ``scaling_factor``) and give RGB in about [-1, 1], mapped to
[0, 255] as ``(rgb + 1) * 127.5``, as ComfyUI's previewer does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

from latentkit.errors import InvalidArgumentError

Resample = Literal["nearest", "bilinear"]
"""How the preview is enlarged from latent to pixel size."""


@dataclass(frozen=True)
class LatentRGB:
    """A latent space's linear latent→RGB approximation: ``rgb = latent @ factors + bias``."""

    factors: tuple[tuple[float, float, float], ...]
    """One (R, G, B) row per latent channel."""
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        """The latent channels this map reads."""
        return len(self.factors)


# fmt: off
SD = LatentRGB(factors=(
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
))
"""Stable Diffusion 1.x/2.x (``scaling_factor`` 0.18215): ComfyUI's ``SD15`` factors."""

SDXL = LatentRGB(factors=(
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
), bias=(0.1084, -0.0175, -0.0011))
"""SDXL (``scaling_factor`` 0.13025): ComfyUI's ``SDXL`` factors and bias."""

UPSCALE = LatentRGB(factors=(
    (-0.2340, -0.3863, -0.3257),
    (0.0994, 0.0885, -0.0908),
    (-0.2833, -0.2349, -0.3741),
    (0.2523, -0.0055, -0.1651),
))
"""The x4 upscaler's latent space (``scaling_factor`` 0.08333): ComfyUI's ``SD_X4`` factors."""
# fmt: on

BY_FAMILY: dict[str, LatentRGB] = {
    "stable-diffusion": SD,
    "stable-diffusion-xl": SDXL,
    "stable-diffusion-upscale": UPSCALE,
}
"""The map of each built-in family's latent space (`latentkit.pipelines` names)."""

BY_SCALING_FACTOR: dict[float, LatentRGB] = {0.18215: SD, 0.13025: SDXL, 0.08333: UPSCALE}
"""The map of a latent space known by its autoencoder's ``scaling_factor``."""


def latent_rgb(*, family: str | None = None, scaling_factor: float | None = None) -> LatentRGB:
    """The latent→RGB map of a model: by its ``family``, else by its autoencoder's
    ``scaling_factor``; an `InvalidArgumentError` when neither is known."""
    if family is not None and family in BY_FAMILY:
        return BY_FAMILY[family]
    if scaling_factor is not None:
        for known, factors in BY_SCALING_FACTOR.items():
            if abs(scaling_factor - known) < 1e-5:
                return factors
    raise InvalidArgumentError(
        f"no latent→RGB preview factors for family {family!r} (scaling_factor "
        f"{scaling_factor!r}); known families: {', '.join(BY_FAMILY)}; pass factors= "
        "(a latentkit.preview.LatentRGB) for another latent space"
    )


def preview_rgb(latents: torch.Tensor, factors: LatentRGB) -> torch.Tensor:
    """``latents`` (B, C, h, w) mapped to RGB (B, 3, h, w), about [-1, 1], unclamped, float32."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise InvalidArgumentError("latents must be a tensor of shape (batch, channels, h, w)")
    if latents.shape[1] != factors.channels:
        raise InvalidArgumentError(
            f"latents have {latents.shape[1]} channels; these preview factors read "
            f"{factors.channels}"
        )
    x = latents.detach().to(device="cpu", dtype=torch.float32)
    matrix = torch.tensor(factors.factors, dtype=torch.float32)  # (C, 3)
    bias = torch.tensor(factors.bias, dtype=torch.float32)
    # Per latent pixel: rgb = latent @ factors + bias (channels last, then back).
    return (x.permute(0, 2, 3, 1) @ matrix + bias).permute(0, 3, 1, 2)


def preview(
    latents: torch.Tensor,
    *,
    factors: LatentRGB,
    size: tuple[int, int] | None = None,
    resample: Resample = "nearest",
    index: int = 0,
) -> Image.Image:
    """Image ``index`` of ``latents`` (B, C, h, w) or (C, h, w) as a picture, enlarged to
    ``size`` (height, width) in pixels (default: the latent size) with ``resample``."""
    if isinstance(latents, torch.Tensor) and latents.ndim == 3:
        latents = latents.unsqueeze(0)
    rgb = preview_rgb(latents, factors)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < rgb.shape[0]:
        raise InvalidArgumentError(f"index must be in 0..{rgb.shape[0] - 1}, got {index!r}")
    picture = rgb[index : index + 1]
    if size is not None and tuple(size) != tuple(picture.shape[-2:]):
        if resample not in ("nearest", "bilinear"):
            raise InvalidArgumentError(
                f"resample must be 'nearest' or 'bilinear', not {resample!r}"
            )
        picture = F.interpolate(
            picture,
            size=tuple(size),
            mode=resample,
            **({"align_corners": False} if resample == "bilinear" else {}),
        )
    # [-1, 1] → [0, 255], rounded (a cast alone would truncate).
    pixels = ((picture[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


__all__ = [
    "BY_FAMILY",
    "BY_SCALING_FACTOR",
    "SD",
    "SDXL",
    "UPSCALE",
    "LatentRGB",
    "Resample",
    "latent_rgb",
    "preview",
    "preview_rgb",
]
