"""Seeded Gaussian noise that is the same on every device and matches diffusers' draws."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentkit.errors import InvalidArgumentError
from latentkit.protocols import Generators


def randn(
    shape: Sequence[int],
    *,
    generator: Generators,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn where the generator lives, then moved.

    Drawing on the generator's device (the CPU for seeds) and moving the result makes a seed
    give the same noise on CPU, CUDA and MPS. A list of generators draws one batch item from
    each, in order, exactly as diffusers' ``randn_tensor`` does.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(
            tuple(shape), generator=generator, device=generator.device, dtype=dtype
        ).to(device)
    if len(generator) != shape[0]:
        raise InvalidArgumentError(
            f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image"
        )
    item = (1, *shape[1:])
    return torch.cat(
        [torch.randn(item, generator=g, device=g.device, dtype=dtype) for g in generator]
    ).to(device)


def first_generator(generator: Generators) -> torch.Generator | None:
    """The generator diffusers uses where it draws once for a batch given a list of them."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return generator[0]
