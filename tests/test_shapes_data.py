"""The procedural shapes dataset: deterministic, grammatical, covering, and true to its captions."""

from __future__ import annotations

import doctest
import re

import numpy as np
import pytest

from latentkit.errors import InvalidArgumentError
from latentkit.lab import shapes

N = 300
OBJECT = r"a (red|green|blue|yellow) (circle|square|triangle)"
CAPTION = re.compile(rf"^{OBJECT}$|^{OBJECT} (left of|right of|above|below) {OBJECT}$")


@pytest.fixture(scope="module")
def samples() -> list[tuple[shapes.Scene, str]]:
    data = shapes.ShapesDataset(N, seed=7, split="all")
    return [(data.scene(i), data[i][1]) for i in range(N)]


def test_same_seed_same_items_and_other_seed_differs() -> None:
    a, b = list(shapes.dataset(20, seed=3)), list(shapes.dataset(20, seed=3))
    c = list(shapes.dataset(20, seed=4))
    assert [t for _, t in a] == [t for _, t in b]
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b, strict=True)
    )
    assert [t for _, t in a] != [t for _, t in c]
    assert (
        sum(
            np.array_equal(np.asarray(x), np.asarray(y))
            for (x, _), (y, _) in zip(a, c, strict=True)
        )
        == 0
    )
    # Random access: item i does not depend on the items before it.
    assert shapes.ShapesDataset(20, seed=3)[11][1] == a[11][1]


@pytest.mark.parametrize("size", [64, 96])
def test_images_are_rgb_of_the_requested_size(size: int) -> None:
    for image, _ in shapes.dataset(4, seed=0, size=size):
        assert image.mode == "RGB" and image.size == (size, size)
        colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
        assert colours <= {shapes.BACKGROUND, *shapes.PALETTE.values()}  # aliased: no blends


def test_captions_follow_the_grammar_and_round_trip(
    samples: list[tuple[shapes.Scene, str]],
) -> None:
    for scene, text in samples:
        assert CAPTION.match(text), text
        assert text == shapes.caption(scene)
        assert shapes.parse_caption(text) == shapes.spec_of(scene)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle.",
        "A red circle",
        "a purple circle",
        "a red hexagon",
        "a red circle next to a blue square",
        "a red circle left a blue square",
        "a red circle  above a blue square",
        "a red circle above a red circle",
    ],
)
def test_parse_caption_rejects_other_text(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        shapes.parse_caption(text)


def test_vocabulary_is_covered(samples: list[tuple[shapes.Scene, str]]) -> None:
    scenes = [scene for scene, _ in samples]
    assert {s.kind for sc in scenes for s in sc.shapes} == set(shapes.KINDS)
    assert {s.colour for sc in scenes for s in sc.shapes} == set(shapes.COLOURS)
    assert {sc.relation for sc in scenes} == {None, *shapes.RELATIONS}
    two = sum(len(sc.shapes) == 2 for sc in scenes)
    assert 0.4 * N < two < 0.6 * N
    assert {(s.colour, s.kind) for sc in scenes if sc.relation is None for s in sc.shapes} == {
        (c, k) for c in shapes.COLOURS for k in shapes.KINDS
    }


def _mask_centroid(shape: shapes.Shape, size: int) -> np.ndarray:
    alone = shapes.render(shapes.Scene((shape,)), size)
    ys, xs = np.nonzero(np.asarray(alone).min(axis=2) < 128)
    return np.array([xs.mean(), ys.mean()])


def test_rendered_shapes_satisfy_the_relation_and_do_not_overlap(
    samples: list[tuple[shapes.Scene, str]],
) -> None:
    size = 64
    for scene, text in samples:
        if scene.relation is None:
            continue
        masks = [
            np.asarray(shapes.render(shapes.Scene((s,)), size)).min(axis=2) < 128
            for s in scene.shapes
        ]
        assert not (masks[0] & masks[1]).any(), text
        whole = np.asarray(shapes.render(scene, size)).min(axis=2) < 128
        assert np.array_equal(whole, masks[0] | masks[1])  # both fully visible
        first, second = (_mask_centroid(s, size) for s in scene.shapes)
        axis, sign = shapes.RELATION_AXIS[scene.relation]
        delta = second - first
        assert sign * delta[axis] > 0, text
        # Unambiguous: the relation's axis dominates, with a margin.
        assert abs(delta[axis]) > 1.5 * abs(delta[1 - axis]), text


def test_shapes_stay_inside_the_image(samples: list[tuple[shapes.Scene, str]]) -> None:
    for scene, _ in samples:
        for s in scene.shapes:
            for c in s.centre:
                assert c - s.size / 2 >= shapes.BORDER and c + s.size / 2 <= 1 - shapes.BORDER


def test_held_out_split_is_disjoint_from_training() -> None:
    held = set(shapes.all_captions(split="held_out"))
    train = set(shapes.all_captions(split="train"))
    assert len(shapes.all_captions()) == 12 + 12 * 11 * 4
    assert held and not held & train and len(held | train) == len(shapes.all_captions())
    assert all(shapes.parse_caption(t).relation is not None for t in held)
    # Both wordings of an arrangement fall on the same side.
    assert "a red circle above a red square" in held
    assert "a red square below a red circle" in held
    trained = {t for _, t in shapes.dataset(200, seed=1, two_shape_fraction=1.0)}
    assert not trained & held

    prompts = shapes.held_out_prompts(0, n_single=24, n_two=40)
    assert prompts == shapes.held_out_prompts(0, n_single=24, n_two=40)
    assert prompts != shapes.held_out_prompts(1, n_single=24, n_two=40)
    singles, twos = prompts[:24], prompts[24:]
    assert sorted(set(singles)) == sorted(shapes.all_captions(two_shapes=False))
    assert len(set(twos)) == 40 and set(twos) <= held


def test_scene_for_a_prompt_matches_it() -> None:
    rng = np.random.default_rng(0)
    for text in ["a green triangle", "a blue square below a yellow circle"]:
        assert shapes.caption(shapes.sample_scene(rng, prompt=text)) == text


def test_scene_validates_its_shapes() -> None:
    one = shapes.Shape("circle", "red", (0.5, 0.5), 0.3)
    with pytest.raises(InvalidArgumentError):
        shapes.Scene((one, one))
    with pytest.raises(InvalidArgumentError):
        shapes.Scene((one,), "above")


def test_docstring_examples() -> None:
    assert doctest.testmod(shapes).failed == 0


def test_mirrored_wording_describes_the_same_scene() -> None:
    from latentkit.lab.evaluation import evaluate

    assert shapes.mirrored("a red circle") is None
    twos = shapes.all_captions(two_shapes=True)
    rng = np.random.default_rng(3)
    images, texts = [], []
    for text in twos:
        other = shapes.mirrored(text)
        assert other is not None and other != text and other in twos
        assert shapes.mirrored(other) == text
        assert shapes.split_of(other) == shapes.split_of(text)  # never leaks across splits
    for i in rng.choice(len(twos), size=24, replace=False):
        scene = shapes.sample_scene(rng, prompt=twos[i])
        images.append(shapes.render(scene))
        texts.append(shapes.mirrored(twos[i]))
    assert evaluate(images, texts).overall.adherence == 1.0
