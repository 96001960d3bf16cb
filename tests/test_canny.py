"""`latentkit.control.canny`: Canny's edge detector in numpy, checked on synthetic shapes
whose edges are known exactly (closed forms, no reference implementation needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit
from latentkit.control import canny


def square(size: int = 64, lo: int = 16, hi: int = 48, value: int = 255) -> np.ndarray:
    a = np.zeros((size, size), dtype=np.uint8)
    a[lo:hi, lo:hi] = value
    return a


def edge_mask(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    assert array.ndim == 3 and array.shape[2] == 3
    assert set(np.unique(array)) <= {0, 255}
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0] == 255


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.0])
def test_a_white_square_has_its_outline_as_edges(sigma: float) -> None:
    """Every edge pixel lies within one pixel of the square's boundary (between rows/cols
    15|16 and 47|48), each side is found along its straight part, and nothing else is."""
    edges = edge_mask(canny(square(), sigma=sigma))
    rows, cols = np.nonzero(edges)
    near_boundary = (
        (np.minimum(np.abs(rows - 15.5), np.abs(rows - 47.5)) <= 1.5) & (cols >= 14) & (cols <= 49)
    ) | (
        (np.minimum(np.abs(cols - 15.5), np.abs(cols - 47.5)) <= 1.5) & (rows >= 14) & (rows <= 49)
    )
    assert near_boundary.all()
    straight = slice(20, 44)
    for side in (edges[14:18, straight], edges[46:50, straight]):  # top and bottom
        assert side.any(axis=0).all()
        assert side.sum() == side.shape[1]  # one pixel wide (non-maximum suppression)
    for side in (edges[straight, 14:18], edges[straight, 46:50]):  # left and right
        assert side.any(axis=1).all()
        assert side.sum() == side.shape[0]
    assert not edges[20:44, 20:44].any()  # flat inside
    assert not edges[:10].any() and not edges[:, :10].any()  # flat outside


def step(value: int, size: int = 64) -> np.ndarray:
    a = np.zeros((size, size), dtype=np.uint8)
    a[:, size // 2 :] = value
    return a


def test_thresholds_select_edges_by_strength() -> None:
    """A straight step of ``v`` grey levels has Sobel strength |dx| + |dy| = 4 v on its
    edge (no smoothing): an edge exactly when the high threshold is below 4 v."""
    weak = step(20)  # strength 80
    # (Grey levels are read through float32, so 4 v is 80 up to 1e-5.)
    found = edge_mask(canny(weak, low=50, high=79.9, sigma=0))
    assert found[:, 31].all() and found.sum() == 64  # the whole line, one pixel wide
    assert not edge_mask(canny(weak, low=50, high=80.1, sigma=0)).any()
    assert not edge_mask(canny(weak, sigma=0)).any()  # the defaults 100/200
    assert not edge_mask(canny(step(255), low=1020.1, high=1020.1, sigma=0)).any()
    assert edge_mask(canny(step(255), low=1019.9, high=1019.9, sigma=0))[:, 31].all()


def test_hysteresis_keeps_weak_edges_connected_to_strong_ones() -> None:
    """Right half 255 (a strong vertical edge, strength 1020); in the left half a step of 30
    (strength 120, between low=100 and high=200) that runs into the strong edge, and an
    isolated box of 30 whose outline is weak everywhere."""
    a = np.zeros((64, 64), dtype=np.uint8)
    a[:, 32:] = 255
    a[20:, :32] = 30  # a weak horizontal step at rows 19|20, touching the strong edge
    a[40:56, 4:16] = 0  # an isolated box of 0 inside the 30 region: a weak outline
    edges = edge_mask(canny(a, low=100, high=200, sigma=0))
    assert edges[:, 31].all() and not edges[:, 33:].any()  # the strong edge, one pixel wide
    assert edges[19, 2:30].all()  # the weak step, kept through its connection
    assert not edges[36:60, 0:20].any()  # the isolated weak box, dropped
    # With one threshold (no hysteresis band) the box's outline is an edge too.
    assert edges_of(a, low=100, high=100)[39:57, 3:17].sum() > 40


def edges_of(a: np.ndarray, **kw: float) -> np.ndarray:
    return edge_mask(canny(a, sigma=0, **kw))


def test_smoothing_removes_noise() -> None:
    """A grey square (64 -> 192) under Gaussian noise (std 20): unsmoothed, the noise makes
    edges inside the flat square; smoothed (sigma 1.5), only the outline remains."""
    noisy = square(value=128).astype(np.float64) + 64
    noisy += np.random.default_rng(0).normal(0, 20, noisy.shape)
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    raw = edge_mask(canny(noisy, sigma=0))
    smooth = edge_mask(canny(noisy, sigma=1.5))
    assert raw[20:44, 20:44].sum() > 50
    assert smooth[20:44, 20:44].sum() == 0
    for side in (smooth[14:18, 20:44], smooth[46:50, 20:44]):
        assert side.any(axis=0).all()  # the real edges survive


def test_image_inputs_are_equivalent(tmp_path: Path) -> None:
    grey = square()
    rgb = np.repeat(grey[..., None], 3, axis=2)
    path = tmp_path / "square.png"
    Image.fromarray(rgb).save(path)
    inputs = [
        Image.fromarray(rgb),
        Image.fromarray(grey),
        rgb,
        grey,
        rgb.astype(np.float32) / 255,
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        path,
        str(path),
    ]
    results = [edge_mask(canny(x)) for x in inputs]
    for other in results[1:]:
        assert np.array_equal(results[0], other)
    assert canny(Image.fromarray(rgb[:40])).size == (64, 40)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(low=300, high=200), "must not exceed"),
        (dict(low=-1), "low must be a finite number"),
        (dict(high=float("nan")), "high must be a finite number"),
        (dict(sigma=-0.5), "sigma"),
    ],
)
def test_bad_arguments(kw: dict[str, float], match: str) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        canny(square(), **kw)
    with pytest.raises(latentkit.InvalidArgumentError, match="no image file"):
        canny("/no/such/picture.png")
