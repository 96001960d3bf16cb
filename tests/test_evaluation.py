"""The geometric evaluator: right on ground truth, wrong on each kind of mistake."""

from __future__ import annotations

import doctest
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from latentkit.errors import InvalidArgumentError
from latentkit.lab import evaluation, shapes


def _render(
    *objects: tuple[shapes.Colour, shapes.Kind, float, float, float],
    relation: shapes.Relation | None = None,
) -> Image.Image:
    """Draw shapes given as (colour, kind, x, y, size)."""
    scene = shapes.Scene(
        tuple(shapes.Shape(k, c, (x, y), s) for c, k, x, y, s in objects), relation
    )
    return shapes.render(scene, 64)


def _recolour(
    image: Image.Image, old: tuple[int, int, int], new: tuple[int, int, int]
) -> Image.Image:
    pixels = np.asarray(image).copy()
    pixels[(pixels == old).all(axis=-1)] = new
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[Image.Image], list[str]]:
    pairs = list(shapes.dataset(400, seed=21, split="all"))
    return [im for im, _ in pairs], [t for _, t in pairs]


def test_ground_truth_is_judged_right(ground_truth: tuple[list[Image.Image], list[str]]) -> None:
    images, prompts = ground_truth
    report = evaluation.evaluate(images, prompts)
    assert report.single.n > 150 and report.two.n > 150
    assert report.single.n + report.two.n == report.overall.n == 400
    assert report.single.adherence >= 0.99 and report.two.adherence >= 0.99
    assert report.distance is not None and abs(report.distance) < 0.01
    table = evaluation.format_table({"truth": report})
    assert "truth" in table and "MMD^2" in table


@pytest.mark.parametrize(
    "soften",
    [
        lambda im: im,
        lambda im: im.filter(ImageFilter.GaussianBlur(1)),  # like a VAE's soft edges
    ],
    ids=["aliased", "blurred"],
)
def test_soft_edges_and_other_sizes_are_judged_right(
    soften: Callable[[Image.Image], Image.Image],
) -> None:
    for size, antialias in ((64, True), (128, False)):
        pairs = list(shapes.dataset(60, seed=5, size=size, antialias=antialias))
        images = [soften(im) for im, _ in pairs]
        report = evaluation.evaluate(images, [t for _, t in pairs], reference=())
        assert report.overall.adherence >= 0.98, evaluation.format_table(report)


@pytest.mark.parametrize(
    ("image", "prompt", "reason"),
    [
        (  # colours swapped between the shapes
            _render(
                ("blue", "circle", 0.25, 0.5, 0.25),
                ("red", "square", 0.75, 0.5, 0.25),
                relation="left of",
            ),
            "a red circle left of a blue square",
            "binding",
        ),
        (  # a wrong shape
            _render(
                ("red", "triangle", 0.25, 0.5, 0.25),
                ("blue", "square", 0.75, 0.5, 0.25),
                relation="left of",
            ),
            "a red circle left of a blue square",
            "shape",
        ),
        (  # a wrong colour
            _render(
                ("green", "circle", 0.25, 0.5, 0.25),
                ("blue", "square", 0.75, 0.5, 0.25),
                relation="left of",
            ),
            "a red circle left of a blue square",
            "colour",
        ),
        (  # the wrong relation
            _render(
                ("red", "circle", 0.75, 0.5, 0.25),
                ("blue", "square", 0.25, 0.5, 0.25),
                relation="right of",
            ),
            "a red circle left of a blue square",
            "relation",
        ),
        (  # above asked, side by side drawn
            _render(
                ("red", "circle", 0.3, 0.45, 0.25),
                ("blue", "square", 0.7, 0.55, 0.25),
                relation="left of",
            ),
            "a red circle above a blue square",
            "relation",
        ),
        (  # a missing shape
            _render(("red", "circle", 0.25, 0.5, 0.25)),
            "a red circle left of a blue square",
            "count",
        ),
        (  # an extra shape
            _render(
                ("red", "circle", 0.25, 0.5, 0.25),
                ("blue", "square", 0.75, 0.5, 0.25),
                relation="left of",
            ),
            "a red circle",
            "count",
        ),
        (Image.new("RGB", (64, 64), "white"), "a yellow square", "count"),
        (  # a colour far from the palette (magenta)
            _recolour(_render(("red", "square", 0.5, 0.5, 0.4)), (255, 0, 0), (255, 0, 255)),
            "a red square",
            "colour",
        ),
        (  # a stretched rectangle is no square
            Image.fromarray(
                np.pad(
                    np.full((10, 40, 3), (255, 0, 0), np.uint8),
                    ((27, 27), (12, 12), (0, 0)),
                    constant_values=255,
                )
            ),
            "a red square",
            "shape",
        ),
    ],
)
def test_mistakes_are_rejected_with_their_reason(
    image: Image.Image, prompt: str, reason: str
) -> None:
    result = evaluation.check(image, prompt)
    assert not result.ok and result.reason == reason


def test_specks_are_ignored() -> None:
    pixels = np.asarray(_render(("green", "circle", 0.5, 0.5, 0.4))).copy()
    pixels[2:4, 2:4] = (0, 0, 255)  # a 4-pixel blue speck
    assert evaluation.check(pixels, "a green circle").ok


def test_regions_are_measured() -> None:
    (region,) = evaluation.find_regions(_render(("yellow", "square", 0.5, 0.25, 0.25)))
    assert region.colour == "yellow" and region.kind == "square"
    assert region.area == pytest.approx(16 * 16 / 64**2)
    assert region.centroid == pytest.approx((0.5, 0.25))
    assert region.fill == 1.0 and region.aspect == 1.0


def test_components_are_eight_connected() -> None:
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # one diagonal line
    mask[4, 0] = mask[4, 1] = True
    mask[0, 4] = True
    labels = evaluation._components(mask)
    assert len(np.unique(labels[mask])) == 3
    assert labels[2, 2] == labels[0, 0] and (labels[~mask] == 0).all()


def _flood_fill_labels(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """Brute force: scan in raster order; each unlabelled ink pixel starts the next label and
    a flood fill over its 8 neighbours (diagonals included) gives the whole component."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    count = 0
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or labels[y0, x0]:
                continue
            count += 1
            labels[y0, x0] = count
            stack = [(y0, x0)]
            while stack:
                y, x = stack.pop()
                for ny in (y - 1, y, y + 1):
                    for nx in (x - 1, x, x + 1):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = count
                            stack.append((ny, nx))
    return labels


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    density=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_components_match_a_flood_fill(shape: tuple[int, int], density: float, seed: int) -> None:
    # Exactly equal label arrays: the same 8-connected partition and the same numbering (by
    # each component's first pixel in raster order), which orders find_regions' ties.
    mask = np.random.default_rng(seed).random(shape) < density
    np.testing.assert_array_equal(evaluation._components(mask), _flood_fill_labels(mask))


def test_distance_separates_corrupted_images() -> None:
    n = 120
    data = [im for im, _ in shapes.dataset(n, seed=30)]
    same = evaluation.distance(data, [im for im, _ in shapes.dataset(n, seed=31)])
    rng = np.random.default_rng(0)
    corrupted = {
        "noise": [
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)
        ],
        "blank": [Image.new("RGB", (64, 64), "white")] * n,
        "wrong colours": [Image.fromarray(np.asarray(im)[..., [2, 0, 1]]) for im in data],
        "blurred": [im.filter(ImageFilter.GaussianBlur(2)) for im in data],
    }
    assert abs(same) < 0.01
    for name, images in corrupted.items():
        assert evaluation.distance(data, images) > 0.05, name


def test_evaluate_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        evaluation.evaluate([Image.new("RGB", (64, 64))], [])
    with pytest.raises(InvalidArgumentError):
        evaluation.check(np.zeros((64, 64), np.uint8), "a red circle")
    with pytest.raises(InvalidArgumentError):
        evaluation.check(Image.new("RGB", (64, 64)), "a cat")


def test_docstring_examples() -> None:
    assert doctest.testmod(evaluation).failed == 0
