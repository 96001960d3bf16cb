"""The text conditioner: exact diffusers encoding for plain prompts, chunked long prompts,
A1111 emphasis, clip_skip and precomputed embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit
from latentkit.conditioners.text import EMPHASIS, parse_emphasis

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(sd1_path: Path) -> Any:
    import diffusers

    return diffusers.StableDiffusionPipeline.from_pretrained(str(sd1_path), safety_checker=None)


@pytest.mark.parametrize(
    ("prompt", "runs"),
    [
        ("a red cat", [("a red cat", 1.0)]),
        ("a (red) cat", [("a ", 1.0), ("red", EMPHASIS), (" cat", 1.0)]),
        ("((red))", [("red", EMPHASIS**2)]),
        ("[red]", [("red", 1 / EMPHASIS)]),
        ("(red:1.5) cat", [("red", 1.5), (" cat", 1.0)]),
        ("((red:2) cat:0.5)", [("red", 1.0), (" cat", 0.5)]),
        (
            r"a \(literal\) cat",
            [("a ", 1.0), ("(", 1.0), ("literal", 1.0), (")", 1.0), (" cat", 1.0)],
        ),
        ("open (ended", [("open ", 1.0), ("ended", EMPHASIS)]),
        ("time: 3pm)", [("time", 1.0), (":", 1.0), (" 3pm", 1.0), (")", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_emphasis(prompt: str, runs: list[tuple[str, float]]) -> None:
    got = parse_emphasis(prompt)
    # Adjacent runs of equal weight merge; compare the joined text per weight.
    assert "".join(t for t, _ in got) == "".join(t for t, _ in runs)
    flat = [(c, w) for t, w in got for c in t]
    want = [(c, w) for t, w in runs for c in t]
    assert [c for c, _ in flat] == [c for c, _ in want]
    assert np.allclose([w for _, w in flat], [w for _, w in want])


def test_plain_prompt_encodes_exactly_as_diffusers(pipe: Any, reference: Any) -> None:
    prompts = ["a photo of a red cat", ""]
    ours = pipe.text[0].encode(prompts, device=CPU, dtype=torch.float32)
    theirs, _ = reference.encode_prompt(prompts, CPU, 1, False)
    assert ours.shape == theirs.shape == (2, 77, 32)
    assert torch.equal(ours, theirs)
    tokens = pipe.text[0].tokenize(prompts)
    expected = reference.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    assert torch.equal(tokens.ids[:, 0], expected.input_ids)
    assert torch.equal(tokens.mask[:, 0], expected.attention_mask)


def test_clip_skip_is_the_earlier_layer_through_the_final_norm(pipe: Any, reference: Any) -> None:
    # diffusers' own clip_skip path reads `text_encoder.text_model`, which transformers 5
    # removed, so compare with its definition on the reference encoder directly.
    tokens = pipe.text[0].tokenize(["a red cat"])
    ours = pipe.text[0].embed(tokens, device=CPU, dtype=torch.float32, clip_skip=1)
    encoder = reference.text_encoder
    states = encoder(tokens.ids[:, 0], output_hidden_states=True).hidden_states
    theirs = getattr(encoder, "text_model", encoder).final_layer_norm(states[-2])
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, pipe.text[0].embed(tokens, device=CPU, dtype=torch.float32))
    with pytest.raises(latentkit.InvalidArgumentError, match="clip_skip"):
        pipe.text[0].embed(tokens, device=CPU, dtype=torch.float32, clip_skip=5)


def test_long_prompt_is_chunked_not_cut(pipe: Any) -> None:
    words = "cat " * 100  # 100 tokens: two chunks of at most 75
    tokens = pipe.text[0].tokenize([words, "cat"])
    assert tokens.chunks == 2
    ids = tokens.ids
    start, end = pipe.text[0].tokenizer.bos_token_id, pipe.text[0].tokenizer.eos_token_id
    assert (ids[:, :, 0] == start).all()
    assert int(tokens.mask[0].sum()) == 100 + 4  # every token kept, plus start/end per chunk
    assert ids[0, 0, 76] == end and ids[0, 1, 26] == end
    # The short prompt's second chunk encodes the empty prompt.
    assert torch.equal(ids[1, 1], pipe.text[0].tokenize([""]).ids[0, 0])
    hidden = pipe.text[0].encode([words], device=CPU, dtype=torch.float32)
    assert hidden.shape == (1, 154, 32)
    first = pipe.text[0].encode([" ".join(["cat"] * 75)], device=CPU, dtype=torch.float32)
    assert torch.equal(hidden[:, :77], first)


def test_long_prompt_generates_and_text_past_77_tokens_matters(pipe: Any) -> None:
    base = "cat " * 80
    kw: dict[str, Any] = dict(
        steps=2, seed=0, output_type="np", progress=False, height=32, width=32
    )
    a = pipe.generate(base + "red red red", **kw).images[0]
    b = pipe.generate(base + "photo photo", **kw).images[0]
    assert np.abs(a - b).max() > 1e-4
    # A long negative prompt with a short prompt works too.
    pipe.generate("cat", negative_prompt=base, **kw)


def test_emphasis_scales_tokens_and_keeps_the_mean(pipe: Any) -> None:
    plain = pipe.text[0].encode(["a red cat"], device=CPU, dtype=torch.float32)
    assert torch.equal(
        pipe.text[0].encode(["a (red:1.0) cat"], device=CPU, dtype=torch.float32), plain
    )
    weighted = pipe.text[0].encode(["a (red:1.5) cat"], device=CPU, dtype=torch.float32)
    tokens = pipe.text[0].tokenize(["a (red:1.5) cat"])
    scaled = tokens.weights[0, 0] == 1.5
    assert int(scaled.sum()) >= 1
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    ratio = weighted[0, scaled] / plain[0, scaled]
    assert torch.allclose(ratio, torch.full_like(ratio, float(ratio.flatten()[0])), rtol=1e-4)
    assert float(ratio.flatten()[0]) == pytest.approx(
        1.5 * float(plain.mean() / (plain * tokens.weights[0, 0, :, None]).mean()), rel=1e-5
    )


def test_prompt_embeds_equal_the_prompt(pipe: Any) -> None:
    kw: dict[str, Any] = dict(
        steps=2, seed=3, output_type="np", progress=False, height=32, width=32
    )
    embeds = pipe.text[0].encode(["a red cat"], device=CPU, dtype=torch.float32)
    negative = pipe.text[0].encode(["blurry"], device=CPU, dtype=torch.float32)
    a = pipe.generate("a red cat", negative_prompt="blurry", **kw).images[0]
    b = pipe.generate(prompt_embeds=embeds, negative_prompt_embeds=negative, **kw).images[0]
    c = pipe.generate(prompt_embeds=embeds, negative_prompt="blurry", **kw).images[0]
    assert np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 32)), "exactly one"),
        (dict(), "exactly one"),
        (dict(prompt_embeds=torch.zeros(1, 77, 16)), r"shape \(batch, tokens, 32\)"),
        (dict(prompt_embeds=torch.zeros(1, 70, 32)), "negative_prompt_embeds"),
        (
            dict(
                prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(2, 77, 32)
            ),
            "must match",
        ),
        (
            dict(prompt="a", negative_prompt="b", negative_prompt_embeds=torch.zeros(1, 77, 32)),
            "not both",
        ),
    ],
)
def test_bad_prompt_arguments(pipe: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        pipe.generate(steps=1, progress=False, **kwargs)
