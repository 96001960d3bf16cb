"""LoRA end to end: images of a latentkit pipeline whose networks carry a LoRA equal
diffusers' after ``load_lora_weights`` (unfused, and after ``fuse_lora``), and the base
pipeline's images stay bit-identical.

`with_networks` stands in for ``pipe.with_lora``: a copy of the pipeline with other
networks, prepared by a fresh `Runtime` (the base's `Runtime` holds the base UNet).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit
from latentkit.adapters.lora import apply_lora, load_lora
from latentkit.conditioners.text import TextConditioner
from latentkit.performance import Runtime

TOL = 1e-4  # max abs difference on fp32 CPU images in [0, 1]
SIZE = 32

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2"]


def with_networks(pipe: Any, networks: dict[str, Any]) -> Any:
    """``pipe`` with its UNet and text encoders replaced by ``networks``' (same keys as
    `apply_lora` takes), prepared as the base was."""
    unet = networks.get("unet", pipe.unet)
    runtime = Runtime(pipe.performance, pipe.device)
    runtime.prepare(unet, pipe.vae)
    names = ["text_encoder", "text_encoder_2"][: len(pipe.text)]
    if len(pipe.text) == 1 and "text_encoder_2" in networks:
        names = ["text_encoder_2"]
    text = tuple(
        TextConditioner(tokenizer=t.tokenizer, text_encoder=networks.get(n, t.text_encoder))
        for n, t in zip(names, pipe.text, strict=True)
    )
    return dataclasses.replace(pipe, unet=unet, text=text, runtime=runtime)


def networks_of(pipe: Any) -> dict[str, Any]:
    names = ["text_encoder", "text_encoder_2"][: len(pipe.text)]
    return {"unet": pipe.unet, **{n: t.text_encoder for n, t in zip(names, pipe.text, strict=True)}}


def peft_lora(reference: Any, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(reference.unet)
    torch.manual_seed(11)
    config: Any = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # a trained LoRA's size: a fraction of the weights
    type(reference).save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    return folder


def images(pipe: Any, **options: Any) -> np.ndarray:
    result = pipe.generate(
        "a photo of a red cat",
        seed=3,
        steps=4,
        output_type="np",
        height=SIZE,
        width=SIZE,
        progress=False,
        **options,
    )
    return np.stack(result.images)


def reference_images(pipe: Any) -> np.ndarray:
    out = pipe(
        "a photo of a red cat",
        generator=torch.Generator("cpu").manual_seed(3),
        num_inference_steps=4,
        output_type="np",
        height=SIZE,
        width=SIZE,
    ).images
    return np.asarray(out)


def test_sd1_images_with_a_lora_match_diffusers_and_the_base_is_untouched(
    sd1_path: Path, tmp_path: Path
) -> None:
    import diffusers as _diffusers

    diffusers: Any = _diffusers  # untyped

    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd1_path), safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    source = peft_lora(reference, tmp_path)
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False)
    base_before = images(pipe)
    reference.load_lora_weights(str(source))
    expected = reference_images(reference)
    for fuse in (False, True):
        adapted = pipe.with_lora(source, fuse=fuse)
        got = images(adapted)
        assert np.abs(got - base_before).max() > 0.01  # the LoRA shows in the image
        assert np.abs(got - expected).max() <= TOL, fuse
        if not fuse:
            reference.fuse_lora()
            expected = reference_images(reference)
    assert np.array_equal(images(pipe), base_before)  # bit-identical


@pytest.mark.parametrize("scale", [0.5])
def test_sdxl_images_with_a_lora_match_diffusers(
    sdxl_path: Path, tmp_path: Path, scale: float
) -> None:
    import diffusers as _diffusers

    diffusers: Any = _diffusers  # untyped

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_path))
    reference.set_progress_bar_config(disable=True)
    source = peft_lora(reference, tmp_path)
    reference.load_lora_weights(str(source))
    reference.set_adapters(["default_0"], adapter_weights=[scale])
    expected = reference_images(reference)
    pipe = latentkit.load_pipeline(sdxl_path, device="cpu", dtype="fp32", progress=False)
    adapted = pipe.with_lora(source, scale=scale)
    assert np.abs(images(adapted) - expected).max() <= TOL
    assert adapted.adapters[0].kind == "lora" and adapted.adapters[0].scale == scale
    assert len(adapted.adapters[0].hash) == 12


def test_with_lora_chains_and_equals_applying_both(sd1_path: Path, tmp_path: Path) -> None:
    import diffusers as _diffusers

    diffusers: Any = _diffusers
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd1_path), safety_checker=None
    )
    first = peft_lora(reference, tmp_path / "a")
    second = peft_lora(reference, tmp_path / "b")
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False)
    chained = pipe.with_lora(first, scale=0.8).with_lora(second, scale=0.5)
    both = with_networks(
        pipe,
        apply_lora(
            networks_of(pipe),
            [
                load_lora(first, modules=networks_of(pipe)),
                load_lora(second, modules=networks_of(pipe)),
            ],
            scale=[0.8, 0.5],
        ),
    )
    assert np.abs(images(chained) - images(both)).max() <= 1e-6
    assert [a.scale for a in chained.adapters] == [0.8, 0.5]
