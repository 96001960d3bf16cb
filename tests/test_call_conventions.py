"""The call options users bring from diffusers (issue 18): ``generator=``, ``latents=``,
batched ``np``/``pt`` outputs, a callback that replaces the latents, ``prompt_syntax``,
``torch_dtype=`` — each against diffusers where diffusers has it (≤ 1e-4 on fp32 images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit

TOL = 1e-4
SIZE = 32


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(sd1_path: Path) -> Any:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd1_path), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def common() -> dict[str, Any]:
    return dict(height=SIZE, width=SIZE, output_type="np")


def test_generator_lists_and_latents_match_diffusers(sd1: Any, reference: Any) -> None:
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    expected = reference(
        "a cat", num_inference_steps=3, generator=gens, num_images_per_prompt=2, **common()
    ).images
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    got = sd1.generate("a cat", steps=3, generator=gens, num_images=2, progress=False, **common())
    assert isinstance(got.images, np.ndarray) and got.images.shape == (2, SIZE, SIZE, 3)
    assert np.abs(got.images - expected).max() <= TOL
    assert got.seeds == [3, 4]  # the generators' initial seeds are recorded

    noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(9))
    expected = reference("a cat", num_inference_steps=3, latents=noise.clone(), **common()).images
    got = sd1.generate("a cat", steps=3, latents=noise.clone(), progress=False, **common())
    assert np.abs(got.images - expected).max() <= TOL


def test_pt_and_latent_outputs_are_batched(sd1: Any, reference: Any) -> None:
    kw = dict(height=SIZE, width=SIZE, num_images=2, steps=2, seed=1, progress=False)
    pt = sd1.generate("a cat", output_type="pt", **kw).images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, SIZE, SIZE)
    latents = sd1.generate("a cat", output_type="latent", **kw).images
    assert isinstance(latents, torch.Tensor) and latents.shape == (2, 4, SIZE // 2, SIZE // 2)
    expected = reference(
        "a cat",
        num_inference_steps=2,
        num_images_per_prompt=2,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).images
    assert (pt - expected).abs().max() <= TOL


def test_callback_may_replace_the_latents_as_diffusers(sd1: Any, reference: Any) -> None:
    def halve_theirs(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"latents": kwargs["latents"] * 0.5} if i == 0 else {}

    expected = reference(
        "a cat",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(2),
        callback_on_step_end=halve_theirs,
        **common(),
    ).images

    def halve_ours(step: latentkit.SamplerStep) -> torch.Tensor | None:
        return step.sample * 0.5 if step.index == 0 else None

    got = sd1.generate("a cat", steps=3, seed=2, callback=halve_ours, progress=False, **common())
    assert np.abs(got.images - expected).max() <= TOL
    with pytest.raises(latentkit.InvalidArgumentError, match="callback returned latents"):
        sd1.generate("a cat", steps=2, callback=lambda s: torch.zeros(1), progress=False)


def test_plain_prompt_syntax_reads_brackets_as_text(sd1: Any) -> None:
    text = sd1.text[0]
    weighted = text.tokenize(["a (red:1.5) cat"])
    plain = text.tokenize(["a (red:1.5) cat"], syntax="plain")
    assert torch.all(plain.weights == 1) and not torch.all(weighted.weights == 1)
    assert plain.ids.ne(weighted.ids).any()  # the brackets are tokens now
    a = sd1.generate(
        "a (red:1.5) cat", steps=2, seed=1, progress=False, prompt_syntax="plain", **common()
    )
    b = sd1.generate("a (red:1.5) cat", steps=2, seed=1, progress=False, **common())
    assert np.abs(a.images - b.images).max() > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(generator=7), "generator must be"),
        (dict(generator=torch.Generator(), seed=1), "seed or generator"),
        (dict(latents=torch.zeros(1, 4, 3, 3)), r"latents must have shape \(1, 4, 16, 16\)"),
        (dict(latents=torch.zeros(4, 3)), "latents must be a float tensor"),
        (dict(prompt_syntax="comfy"), "prompt_syntax"),
    ],
)
def test_bad_call_options(sd1: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        sd1.generate("a cat", steps=2, height=SIZE, width=SIZE, progress=False, **kwargs)


def test_torch_dtype_alias(sd1_path: Path) -> None:
    pipe = latentkit.load_pipeline(sd1_path, torch_dtype=torch.bfloat16, progress=False)
    assert pipe.dtype == torch.bfloat16
    with pytest.raises(latentkit.InvalidArgumentError, match="dtype or torch_dtype"):
        latentkit.load_pipeline(sd1_path, dtype="fp32", torch_dtype=torch.float32)
