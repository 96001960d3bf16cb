"""The denoiser on overlapping latent tiles, blended at every evaluation.

MultiDiffusion (Bar-Tal et al. 2023, eq. 5): the prediction for a large latent image is the
per-pixel weighted average of the predictions for overlapping windows,
``sum_i W_i * F(x_i) / sum_i W_i``. Averaging at every network evaluation (not once after
sampling) makes neighbouring tiles agree where they overlap, so there is no seam to hide
afterwards; the weights here fall linearly towards each edge a window shares with another,
so a window's border, where its convolutions saw zero padding, counts least.

Memory is then that of one window: the UNet's activations (its attention above all, which
grows with the square of the pixel count) are those of a ``tile`` x ``tile`` latent image
whatever the image's size. See docs/upscaling.md for measurements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentkit.errors import InvalidArgumentError


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of windows ``tile`` wide that cover ``[0, size)``, one every ``stride``, the
    last one flush with the end (so every window is whole).

    >>> tile_starts(100, 40, 30)
    [0, 30, 60]
    >>> tile_starts(30, 40, 30)
    [0]
    """
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, ramp: int, start: bool, end: bool) -> torch.Tensor:
    """Weights along one side of a window: ``1/(ramp+1) ... ramp/(ramp+1)`` over the first
    (``start``) and last (``end``) ``ramp`` entries, 1 elsewhere; never 0, so every latent
    pixel keeps a positive total weight."""
    weights = torch.ones(length, dtype=torch.float64)
    ramp = min(ramp, length // 2)
    rising = torch.arange(1, ramp + 1, dtype=torch.float64) / (ramp + 1)
    if start and ramp:
        weights[:ramp] = torch.minimum(weights[:ramp], rising)
    if end and ramp:
        weights[length - ramp :] = torch.minimum(weights[length - ramp :], rising.flip(0))
    return weights


def map_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
) -> torch.Tensor:
    """``fn`` on overlapping ``tile`` x ``tile`` windows of ``x`` (B, C, h, w), blended.

    Windows start every ``tile - overlap`` latents (the last flush with the border). Each
    output window is weighted by linear ramps ``overlap`` long on its sides that face
    another window, and the weighted sum is divided by the summed weights (MultiDiffusion,
    eq. 5). An ``x`` no larger than one tile is ``fn(x)`` exactly. ``fn`` must keep the
    spatial size (its channel count may change: the UNet reads 7 or 9, returns 4).
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise InvalidArgumentError(
            f"latent tiles need 1 <= tile and 0 <= overlap < tile, got tile={tile}, "
            f"overlap={overlap}"
        )
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    ys = tile_starts(height, tile, tile - overlap)
    xs = tile_starts(width, tile, tile - overlap)
    total: torch.Tensor | None = None
    weight_sum = torch.zeros(height, width, dtype=torch.float64, device=x.device)
    for i, top in enumerate(ys):
        th = min(tile, height)
        rows = _ramp(th, overlap, i > 0, i < len(ys) - 1)
        for j, left in enumerate(xs):
            tw = min(tile, width)
            columns = _ramp(tw, overlap, j > 0, j < len(xs) - 1)
            out = fn(x[..., top : top + th, left : left + tw])
            if total is None:
                total = out.new_zeros((*out.shape[:-2], height, width), dtype=torch.float32)
            w = (rows[:, None] * columns[None, :]).to(x.device)
            total[..., top : top + th, left : left + tw] += out.float() * w.float()
            weight_sum[top : top + th, left : left + tw] += w
    assert total is not None
    return (total / weight_sum.float()).to(x.dtype)
