"""Score generated images of the shapes dataset against their prompts, with geometry only.

No learned judge: an image is *right* when its coloured regions are exactly the objects the
prompt names (count, colour, shape, which colour goes with which shape) in the stated
relation. The steps:

1. **Ink vs paper.** A pixel is ink when its smallest channel is below 128: every palette
   colour has a zero channel and white has none, so this cuts a soft (anti-aliased or
   VAE-decoded) edge at its 50 % blend, where the geometric edge is. Quantising to the five
   palette colours per pixel instead would mislabel edges: the green-white blend is nearer
   yellow than green, which would draw yellow rings around green shapes.
2. **Regions.** 8-connected components of the ink mask (``scipy.ndimage.label``);
   components smaller than ``min_area`` (a fraction of the image) are specks and ignored.
3. **Colour.** The per-channel median of a region's pixels, named by the nearest palette
   colour; farther than ``max_colour_distance`` (RGB units) from all of them is no colour.
4. **Shape.** From the region's bounding box: fill ratio (area / box area: square 1,
   circle pi/4, upright triangle 1/2) and the share of the area in the top half of the box
   (square and circle 1/2, triangle 1/4); the nearest of those three prototypes, and no shape
   when it is far from all or the box is far from square.
5. **Relation.** Between the two regions' centroids: "A left of B" holds when B's centroid
   is to the right of A's by more than it is above or below it.

The distribution distance (`distance`) is an unbiased kernel MMD^2 (Gretton et al. 2012)
with a Gaussian kernel of fixed bandwidth, between hand-made `features` of two image sets: a
colour histogram, the share of off-palette pixels (blur, noise, colour drift), and the
geometry above (region count; the two largest regions' colour, shape, area, fill, top share,
aspect and centroid). Why MMD: unbiased, so ~0 for two samples of one distribution at any
sample size (a Fréchet distance is biased upwards, more so for small samples, and needs a
matrix square root); the Gaussian kernel is characteristic (any difference in distribution
shows, not only in mean and covariance); a fixed bandwidth keeps runs comparable. Noise
level: about ±0.004 between two sets of 200 dataset images.

>>> from latentkit.lab import shapes
>>> pairs = list(shapes.dataset(8, seed=1))
>>> report = evaluate([im for im, _ in pairs], [t for _, t in pairs])
>>> report.overall.adherence
1.0
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

from latentkit.errors import InvalidArgumentError
from latentkit.lab.shapes import (
    BACKGROUND,
    COLOURS,
    KINDS,
    PALETTE,
    RELATION_AXIS,
    Colour,
    Kind,
    parse_caption,
    render,
    sample_scene,
)

ImageLike: TypeAlias = Image.Image | npt.NDArray[np.uint8]
"""A PIL image, or an (H, W, 3) uint8 array."""
Reason = Literal["count", "colour", "shape", "binding", "relation"]
REASONS: tuple[Reason, ...] = ("count", "colour", "shape", "binding", "relation")

INK_THRESHOLD = 128
"""A pixel is ink when its smallest channel is below this (the 50 % ink-paper blend)."""
MIN_AREA = 0.004
"""Regions under this fraction of the image are specks (16 px at 64 x 64)."""
MAX_COLOUR_DISTANCE = 80.0
"""Farthest (RGB) a region's median colour may be from its palette colour."""
MAX_SHAPE_DISTANCE = 0.25
"""Farthest a region may be from its shape prototype, in (fill, 2 x top share) units."""
MAX_ASPECT = 1.5
"""Bounding boxes wider or taller than this ratio are no shape (all three are square)."""

# (fill ratio, share of area in the top half of the bounding box) of each shape.
SHAPE_PROTOTYPES: Mapping[Kind, tuple[float, float]] = {
    "square": (1.0, 0.5),
    "circle": (np.pi / 4, 0.5),
    "triangle": (0.5, 0.25),
}

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)
_PROTOTYPES = np.array([SHAPE_PROTOTYPES[k] for k in KINDS])
# 3x3 ones: a pixel touches its 8 neighbours, diagonals included.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Region:
    """A connected coloured region; coordinates are fractions of the image (x right, y down)."""

    area: float
    centroid: tuple[float, float]
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in pixels, inclusive."""
    fill: float
    top_share: float
    aspect: float
    """Box width / height."""
    rgb: tuple[float, float, float]
    """Per-channel median colour."""
    colour: Colour | None
    kind: Kind | None


@dataclass(frozen=True)
class ImageCheck:
    """The verdict on one image: ``reason`` is None when it is right."""

    prompt: str
    reason: Reason | None
    regions: tuple[Region, ...]

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class GroupScore:
    """Adherence of one prompt group, with failures counted by reason."""

    name: str
    n: int
    correct: int
    failures: Mapping[str, int] = field(default_factory=dict)

    @property
    def adherence(self) -> float:
        """Fraction of images fully right (NaN for an empty group)."""
        return self.correct / self.n if self.n else float("nan")


@dataclass(frozen=True)
class Report:
    """What `evaluate` returns.

    ``distance`` is the unbiased MMD^2 between the images and the reference images (see the
    module docstring); it can be slightly negative when the two match.
    """

    single: GroupScore
    two: GroupScore
    overall: GroupScore
    distance: float | None
    checks: tuple[ImageCheck, ...]


def _as_array(image: ImageLike) -> npt.NDArray[np.uint8]:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InvalidArgumentError(
            f"images must be PIL images or (H, W, 3) uint8 arrays, got {array.dtype} {array.shape}"
        )
    return array


def _components(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """Label the 8-connected components of ``mask``: 0 off the mask, else 1, 2, ... in the
    order of each component's first pixel in raster order (so by smallest flat index)."""
    labels, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    return np.asarray(labels, dtype=np.int32)


def _classify_colour(rgb: npt.NDArray[np.float64], max_distance: float) -> Colour | None:
    distances = np.linalg.norm(_PALETTE_RGB - rgb, axis=1)
    best = int(np.argmin(distances))
    return COLOURS[best] if distances[best] <= max_distance else None


def _classify_shape(fill: float, top_share: float, aspect: float) -> Kind | None:
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        return None
    # Top share weighs double: it separates triangles from circles even when blur rounds
    # a small triangle's tip off (fill ~0.67, top share ~0.32 at 64 px).
    distances = np.linalg.norm((_PROTOTYPES - np.array([fill, top_share])) * (1, 2), axis=1)
    best = int(np.argmin(distances))
    return KINDS[best] if distances[best] <= MAX_SHAPE_DISTANCE else None


def find_regions(
    image: ImageLike,
    *,
    min_area: float = MIN_AREA,
    max_colour_distance: float = MAX_COLOUR_DISTANCE,
) -> tuple[Region, ...]:
    """The coloured regions of ``image``, largest first (see the module docstring)."""
    pixels = _as_array(image)
    h, w, _ = pixels.shape
    labels = _components(pixels.min(axis=2) < INK_THRESHOLD)
    counts = np.bincount(labels.ravel())
    boxes = ndimage.find_objects(labels)  # boxes[i]: the slices around label i + 1
    regions = []
    for label in np.flatnonzero(counts >= max(1.0, min_area * h * w)):
        if label == 0:  # paper
            continue
        # Search only the component's bounding box; pixels stay in raster order.
        rows, cols = boxes[label - 1]
        ys, xs = np.nonzero(labels[rows, cols] == label)
        ys, xs = ys + rows.start, xs + cols.start
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        fill = len(xs) / (bw * bh)
        # Pixel centres in the top half of the box; a middle row counts half.
        rel = (ys - y0 + 0.5) / bh
        top_share = float(np.mean(np.where(rel < 0.5, 1.0, 0.0) + np.where(rel == 0.5, 0.5, 0.0)))
        rgb = np.median(pixels[ys, xs].astype(np.float64), axis=0)
        regions.append(
            Region(
                area=len(xs) / (h * w),
                centroid=(float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h),
                box=(x0, y0, x1, y1),
                fill=fill,
                top_share=top_share,
                aspect=bw / bh,
                rgb=(float(rgb[0]), float(rgb[1]), float(rgb[2])),
                colour=_classify_colour(rgb, max_colour_distance),
                kind=_classify_shape(fill, top_share, bw / bh),
            )
        )
    return tuple(sorted(regions, key=lambda r: -r.area))


def check(image: ImageLike, prompt: str) -> ImageCheck:
    """Whether ``image`` shows exactly what ``prompt`` (a shapes caption) asks for."""
    spec = parse_caption(prompt)
    regions = find_regions(image)

    def verdict(reason: Reason | None) -> ImageCheck:
        return ImageCheck(prompt, reason, regions)

    if len(regions) != len(spec.objects):
        return verdict("count")
    if Counter(r.colour for r in regions) != Counter(c for c, _ in spec.objects):
        return verdict("colour")
    if Counter(r.kind for r in regions) != Counter(k for _, k in spec.objects):
        return verdict("shape")
    matches = [
        order
        for order in permutations(regions)
        if all((r.colour, r.kind) == obj for r, obj in zip(order, spec.objects, strict=True))
    ]
    if not matches:
        return verdict("binding")
    if spec.relation is not None:
        first, second = matches[0]
        axis, sign = RELATION_AXIS[spec.relation]
        delta = np.subtract(second.centroid, first.centroid)
        if not (sign * delta[axis] > 0 and abs(delta[axis]) > abs(delta[1 - axis])):
            return verdict("relation")
    return verdict(None)


_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
_PAPER_AND_INK = np.concatenate([[BACKGROUND], _PALETTE_RGB]).astype(np.float64)
OFF_PALETTE_DISTANCE = 40.0
"""A pixel farther than this from white and the four colours counts as off-palette."""
KERNEL_BANDWIDTH = 2.0
"""Fixed Gaussian-kernel bandwidth (about the median distance between dataset `features`)."""


def features(image: ImageLike) -> npt.NDArray[np.float64]:
    """The 100-number summary `distance` compares (each block weighted to a unit-ish scale).

    Colour: the square root of the 4x4x4-bin RGB histogram (x2), the share of off-palette
    pixels (blur, noise, colour drift; square root, x2), the ink share (x4). Geometry: region
    count (one-hot 0/1/2/3+), and for the two largest regions their colour and shape (one-hot,
    with "none"), area (x4), fill, top share, aspect and centroid.
    """
    pixels = _as_array(image)
    h, w, _ = pixels.shape
    bins = (pixels // 64).astype(np.int64)
    flat = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    histogram = np.sqrt(np.bincount(flat.ravel(), minlength=64) / (h * w))
    rgb = pixels.reshape(-1, 1, 3).astype(np.float32)
    nearest = np.sqrt(((rgb - _PAPER_AND_INK.astype(np.float32)) ** 2).sum(-1)).min(axis=1)
    off_palette = np.sqrt(np.mean(nearest > OFF_PALETTE_DISTANCE))
    ink = np.mean(pixels.min(axis=2) < INK_THRESHOLD)
    regions = find_regions(pixels)
    count = np.zeros(4)
    count[min(len(regions), 3)] = 1.0
    described = np.zeros((2, 15))
    for i, r in enumerate(regions[:2]):
        described[i, _COLOUR_INDEX[r.colour] if r.colour is not None else 4] = 1.0
        described[i, 5 + (_KIND_INDEX[r.kind] if r.kind is not None else 3)] = 1.0
        aspect = min(r.aspect, 1 / r.aspect)
        described[i, 9:] = (4 * r.area, r.fill, r.top_share, aspect, *r.centroid)
    return np.concatenate([2 * histogram, [2 * off_palette, 4 * ink], count, described.ravel()])


def mmd(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], *, bandwidth: float = KERNEL_BANDWIDTH
) -> float:
    """Unbiased MMD^2 between the rows of ``x`` and ``y``, Gaussian kernel of ``bandwidth``.

    Gretton et al., JMLR 2012, eq. (3): mean k over distinct pairs within each set, minus
    twice the mean across sets. In [-2, 2]; ~0 (either sign) for samples of one distribution.
    """
    if len(x) < 2 or len(y) < 2:
        raise InvalidArgumentError("the MMD needs at least two images in each set")

    def kernel(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        sq: npt.NDArray[np.float64] = (
            (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        )
        out: npt.NDArray[np.float64] = np.exp(-np.maximum(sq, 0.0) / (2 * bandwidth**2))
        return out

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - m) / (m * (m - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2 * kxy.mean())


def distance(images: Sequence[ImageLike], reference: Sequence[ImageLike]) -> float:
    """Unbiased MMD^2 between the `features` of two image sets (~0 when they match)."""
    return mmd(
        np.stack([features(im) for im in images]), np.stack([features(im) for im in reference])
    )


def reference_images(prompts: Sequence[str], *, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """One dataset image per prompt (a random scene of that caption), for `distance`."""
    return [
        render(sample_scene(np.random.default_rng([seed, i]), prompt=p), size)
        for i, p in enumerate(prompts)
    ]


def _score(name: str, checks: Sequence[ImageCheck]) -> GroupScore:
    failures = Counter(c.reason for c in checks if c.reason is not None)
    return GroupScore(
        name, len(checks), sum(c.ok for c in checks), {r: failures[r] for r in REASONS}
    )


def evaluate(
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    *,
    reference: Sequence[ImageLike] | None = None,
    reference_seed: int = 0,
) -> Report:
    """Check each image against its prompt and measure the distance to dataset images.

    ``reference`` defaults to `reference_images` of the same prompts (seed
    ``reference_seed``, the images' size), so the distance compares like with like; pass
    ``reference=()`` to skip it.
    """
    if len(images) != len(prompts):
        raise InvalidArgumentError(f"{len(images)} images but {len(prompts)} prompts")
    checks = tuple(check(im, p) for im, p in zip(images, prompts, strict=True))
    single = [c for c in checks if parse_caption(c.prompt).relation is None]
    two = [c for c in checks if parse_caption(c.prompt).relation is not None]
    if reference is None and len(images) >= 2:
        size = _as_array(images[0]).shape[0]
        reference = reference_images(prompts, seed=reference_seed, size=size)
    dist = distance(images, reference) if reference and len(images) >= 2 else None
    return Report(_score("single", single), _score("two", two), _score("all", checks), dist, checks)


def format_table(reports: Report | Mapping[str, Report]) -> str:
    """A Markdown table: one row per report (e.g. per sampler), adherence per group and distance.

    >>> print(format_table({"ddim": report}))  # doctest: +SKIP
    | run  | single      | two        | all        | MMD^2 x1e3 | failures            |
    |------|-------------|------------|------------|------------|---------------------|
    | ddim | 100.0% (24) | 87.5% (72) | 90.6% (96) | 41.30      | shape 2, relation 7 |
    """
    rows = reports if isinstance(reports, Mapping) else {"": reports}
    header = ["run", "single", "two", "all", "MMD^2 x1e3", "failures"]
    body = []
    for name, r in rows.items():
        cells = [f"{g.adherence:.1%} ({g.n})" for g in (r.single, r.two, r.overall)]
        dist = "-" if r.distance is None else f"{r.distance * 1e3:.2f}"
        fails = ", ".join(f"{k} {v}" for k, v in r.overall.failures.items() if v) or "-"
        body.append([name, *cells, dist, fails])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(wd) for c, wd in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (wd + 2) for wd in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def sampler_grid(
    pipe: Any,
    prompts: Sequence[str],
    runs: Sequence[tuple[str, int, float]],
    *,
    seed: int = 0,
    batch: int = 16,
    progress: bool = True,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Report]:
    """Generate every prompt once per ``(scheduler, steps, guidance_scale)`` run and evaluate.

    Image ``i`` uses seed ``seed + i`` in every run, so runs differ only in the sampler;
    ``options`` are more ``generate`` keywords for every run (``feature_cache=3``, ...).
    """
    from tqdm.auto import tqdm

    reports: dict[str, Report] = {}
    reference = reference_images(prompts, seed=seed + 1, size=pipe.default_size[0])
    for scheduler, steps, guidance in tqdm(runs, desc="runs", disable=not progress):
        images: list[ImageLike] = []
        for start in range(0, len(prompts), batch):
            chunk = list(prompts[start : start + batch])
            result = pipe.generate(
                chunk,
                scheduler=scheduler,
                steps=steps,
                guidance_scale=guidance,
                seed=[seed + start + i for i in range(len(chunk))],
                progress=False,
                **(options or {}),
            )
            images += result.images
        reports[f"{scheduler} {steps} steps, cfg {guidance:g}"] = evaluate(
            images, prompts, reference=reference
        )
    return reports


def default_runs(
    *,
    steps: Sequence[int] = (5, 10, 20, 50),
    guidance: Sequence[float] = (1.0, 3.0, 7.5),
    ddpm_steps: int = 1000,
    schedulers: Sequence[str] = ("ddim", "dpm-solver++"),
) -> list[tuple[str, int, float]]:
    """The grid of the docs' table: DDPM at ``ddpm_steps``, each of ``schedulers`` (DDIM and
    DPM-Solver++) at each of ``steps``."""
    runs: list[tuple[str, int, float]] = []
    for g in guidance:
        if ddpm_steps:
            runs.append(("ddpm", ddpm_steps, g))
        runs += [(name, n, g) for name in schedulers for n in steps]
    return runs
