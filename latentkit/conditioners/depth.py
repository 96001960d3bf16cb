"""Depth conditioning for depth-to-image models (Stable Diffusion 2 depth): a depth map as a channel."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from latentkit.conditioners import register
from latentkit.errors import InvalidArgumentError
from latentkit.protocols import ConditionTarget, Generators

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class DepthInput:
    """A depth map, or a picture to estimate one from, and the latent size to condition at."""

    latent_size: tuple[int, int]
    depth_map: torch.Tensor | None = None
    """(H, W) or (1, H, W): any monotonic depth (it is normalised); larger = nearer, as DPT."""
    picture: Image.Image | np.ndarray | torch.Tensor | None = None
    """The picture the model's own estimator reads when no depth map is given."""


@register("depth")
class DepthConditioner:
    """A depth map resized to the latents (bicubic) and scaled to [-1, 1] per image, added as
    one input channel of the UNet (5 channels in all). Without a map, the model's own depth
    estimator (a transformers DPT model, the repo's ``depth_estimator``) predicts one."""

    name: ClassVar[str] = "depth"
    target: ClassVar[ConditionTarget] = "concat"

    def __init__(self, *, estimator: Any = None, processor: Any = None) -> None:
        self.estimator = estimator
        self.processor = processor

    def estimate(
        self,
        picture: Image.Image | np.ndarray | torch.Tensor,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The estimator's depth (1, H', W') for ``picture``."""
        if self.estimator is None or self.processor is None:
            raise InvalidArgumentError(
                "this model has no depth estimator: pass depth_map= (a depth image or array)"
            )
        pixel_values = self.processor(images=[picture], return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        # DPT-Hybrid's batch norms are unstable in half precision: let autocast pick per op.
        context = (
            torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        )
        with context:
            depth: torch.Tensor = self.estimator(pixel_values).predicted_depth
        return depth

    def encode(
        self,
        value: DepthInput,
        *,
        device: torch.device,
        dtype: torch.dtype,
        generator: Generators = None,
    ) -> torch.Tensor:
        """(1, 1, h, w) depth in [-1, 1] at the latent size (generator unused: deterministic)."""
        if value.depth_map is not None:
            depth = value.depth_map.to(device=device, dtype=dtype)
        elif value.picture is not None:
            depth = self.estimate(value.picture, device=device, dtype=dtype)
        else:
            raise InvalidArgumentError("depth conditioning needs a depth map or a picture")
        depth = depth.reshape(1, *depth.shape[-2:])
        depth = F.interpolate(
            depth.unsqueeze(1), size=value.latent_size, mode="bicubic", align_corners=False
        )
        low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
        high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
        # A constant map (a flat estimate) would divide 0 by 0; it becomes all -1 instead.
        return (2.0 * (depth - low) / (high - low).clamp_min(1e-12) - 1.0).to(dtype)
