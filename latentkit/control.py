"""Control images made without a model, for ControlNets (``pipeline.with_controlnet``).

`canny` is Canny's edge detector (Canny 1986, "A Computational Approach to Edge
Detection") in numpy: Gaussian smoothing, Sobel gradients, non-maximum suppression, a double
threshold and hysteresis. Its thresholds mean what they mean for OpenCV's ``cv2.Canny``
(the L1 gradient ``|dx| + |dy|`` of the 3x3 Sobel operator on 0..255 intensities), so the
``low=100, high=200`` of the Canny ControlNet's model cards carry over; no OpenCV needed.

>>> import latentkit
>>> edges = latentkit.control.canny(picture, low=100, high=200)  # doctest: +SKIP
>>> pipe.with_controlnet("lllyasviel/control_v11p_sd15_canny").generate(
...     "a house", control_image=edges)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from latentkit import images
from latentkit.errors import InvalidArgumentError
from latentkit.request import is_real

if TYPE_CHECKING:
    from PIL import Image

    from latentkit.images import ImageInput

_TAN_22_5 = math.tan(math.radians(22.5))
"""Gradient directions are binned to 0, 45, 90 and 135 degrees at 22.5-degree borders."""


def canny(
    image: ImageInput, low: float = 100.0, high: float = 200.0, *, sigma: float = 1.0
) -> Image.Image:
    """The edges of ``image`` (PIL image, array, tensor or path): white one-pixel lines on
    black, an RGB picture of the same size, ready as a ``control_image``.

    1. The image is read as grey 0..255 (ITU-R 601 luma) and smoothed with a Gaussian of
       standard deviation ``sigma`` pixels (0: no smoothing, as ``cv2.Canny``, which leaves
       smoothing to the caller).
    2. Sobel gradients ``dx``, ``dy``; the edge strength is ``|dx| + |dy|``.
    3. Non-maximum suppression: a pixel stays only where its strength is a maximum along
       the gradient direction (binned to 0/45/90/135 degrees), so edges are one pixel wide.
    4. Double threshold and hysteresis: pixels above ``high`` are edges, and so are pixels
       above ``low`` connected (8-neighbourhood) to one through such pixels; the rest are not.

    Raises `InvalidArgumentError` for thresholds that are not finite, negative, or
    ``low > high``, and a negative ``sigma``.
    """
    for name, value in (("low", low), ("high", high), ("sigma", sigma)):
        if not is_real(value) or value < 0:
            raise InvalidArgumentError(f"canny: {name} must be a finite number ≥ 0, got {value!r}")
    if low > high:
        raise InvalidArgumentError(f"canny: low ({low}) must not exceed high ({high})")
    from PIL import Image as PILImage

    grey = _grey(image)
    if sigma > 0:
        grey = _gaussian(grey, sigma)
    dx, dy = _sobel(grey)
    strength = np.abs(dx) + np.abs(dy)
    candidates = _thin(strength, dx, dy) & (strength > low)
    edges = _hysteresis(candidates & (strength > high), candidates)
    pixels = np.where(edges, np.uint8(255), np.uint8(0))
    return PILImage.fromarray(np.repeat(pixels[..., None], 3, axis=2), mode="RGB")


def _grey(image: ImageInput) -> np.ndarray:
    """(H, W) float64 luma in 0..255 of any image input."""
    opened = images.open_image(image, "image")
    size = images.target_size(opened, None, None, 1)
    rgb: np.ndarray = images.rgb_tensor(opened, size)[0].double().numpy()  # (3, H, W), [0, 1]
    luma: np.ndarray = 255.0 * (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    return luma


def _gaussian(grey: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian smoothing, the borders mirrored (no dark frame at the edges)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = grey
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(kernel))
    return np.asarray(out)


def _sobel(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 3x3 Sobel derivatives along x (columns) and y (rows), borders replicated."""
    p = np.pad(grey, 1, mode="edge")
    h, w = grey.shape

    def at(r: int, c: int) -> np.ndarray:  # the neighbour at row offset r, column offset c
        return p[1 + r : 1 + r + h, 1 + c : 1 + c + w]

    dx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    dy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return dx, dy


def _thin(strength: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: True where ``strength`` is a maximum along the gradient.

    Strictly above the neighbour behind and at least the one ahead (OpenCV's rule), so a
    plateau two pixels wide keeps one of them.
    """
    h, w = strength.shape
    p = np.pad(strength, 1)  # zero outside the image

    def at(r: int | np.ndarray, c: int | np.ndarray) -> np.ndarray:
        rows = np.arange(h)[:, None] + 1 + r
        cols = np.arange(w)[None, :] + 1 + c
        return np.asarray(p[rows, cols])

    ax, ay = np.abs(dx), np.abs(dy)
    horizontal = ay <= ax * _TAN_22_5  # gradient along x: compare left and right
    vertical = ay > ax / _TAN_22_5  # gradient along y: compare above and below
    # Diagonal gradients: down-right when dx and dy have the same sign (rows grow
    # downwards), else down-left.
    s = np.where((dx >= 0) == (dy >= 0), 1, -1)
    keep_h = (strength > at(0, -1)) & (strength >= at(0, 1))
    keep_v = (strength > at(-1, 0)) & (strength >= at(1, 0))
    keep_d = (strength > at(-1, -s)) & (strength > at(1, s))
    kept: np.ndarray = np.where(horizontal, keep_h, np.where(vertical, keep_v, keep_d))
    return kept


def _hysteresis(strong: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The candidates 8-connected to a strong pixel through candidates (a flood fill from
    every strong pixel; each pixel is visited at most once)."""
    h, w = candidates.shape
    edges = strong.copy()
    stack = list(zip(*np.nonzero(strong), strict=True))
    while stack:
        r, c = stack.pop()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and candidates[rr, cc] and not edges[rr, cc]:
                    edges[rr, cc] = True
                    stack.append((rr, cc))
    return edges
