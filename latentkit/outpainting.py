"""Outpainting: a larger canvas around a picture, its new margins generated, its pixels kept.

The canvas is the picture padded by ``(left, top, right, bottom)`` pixels. The margins are
filled by repeating the picture's edge pixels before the canvas is encoded: the autoencoder
then sees a plausible continuation of the border colours, so the latents of the picture next
to the margins are barely disturbed, and image-to-image starts (``strength`` below 1, SDXL's
0.9999) start the margins from the colours they must continue. Noise would leak its high
frequencies into those border latents instead, and a constant colour would put an edge there.

The repaint mask is the margins plus a seam of `SEAM` pixels into the picture, so the model
may adjust the band where old and new meet. After decoding, `Outpaint.paste` blends the
picture back: its pixels fade linearly into the generated ones across the seam and are
returned unchanged beyond it (the autoencoder's round trip would blur them: Rombach et al.
2022 sec. 3.1, a lossy f=8 compression).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentkit.errors import InvalidArgumentError

SEAM = 8
"""Width in pixels of the band inside the picture where generated and original pixels are
cross-faded; outside it the picture's pixels come back unchanged."""

Margins = tuple[int, int, int, int]
"""``(left, top, right, bottom)`` pixels added to each side of the picture."""


@dataclass(frozen=True)
class Outpaint:
    """The canvas, repaint mask and paste-back weights of one outpainting call."""

    canvas: torch.Tensor
    """(1, 3, H, W) in [-1, 1]: the picture in the middle, its edge pixels repeated outward."""
    mask: torch.Tensor
    """(1, 1, H, W): 1 on the margins and the seam (repainted), 0 on the rest (kept)."""
    alpha: torch.Tensor
    """(1, 1, H, W): the weight of the generated pixels after decoding: 1 on the margins,
    falling linearly to 0 across the seam, 0 on the rest of the picture."""

    def paste(self, decoded: torch.Tensor) -> torch.Tensor:
        """``decoded`` (B, 3, H, W) with the picture pasted back through `alpha`, in float32,
        so the kept pixels equal the input's exactly (a half-precision copy would round
        them): ``alpha * clamp(decoded) + (1 - alpha) * canvas``. The decoded pixels are
        clamped to the image range first, so the seam blends the two images as shown."""
        alpha = self.alpha.to(decoded.device)
        canvas = self.canvas.to(decoded.device)
        return alpha * decoded.float().clamp(-1.0, 1.0) + (1 - alpha) * canvas


def check_margins(margins: Margins, factor: int) -> None:
    """Refuse margins the autoencoder cannot represent: each a multiple of ``factor`` (its
    downsampling), so the canvas is a whole number of latents and the mask aligns with them."""
    bad = [m for m in margins if m % factor]
    if bad:
        raise InvalidArgumentError(
            f"outpaint margins must be multiples of {factor} (the autoencoder's downsampling "
            f"factor), got {margins}; try {tuple(m - m % factor for m in margins)}"
        )


def extend(pixels: torch.Tensor, margins: Margins, *, seam: int = SEAM) -> Outpaint:
    """The `Outpaint` of ``pixels`` (1, 3, h, w) in [-1, 1] grown by ``margins``.

    >>> out = extend(torch.zeros(1, 3, 16, 16), (8, 0, 0, 0))
    >>> tuple(out.canvas.shape), int(out.mask[0, 0, 0].sum()), float(out.alpha[0, 0, 0, 16])
    ((1, 3, 16, 24), 16, 0.0)
    """
    left, top, right, bottom = margins
    h, w = pixels.shape[-2:]
    canvas = F.pad(pixels, (left, right, top, bottom), mode="replicate")
    height, width = canvas.shape[-2:]
    # Distance of every canvas row/column into the picture from each extended side (negative
    # on that side's margin); a side without a margin is infinitely far.
    far = float("inf")
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    distances = [
        xs - left if left else torch.full_like(xs, far),
        ys - top if top else torch.full_like(ys, far),
        (left + w - 1) - xs if right else torch.full_like(xs, far),
        (top + h - 1) - ys if bottom else torch.full_like(ys, far),
    ]
    nearest = torch.full((height, width), far)
    for distance in distances:
        nearest = torch.minimum(nearest, distance)  # broadcasts rows and columns
    # 1 on the margins (distance < 0), seam/(seam+1) ... 1/(seam+1) on the seam's pixels, 0
    # from `seam` pixels in: linear, so the cross-fade has no visible step.
    alpha = ((seam - nearest) / (seam + 1)).clamp(0.0, 1.0)[None, None]
    mask = (alpha > 0).to(torch.float32)
    return Outpaint(canvas=canvas, mask=mask, alpha=alpha)
