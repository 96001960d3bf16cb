"""A procedural text-to-image dataset: one or two flat-coloured shapes on white, with captions.

Everything is a function of a seed; no files. Captions take exactly two forms::

    a {colour} {shape}
    a {colour} {shape} {relation} a {colour} {shape}

Geometry lives in normalised coordinates (x right, y *down*, both in [0, 1]) so one scene
renders at any resolution. Two shapes never overlap and their relation is unambiguous: the
centres are separated along the relation's axis by at least the two half-sizes plus a gap,
and across it by at most half of that.

Rendering is aliased (no anti-aliasing) by default: every pixel is white or one of the four
palette colours, so the ground truth of the evaluator (`latentkit.lab.evaluation`) is exact; the
evaluator itself thresholds at the 50 % blend between ink and paper, so soft-edged images
(``antialias=True``, or decoded by a VAE) give the same regions.

>>> from latentkit.lab import shapes
>>> image, text = next(shapes.dataset(1, seed=0))
>>> image.size, text.startswith("a ")
((64, 64), True)
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from latentkit.errors import InvalidArgumentError

Kind = Literal["circle", "square", "triangle"]
Colour = Literal["red", "green", "blue", "yellow"]
Relation = Literal["left of", "right of", "above", "below"]
Split = Literal["train", "held_out", "all"]

KINDS: tuple[Kind, ...] = ("circle", "square", "triangle")
COLOURS: tuple[Colour, ...] = ("red", "green", "blue", "yellow")
RELATIONS: tuple[Relation, ...] = ("left of", "right of", "above", "below")

PALETTE: Mapping[Colour, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 215, 0),
}
"""RGB of each colour: pure hues, far apart (the closest pair, red and yellow, is 215 apart)."""

BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Relation -> (axis, sign): the second shape's centre minus the first's, along `axis`
# (0 = x, 1 = y with y down), has this sign. "a A left of a B": B is right of A.
RELATION_AXIS: Mapping[Relation, tuple[int, int]] = {
    "left of": (0, 1),
    "right of": (0, -1),
    "above": (1, 1),
    "below": (1, -1),
}

SINGLE_SIZE = (0.30, 0.55)
"""Range of a lone shape's size (side of its bounding box, as a fraction of the image)."""
PAIR_SIZE = (0.20, 0.32)
"""Range of each shape's size in a two-shape scene."""
BORDER = 0.04
"""Least distance from a shape's bounding box to the image edge."""
GAP = 0.06
"""Least gap between two shapes' bounding boxes along the relation's axis."""
CROSS_RATIO = 0.5
"""Most separation across the relation's axis, as a fraction of the separation along it."""
HELD_OUT_MODULUS = 8
"""About 1 in this many two-shape compositions is held out of the training split."""

_KIND_BY_NAME: dict[str, Kind] = {k: k for k in KINDS}
_COLOUR_BY_NAME: dict[str, Colour] = {c: c for c in COLOURS}
_RELATION_BY_NAME: dict[str, Relation] = {r: r for r in RELATIONS}


@dataclass(frozen=True)
class Shape:
    """One shape: ``centre`` (x, y) and ``size`` (bounding-box side) as fractions of the image."""

    kind: Kind
    colour: Colour
    centre: tuple[float, float]
    size: float


@dataclass(frozen=True)
class Scene:
    """One or two shapes; with two, ``relation`` says where the first is relative to the second."""

    shapes: tuple[Shape, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        if len(self.shapes) not in (1, 2):
            raise InvalidArgumentError(f"a scene has 1 or 2 shapes, got {len(self.shapes)}")
        if (len(self.shapes) == 2) != (self.relation is not None):
            raise InvalidArgumentError("a relation is given exactly when there are two shapes")


@dataclass(frozen=True)
class Spec:
    """What a caption asks for: (colour, kind) per object, in caption order, and the relation."""

    objects: tuple[tuple[Colour, Kind], ...]
    relation: Relation | None = None


def caption(scene: Scene) -> str:
    """The caption of ``scene``: ``a red circle`` or ``a red circle left of a blue square``."""
    return _caption_of(spec_of(scene))


def spec_of(scene: Scene) -> Spec:
    """The `Spec` that ``scene`` satisfies (what `parse_caption` of its caption returns)."""
    return Spec(tuple((s.colour, s.kind) for s in scene.shapes), scene.relation)


def parse_caption(text: str) -> Spec:
    """Parse a caption of either form; raises `InvalidArgumentError` on anything else.

    >>> parse_caption("a red circle above a blue square")
    Spec(objects=(('red', 'circle'), ('blue', 'square')), relation='above')
    """
    words = text.split(" ")
    if len(words) == 3:
        objects, relation = [words], None
    elif len(words) == 7 and words[3] in ("above", "below"):
        objects, relation = [words[:3], words[4:]], words[3]
    elif len(words) == 8 and words[4] == "of":
        objects, relation = [words[:3], words[5:]], f"{words[3]} of"
    else:
        raise InvalidArgumentError(f"not a shapes caption: {text!r}")
    parsed: list[tuple[Colour, Kind]] = []
    for article, colour, kind in objects:
        if article != "a" or colour not in _COLOUR_BY_NAME or kind not in _KIND_BY_NAME:
            raise InvalidArgumentError(
                f"not a shapes caption: {text!r} (colours: {', '.join(COLOURS)}; "
                f"shapes: {', '.join(KINDS)})"
            )
        parsed.append((_COLOUR_BY_NAME[colour], _KIND_BY_NAME[kind]))
    rel = None
    if relation is not None:
        if relation not in _RELATION_BY_NAME:
            raise InvalidArgumentError(
                f"not a shapes caption: {text!r} (relations: {', '.join(RELATIONS)})"
            )
        rel = _RELATION_BY_NAME[relation]
    if len(parsed) == 2 and parsed[0] == parsed[1]:
        raise InvalidArgumentError(f"the two shapes of {text!r} must differ in colour or shape")
    return Spec(tuple(parsed), rel)


_OPPOSITE: Mapping[Relation, Relation] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}


def mirrored(text: str) -> str | None:
    """The other wording of the same two-shape scene, ``None`` for a single shape.

    >>> mirrored("a red circle left of a blue square")
    'a blue square right of a red circle'
    """
    spec = parse_caption(text)
    if spec.relation is None:
        return None
    return _caption_of(Spec(spec.objects[::-1], _OPPOSITE[spec.relation]))


def _pixel_box(shape: Shape, size: int) -> tuple[int, int, int, int]:
    side = max(3, round(shape.size * size))
    x0 = round(shape.centre[0] * size - side / 2)
    y0 = round(shape.centre[1] * size - side / 2)
    return x0, y0, x0 + side - 1, y0 + side - 1


def render(scene: Scene, size: int = 64, *, antialias: bool = False) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    Triangles are upright and isosceles with base = height = ``shape.size``; squares are
    axis-aligned. ``antialias=True`` draws at 4x and downsamples with a box filter.
    """
    if size < 16:
        raise InvalidArgumentError(f"size must be at least 16, got {size}")
    scale = 4 if antialias else 1
    image = Image.new("RGB", (size * scale, size * scale), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = _pixel_box(shape, size * scale)
        fill = PALETTE[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    if antialias:
        image = image.resize((size, size), Image.Resampling.BOX)
    return image


def _composition_key(spec: Spec) -> str:
    # A composition and its mirror ("A left of B" / "B right of A") share a key, so the
    # held-out split never shows the same arrangement under the other wording.
    assert spec.relation is not None
    names = sorted(f"{c} {k}" for c, k in spec.objects)
    axis = "horizontal" if RELATION_AXIS[spec.relation][0] == 0 else "vertical"
    return f"{names[0]}|{names[1]}|{axis}"


def split_of(text: str) -> Literal["train", "held_out"]:
    """``"held_out"`` for two-shape compositions kept out of training, else ``"train"``.

    The 12 single-shape captions are all in training (too few to hold any out); about 1/8 of
    the two-shape compositions (an unordered pair of objects on one axis, so both wordings of
    an arrangement) are held out, chosen by a fixed hash.
    """
    spec = parse_caption(text)
    if spec.relation is None:
        return "train"
    crc = zlib.crc32(_composition_key(spec).encode())
    return "held_out" if crc % HELD_OUT_MODULUS == 0 else "train"


def all_captions(*, two_shapes: bool | None = None, split: Split = "all") -> list[str]:
    """Every caption of the vocabulary (12 single, 528 two-shape), filtered, in a fixed order."""
    objects = [f"a {c} {k}" for c, k in product(COLOURS, KINDS)]
    out: list[str] = []
    if two_shapes is not True:
        out += objects
    if two_shapes is not False:
        out += [f"{a} {r} {b}" for a, r, b in product(objects, RELATIONS, objects) if a != b]
    return out if split == "all" else [t for t in out if split_of(t) == split]


def _place_pair(rng: np.random.Generator, relation: Relation) -> list[tuple[float, float, float]]:
    axis, sign = RELATION_AXIS[relation]
    for _ in range(10_000):
        sizes = rng.uniform(*PAIR_SIZE, size=2)
        lo, hi = BORDER + sizes / 2, 1 - BORDER - sizes / 2
        centres = rng.uniform(lo[:, None], hi[:, None], size=(2, 2))
        delta = centres[1] - centres[0]
        along, across = sign * delta[axis], abs(delta[1 - axis])
        if along >= sizes.sum() / 2 + GAP and across <= CROSS_RATIO * along:
            return [
                (float(c[0]), float(c[1]), float(s)) for c, s in zip(centres, sizes, strict=True)
            ]
    raise RuntimeError("could not place two shapes")  # pragma: no cover - probability ~0


def sample_scene(
    rng: np.random.Generator,
    *,
    two_shapes: bool | None = None,
    prompt: str | None = None,
    split: Split = "all",
) -> Scene:
    """A random scene: of ``prompt`` if given, else of a random caption from ``split``.

    ``two_shapes=None`` picks one or two shapes with equal odds (ignored with ``prompt``).
    """
    if prompt is not None:
        spec = parse_caption(prompt)
    else:
        if two_shapes is None:
            two_shapes = bool(rng.random() < 0.5)
        while True:
            picks = [(COLOURS[rng.integers(4)], KINDS[rng.integers(3)]) for _ in range(2)]
            if not two_shapes:
                spec = Spec((picks[0],))
                break
            spec = Spec(tuple(picks), RELATIONS[rng.integers(4)])
            if picks[0] != picks[1] and split in ("all", split_of(_caption_of(spec))):
                break
    if spec.relation is None:
        s = float(rng.uniform(*SINGLE_SIZE))
        x, y = rng.uniform(BORDER + s / 2, 1 - BORDER - s / 2, size=2)
        places = [(float(x), float(y), s)]
    else:
        places = _place_pair(rng, spec.relation)
    shapes = tuple(
        Shape(kind, colour, (x, y), s)
        for (colour, kind), (x, y, s) in zip(spec.objects, places, strict=True)
    )
    return Scene(shapes, spec.relation)


def _caption_of(spec: Spec) -> str:
    words = [f"a {c} {k}" for c, k in spec.objects]
    return words[0] if spec.relation is None else f"{words[0]} {spec.relation} {words[1]}"


class ShapesDataset:
    """``n`` (image, caption) pairs; item ``i`` depends only on (``seed``, ``i``).

    Sized and indexable like a ``torch.utils.data.Dataset`` (without importing torch).
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        size: int = 64,
        two_shape_fraction: float = 0.5,
        split: Split = "train",
        antialias: bool = False,
    ) -> None:
        if n < 0:
            raise InvalidArgumentError(f"n must be >= 0, got {n}")
        if not 0.0 <= two_shape_fraction <= 1.0:
            raise InvalidArgumentError(
                f"two_shape_fraction must be in [0, 1], got {two_shape_fraction}"
            )
        self.n, self.seed, self.size = n, seed, size
        self.two_shape_fraction, self.split, self.antialias = two_shape_fraction, split, antialias

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        two = bool(rng.random() < self.two_shape_fraction)
        return sample_scene(rng, two_shapes=two, split=self.split)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        scene = self.scene(index)
        return render(scene, self.size, antialias=self.antialias), caption(scene)

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        for i in range(self.n):
            yield self[i]


def dataset(
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    two_shape_fraction: float = 0.5,
    split: Split = "train",
    antialias: bool = False,
) -> Iterator[tuple[Image.Image, str]]:
    """Iterate ``n`` (image, caption) pairs; see `ShapesDataset`."""
    return iter(
        ShapesDataset(
            n,
            seed=seed,
            size=size,
            two_shape_fraction=two_shape_fraction,
            split=split,
            antialias=antialias,
        )
    )


def held_out_prompts(seed: int = 0, *, n_single: int = 24, n_two: int = 72) -> list[str]:
    """A fixed evaluation prompt list: ``n_single`` single-shape prompts, then ``n_two`` two-shape.

    Single-shape prompts cycle through all 12 captions (balanced); two-shape prompts are drawn
    from the held-out compositions only (never in ``split="train"``), without repeats until
    the pool (about 64) is used up. The order depends on ``seed``.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    singles = all_captions(two_shapes=False)
    pool = all_captions(two_shapes=True, split="held_out")
    out: list[str] = []
    for source, n in ((singles, n_single), (pool, n_two)):
        picked: list[str] = []
        while len(picked) < n:
            picked += [source[i] for i in rng.permutation(len(source))]
        out += picked[:n]
    return out
