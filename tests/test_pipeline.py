"""End-to-end parity: latentkit's images equal diffusers' for the same files, prompt and seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit

TOL = 1e-4  # max abs difference on fp32 CPU images in [0, 1]
SIZE = 32  # pixels; the tiny VAE downsamples by 2, so 16x16 latents


def diffusers_pipe(path: Path, scheduler: str | None = None) -> Any:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def reference(pipe: Any, seed: int | list[int], **kw: Any) -> np.ndarray:
    if isinstance(seed, list):
        gen: Any = [torch.Generator("cpu").manual_seed(s) for s in seed]
    else:
        gen = torch.Generator("cpu").manual_seed(seed)
    out = pipe(generator=gen, output_type="np", height=SIZE, width=SIZE, **kw).images
    return np.asarray(out)


def ours(pipe: latentkit.LatentDiffusion, seed: int | list[int], **kw: Any) -> np.ndarray:
    result = pipe.generate(
        seed=seed, output_type="np", height=SIZE, width=SIZE, progress=False, **kw
    )
    return np.stack(result.images)


@pytest.fixture(scope="module")
def sd1(sd1_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd1_path, device="cpu", dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def sd2(sd2_path: Path) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(sd2_path, device="cpu", dtype="fp32", progress=False)


@pytest.mark.parametrize(
    ("scheduler", "diffusers_scheduler"),
    [(None, None), ("ddim", "DDIMScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler")],
)
def test_sd1_matches_diffusers(
    sd1: Any, sd1_path: Path, scheduler: Any, diffusers_scheduler: Any
) -> None:
    ref = reference(
        diffusers_pipe(sd1_path, diffusers_scheduler),
        42,
        prompt="a photo of a red cat",
        num_inference_steps=6,
    )
    got = ours(sd1, 42, prompt="a photo of a red cat", steps=6, scheduler=scheduler)
    assert got.shape == ref.shape == (1, SIZE, SIZE, 3)
    assert ref.std() > 0.01  # the image is not flat, so the comparison means something
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize(
    ("scheduler", "diffusers_scheduler"),
    [
        (None, None),
        ("euler", "EulerDiscreteScheduler"),
        ("dpm-solver++", "DPMSolverMultistepScheduler"),
    ],
)
def test_sd2_matches_diffusers(
    sd2: Any, sd2_path: Path, scheduler: Any, diffusers_scheduler: Any
) -> None:
    assert sd2.scheduler.prediction_type == "v_prediction"
    ref = reference(
        diffusers_pipe(sd2_path, diffusers_scheduler),
        7,
        prompt="a photo",
        num_inference_steps=5,
        guidance_scale=5.0,
    )
    got = ours(sd2, 7, prompt="a photo", steps=5, scheduler=scheduler, guidance_scale=5.0)
    assert np.abs(got - ref).max() <= TOL


def test_batch_negative_prompt_and_rescale_match_diffusers(sd1: Any, sd1_path: Path) -> None:
    kw: dict[str, Any] = dict(
        prompt=["a cat", "a photo"], negative_prompt=["red", ""], guidance_rescale=0.7
    )
    ref = reference(
        diffusers_pipe(sd1_path), 3, num_inference_steps=4, num_images_per_prompt=2, **kw
    )
    got = ours(sd1, 3, steps=4, num_images=2, **kw)
    assert got.shape == (4, SIZE, SIZE, 3)
    assert np.abs(got - ref).max() <= TOL


def test_seed_list_gives_one_image_per_seed(sd1: Any, sd1_path: Path) -> None:
    ref = reference(
        diffusers_pipe(sd1_path),
        [5, 6],
        prompt="a cat",
        num_inference_steps=3,
        num_images_per_prompt=2,
    )
    got = ours(sd1, [5, 6], prompt="a cat", steps=3, num_images=2)
    assert np.abs(got - ref).max() <= TOL
    # Each image depends on its own seed only.
    alone = ours(sd1, [6], prompt="a cat", steps=3)
    assert np.abs(alone[0] - got[1]).max() <= 1e-5


def test_no_guidance_matches_diffusers(sd1: Any, sd1_path: Path) -> None:
    ref = reference(
        diffusers_pipe(sd1_path), 1, prompt="a cat", num_inference_steps=3, guidance_scale=1.0
    )
    got = ours(sd1, 1, prompt="a cat", steps=3, guidance_scale=1.0)
    assert np.abs(got - ref).max() <= TOL


def test_output_types(sd1: Any) -> None:
    common: dict[str, Any] = dict(seed=0, steps=2, height=SIZE, width=SIZE, progress=False)
    pil = sd1.generate("a cat", **common).images[0]
    assert pil.size == (SIZE, SIZE) and pil.mode == "RGB"
    arr = sd1.generate("a cat", output_type="np", **common).images[0]
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.float32
    assert np.array_equal(np.asarray(pil), (arr * 255).round().astype(np.uint8))
    pt = sd1.generate("a cat", output_type="pt", **common).images[0]
    assert pt.shape == (3, SIZE, SIZE) and pt.min() >= 0 and pt.max() <= 1
    lat = sd1.generate("a cat", output_type="latent", **common).images[0]
    assert lat.shape == (4, SIZE // 2, SIZE // 2)


def test_callback_sees_every_step_and_seed_is_reported(sd1: Any) -> None:
    seen: list[int] = []
    result = sd1.generate(
        "a cat",
        steps=4,
        height=SIZE,
        width=SIZE,
        progress=False,
        callback=lambda s: seen.append(s.index),
    )
    # PNDM's PLMS warm-up evaluates the first timestep twice: steps + 1 evaluations.
    assert seen == list(range(len(sd1.scheduler.timesteps(4))))
    again = sd1.generate(
        "a cat",
        steps=4,
        height=SIZE,
        width=SIZE,
        progress=False,
        seed=result.seeds[0],
        output_type="np",
    )
    first = np.asarray(result.images[0])
    assert np.array_equal(first, (again.images[0] * 255).round().astype(np.uint8))


def test_with_scheduler_carries_model_config(sd2: Any) -> None:
    swapped = sd2.with_scheduler("dpm-solver++")
    assert swapped.scheduler.prediction_type == "v_prediction"  # carried over from the model
    assert swapped.unet is sd2.unet and sd2.scheduler.name == "ddim"  # the original is unchanged
    # An object from create() keeps the options its caller set and takes the rest from the model.
    obj = latentkit.schedulers.create("euler", use_karras_sigmas=True)
    fitted = sd2.with_scheduler(obj).scheduler
    assert fitted.use_karras_sigmas and fitted.prediction_type == "v_prediction"
    assert fitted.beta_schedule == "scaled_linear" and obj.beta_schedule == "linear"
    # One built with an explicit config (or by its class) is used exactly as it is.
    exact = latentkit.schedulers.create("ddim", config={"beta_schedule": "linear"})
    assert sd2.with_scheduler(exact).scheduler is exact


def test_stochastic_ddim_object_matches_diffusers(sd1: Any, sd1_path: Path) -> None:
    """eta > 0 draws fresh noise every step from the same generator, in diffusers' order."""
    eta = latentkit.schedulers.create("ddim", eta=0.7)
    ref = reference(
        diffusers_pipe(sd1_path, "DDIMScheduler"),
        9,
        prompt="a cat",
        num_inference_steps=5,
        eta=0.7,
        num_images_per_prompt=2,
    )
    got = ours(sd1, 9, prompt="a cat", steps=5, scheduler=eta, num_images=2)
    assert np.abs(got - ref).max() <= TOL
    no_eta = ours(sd1, 9, prompt="a cat", steps=5, scheduler="ddim", num_images=2)
    assert np.abs(got - no_eta).max() > 1e-3  # the per-step noise really was drawn


def test_generate_caches_the_pipeline(sd1_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import latentkit.api as api

    calls = []
    real = api.load_pipeline

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(api, "load_pipeline", counting)
    latentkit.clear_cache()
    for _ in range(2):
        latentkit.generate(
            "a cat",
            model=sd1_path,
            steps=1,
            height=SIZE,
            width=SIZE,
            device="cpu",
            progress=False,
            seed=0,
        )
    assert len(calls) == 1
    latentkit.clear_cache()


def test_threads_share_one_pipeline(sd1: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(seed: int) -> np.ndarray:
        return ours(sd1, seed, prompt="a cat", steps=3)

    sequential = [run(s) for s in (1, 2, 3)]
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(run, (1, 2, 3)))
    for a, b in zip(sequential, parallel, strict=True):
        assert np.array_equal(a, b)


def test_bf16_on_cpu_is_close_to_fp32(sd1_path: Path, sd1: Any) -> None:
    bf16 = latentkit.load_pipeline(sd1_path, device="cpu", dtype="bf16", progress=False)
    assert bf16.unet.conv_in.weight.dtype == torch.bfloat16
    got = ours(bf16, 4, prompt="a cat", steps=4)
    ref = ours(sd1, 4, prompt="a cat", steps=4)
    assert got.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: a few percent of the [0, 1] range after 4 steps.
    assert np.abs(got - ref).max() < 0.1


def test_prompt_and_seed_change_the_image(sd1: Any) -> None:
    """Guards the parity tests: the tiny model's images depend on the text and the seed."""
    a = ours(sd1, 0, prompt="a cat", steps=3)
    assert np.abs(a - ours(sd1, 0, prompt="a red photo", steps=3)).max() > 1e-3
    assert np.abs(a - ours(sd1, 1, prompt="a cat", steps=3)).max() > 1e-3


def test_outdated_scheduler_config_is_corrected_as_diffusers_does(
    sd1_path: Path, tmp_path: Path
) -> None:
    """Older repos' configs lack steps_offset/clip_sample; diffusers' pipeline sets them to 1/False."""
    import json
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(sd1_path, folder)
    config = {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    # diffusers takes the scheduler class from model_index.json; so does latentkit.
    assert latentkit.load_pipeline(folder, device="cpu", progress=False).scheduler.name == "pndm"
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = latentkit.load_pipeline(folder, device="cpu", progress=False)
    assert pipe.scheduler.steps_offset == 1 and pipe.scheduler.clip_sample is False
    ref = reference(diffusers_pipe(folder), 2, prompt="a cat", num_inference_steps=4)
    assert np.abs(ours(pipe, 2, prompt="a cat", steps=4) - ref).max() <= TOL
