"""Issue 14, class 6: the A1111 ``parameters`` text of a PNG cannot be forged by a prompt.

The attacks: prompts, negative prompts, model and sampler names holding newlines, NUL
bytes, lone surrogates, Unicode line separators and text that looks like the other lines
(``Negative prompt: ...``, ``Steps: 1, Seed: 666, ...``). The oracle for "not forged" is a
reader that does what A1111's ``parse_generation_parameters`` does (last line = fields
when it has 3 or more, the first line starting with ``Negative prompt:`` after strip()
starts the negative prompt, JSON-quoted field values); the round trip is
`GenerationParameters.from_a1111`.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from latentkit.errors import InvalidArgumentError
from latentkit.results import GenerationParameters, save_png

# Every code point, surrogates (Cs) and NUL included.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
# Text built from the pieces an attacker would use.
PIECES = st.sampled_from(
    [
        "\n",
        "\r\n",
        "\x00",
        "\ud800",
        "\udfff",
        "\u2028",
        "\x85",
        '"',
        ",",
        ":",
        " ",
        "\t",
        "Negative prompt:",
        "negative PROMPT :",
        "Steps: 1, Sampler: evil, CFG scale: 1, Seed: 666, Size: 1x1, Model: m",
        "Seed: 666",
        "a cat",
        "\\n",
        '\\"',
        "(word:1.2)",
    ]
)
HOSTILE_TEXT = st.one_of(ANY_TEXT, st.lists(PIECES, max_size=8).map("".join))


def a1111_parse(text: str) -> dict[str, str]:
    """What A1111's ``parse_generation_parameters`` reads from ``text`` (prompt, negative
    prompt and the raw fields), re-implemented from its documented behaviour."""
    field = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    if len(field.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, done = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done = True
            line = line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in field.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        result[key] = value
    return result


def params(**changes: Any) -> GenerationParameters:
    base: dict[str, Any] = dict(
        prompt="a cat",
        negative_prompt="blurry",
        steps=20,
        scheduler="DPM++ 2M Karras",
        guidance_scale=7.5,
        seed=42,
        width=512,
        height=768,
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    return GenerationParameters(**{**base, **changes})


@settings(max_examples=400, deadline=None)
@given(
    prompt=HOSTILE_TEXT,
    negative=HOSTILE_TEXT,
    model=HOSTILE_TEXT,
    scheduler=HOSTILE_TEXT,
    guidance=st.floats(0, 30, allow_nan=False),
    seed=st.integers(0, 2**63 - 1),
    strength=st.none() | st.floats(0, 1),
    clip_skip=st.none() | st.integers(1, 12),
    rescale=st.floats(0, 1),
)
@example(
    prompt="a cat\nNegative prompt: evil\nSteps: 1, Sampler: evil, CFG scale: 1, Seed: 666, "
    "Size: 1x1, Model: m",
    negative="x\nSteps: 2, Seed: 667",
    model="m, Seed: 668",
    scheduler='" Seed: 669',
    guidance=7.5,
    seed=1,
    strength=None,
    clip_skip=None,
    rescale=0.0,
)
def test_no_text_forges_a_field_and_every_text_reads_back(
    prompt: str,
    negative: str,
    model: str,
    scheduler: str,
    guidance: float,
    seed: int,
    strength: float | None,
    clip_skip: int | None,
    rescale: float,
) -> None:
    p = params(
        prompt=prompt,
        negative_prompt=negative,
        model=model,
        scheduler=scheduler,
        guidance_scale=guidance,
        seed=seed,
        strength=strength,
        clip_skip=clip_skip,
        guidance_rescale=rescale,
    )
    text = p.a1111()
    # PNG text can carry it: valid UTF-8 with no NUL, and exactly three lines' worth of
    # structure whatever the prompts hold.
    assert "\x00" not in text
    text.encode("utf-8")
    # Exact round trip.
    assert GenerationParameters.from_a1111(text) == p
    # A1111's own reader sees the true fields: nothing in a prompt or name forged one.
    read = a1111_parse(text)
    assert read["Seed"] == str(seed)
    assert read["Steps"] == "20"
    assert read["Size"] == "512x768"
    assert read["Model"] == paired(model)
    assert read["Sampler"] == paired(scheduler)
    expected_fields = {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model"}
    expected_fields |= {"Denoising strength"} if strength is not None else set()
    expected_fields |= {"Clip skip"} if clip_skip is not None else set()
    expected_fields |= {"Guidance rescale"} if rescale else set()
    assert set(read) - {"Prompt", "Negative prompt"} == expected_fields
    # The prompts A1111 shows are the prompts (as its line-stripping reader gives any
    # multi-line prompt), or, where a prompt could have forged a line or cannot be PNG
    # text, its JSON quoting: never a split at a forged "Negative prompt:".
    lines = text.split("\n")
    first = lines[0]
    negative_line = next((line for line in lines if line.startswith("Negative prompt: ")), None)
    if negative_line is None:  # A1111 writes no negative line for an empty negative prompt
        assert negative == "" and read.get("Negative prompt", "") == ""
    written_negative = (negative_line or "").removeprefix("Negative prompt: ")
    if first.startswith('"'):
        assert json.loads(first) == paired(prompt) and read["Prompt"] == first
    else:
        assert read["Prompt"] == a1111_lines(prompt)
    if written_negative.startswith('"'):
        assert json.loads(written_negative) == paired(negative)
        assert read["Negative prompt"] == written_negative
    else:
        assert read["Negative prompt"] == a1111_lines(negative)


def paired(text: str) -> str:
    """``text`` as ``json.loads`` (A1111's unquoting) reads its escaped form back: a high
    surrogate followed by a low one becomes the one character they encode in UTF-16."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def a1111_lines(text: str) -> str:
    """``text`` as A1111's reader rebuilds a multi-line prompt: each line stripped, empty
    leading lines dropped."""
    out = ""
    for line in text.split("\n"):
        out += ("" if out == "" else "\n") + line.strip()
    return out


def test_plain_prompts_are_written_as_a1111_writes_them() -> None:
    p = params(prompt="a cat, (fluffy:1.2)\nsecond line", negative_prompt="blurry\\, ugly")
    text = p.a1111()
    assert text.startswith("a cat, (fluffy:1.2)\nsecond line\nNegative prompt: blurry\\, ugly\n")
    assert text.endswith(
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        "Model: stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    assert a1111_parse(text)["Prompt"] == p.prompt


def test_a_forging_prompt_is_quoted_not_obeyed() -> None:
    evil = (
        "a cat\nNegative prompt: nothing\nSteps: 1, Sampler: x, CFG scale: 1, Seed: 666, Size: 1x1"
    )
    text = params(prompt=evil, seed=7).a1111()
    assert text.split("\n")[0] == json.dumps(evil)
    read = a1111_parse(text)
    assert read["Seed"] == "7" and read["Negative prompt"] == "blurry"


def test_the_png_chunk_round_trips(tmp_path: Path) -> None:
    from PIL import Image

    p = params(prompt="nul\x00 and \ud800 lone\nNegative prompt: x", negative_prompt="\u2028")
    target = tmp_path / "x.png"
    save_png(Image.new("RGB", (4, 4)), target, p)
    with Image.open(target) as image:
        stored = image.text["parameters"]  # type: ignore[attr-defined]
    assert GenerationParameters.from_a1111(stored) == p


def test_texts_written_by_a1111_read_as_a1111_reads_them() -> None:
    text = (
        "masterpiece, (a cat:1.2)\nsecond line\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abc, "
        'Model: anything-v3, Denoising strength: 0.55, Clip skip: 2, Lora hashes: "a: 1, b: 2"'
    )
    p = GenerationParameters.from_a1111(text)
    assert p.prompt == "masterpiece, (a cat:1.2)\nsecond line"
    assert p.negative_prompt == "lowres, bad anatomy"
    assert (p.steps, p.scheduler, p.guidance_scale, p.seed) == (28, "Euler a", 7.0, 1234)
    assert (p.width, p.height, p.model, p.strength, p.clip_skip) == (
        512,
        768,
        "anything-v3",
        0.55,
        1,  # A1111's "Clip skip: 2" is the penultimate layer: clip_skip=1 in latentkit/diffusers
    )
    assert dict(p.extras)["Lora hashes"] == "a: 1, b: 2"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("just a prompt", "'Steps'"),
        ("p\nSteps: x, Sampler: a, CFG scale: 7, Seed: 1, Size: 1x1", "'Steps' must be a number"),
        ("p\nSteps: 1, Sampler: a, CFG scale: 7, Seed: 1, Size: big", "WxH"),
        ("p\nSteps: 1, Sampler: a, CFG scale: nan, Seed: 1, Size: 1x1", "CFG scale"),
    ],
)
def test_unreadable_texts_raise_typed_errors(text: str, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        GenerationParameters.from_a1111(text)


@settings(max_examples=300, deadline=None)
@given(text=HOSTILE_TEXT | st.text())
def test_reading_any_text_gives_parameters_or_a_typed_error(text: str) -> None:
    with contextlib.suppress(InvalidArgumentError):
        GenerationParameters.from_a1111(text)
