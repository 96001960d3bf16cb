"""Textual inversion end to end: a latentkit pipeline whose tokenizer and text encoder carry
an embedding makes diffusers' images after ``load_textual_inversion`` (single- and
multi-vector), and the base's images stay bit-identical. The pipeline copy stands in for
``pipe.with_embedding``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import latentkit

TOL = 1e-4  # max abs difference on fp32 CPU images in [0, 1]
SIZE = 32


def images(pipe: Any, prompt: str) -> np.ndarray:
    result = pipe.generate(
        prompt, seed=5, steps=4, output_type="np", height=SIZE, width=SIZE, progress=False
    )
    return np.stack(result.images)


@pytest.mark.parametrize("vectors", [1, 3])
def test_sd1_images_with_an_embedding_match_diffusers(
    sd1_path: Path, tmp_path: Path, vectors: int
) -> None:
    import diffusers as _diffusers

    diffusers: Any = _diffusers  # untyped

    embedding = torch.randn(vectors, 32, generator=torch.Generator().manual_seed(9)) * 2
    save_file({"<cat-toy>": embedding}, str(tmp_path / "learned_embeds.safetensors"))
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd1_path), safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    reference.load_textual_inversion(str(tmp_path))
    prompt = "a <cat-toy> photo"
    expected = np.asarray(
        reference(
            prompt,
            generator=torch.Generator("cpu").manual_seed(5),
            num_inference_steps=4,
            output_type="np",
            height=SIZE,
            width=SIZE,
        ).images
    )
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False)
    base_before = images(pipe, prompt)
    adapted = pipe.with_embedding(tmp_path)
    assert adapted.adapters[-1].kind == "embedding"
    got = images(adapted, prompt)
    assert np.abs(got - base_before).max() > 0.01  # the embedding shows in the image
    assert np.abs(got - expected).max() <= TOL
    assert np.array_equal(images(pipe, prompt), base_before)
