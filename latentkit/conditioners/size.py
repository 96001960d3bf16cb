"""SDXL's micro-conditioning: image sizes, crop corner and aesthetic score as a vector.

Podell et al. 2023 (SDXL), sec. 2.2: the UNet is told the original size of the training
image, the crop's top-left corner and the target size (the refiner: an aesthetic score in
place of the target size). Each number gets the sinusoidal embedding of a timestep
(Vaswani et al. 2017, sec. 3.5) and the embeddings are concatenated; with the pooled text
embedding they form the vector added to the UNet's time embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from latentkit.conditioners import register
from latentkit.models.layers import timestep_embedding
from latentkit.protocols import ConditionTarget, Generators


@register("size-ids")
@dataclass(frozen=True)
class SizeConditioner:
    """Numbers (``original_size + crops_coords_top_left + target_size``) → their concatenated
    sinusoidal embeddings, (B, len(ids) × dim); SDXL's ``add_time_proj``."""

    name: ClassVar[str] = "size-ids"
    target: ClassVar[ConditionTarget] = "vector"

    dim: int
    """Channels per number (the UNet config's ``addition_time_embed_dim``, 256 for SDXL)."""
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0

    def encode(
        self,
        value: Sequence[Sequence[float]],
        *,
        device: torch.device,
        dtype: torch.dtype,
        generator: Generators = None,
    ) -> torch.Tensor:
        """(B, n × dim) for B rows of n numbers each (deterministic: ``generator`` unused)."""
        ids = torch.tensor([list(map(float, row)) for row in value], device=device)
        embedded = timestep_embedding(
            ids.flatten(),
            self.dim,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
        )
        return embedded.reshape(ids.shape[0], -1).to(dtype)
