"""The two entry points: `load_pipeline` and `generate`."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from latentkit.devices import resolve_device, resolve_dtype
from latentkit.errors import InvalidArgumentError
from latentkit.images import ImageInput
from latentkit.performance import Performance, Runtime
from latentkit.pipeline import StableDiffusion
from latentkit.protocols import Callback, Scheduler, Seeds
from latentkit.results import GenerationResult, OutputType

DEFAULT_MODEL = "latentkit/shapes"
"""The built-in shapes model: it ships inside the package, so the default works offline."""


def load_pipeline(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    variant: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    performance: Performance | None = None,
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x/2.x model from a Hub repo id or a local diffusers folder.

    Only the files the pipeline uses are downloaded (configs, tokenizer, one weight file per
    component of ``variant``, e.g. ``"fp16"``); the Hub cache, ``HF_HUB_OFFLINE=1`` and
    ``revision`` pinning work as in huggingface_hub. Pickle weights are refused unless
    ``allow_pickle=True``. ``performance`` picks how the networks run (fused attention,
    channels-last, bf16 autocast, compilation, tiling, offloading; see
    `latentkit.Performance`); the default is the eager path (q/k/v projections fused on CUDA only).

    Example:
        >>> pipe = latentkit.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")  # doctest: +SKIP
        >>> pipe.generate("a photo of a cat", seed=42).images[0].save("cat.png")  # doctest: +SKIP
    """
    from latentkit.loading import resolve

    # Check the cheap arguments before touching the network or the disk.
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if performance is not None and not isinstance(performance, Performance):
        raise InvalidArgumentError(
            f"performance must be a latentkit.Performance, not {type(performance).__name__}"
        )
    Runtime(performance or Performance(), dev).check()
    files = resolve(
        source,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        allow_pickle=allow_pickle,
        progress=progress,
    )
    return StableDiffusion.from_files(
        files, device=dev, dtype=dt, progress=progress, performance=performance
    )


_cache_lock = threading.Lock()
_cache: dict[tuple[Any, ...], StableDiffusion] = {}


def _cached_pipeline(
    model: str | os.PathLike[str],
    device: str | torch.device,
    dtype: str | torch.dtype,
    progress: bool,
    performance: Performance | None,
) -> StableDiffusion:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = os.fspath(model)
    key = (
        os.path.abspath(source) if os.path.isdir(source) else source,
        str(dev),
        dt,
        performance or Performance(),
    )
    with _cache_lock:
        if key not in _cache:
            # Keep one model: Stable Diffusion weights take gigabytes.
            _cache.clear()
            _cache[key] = load_pipeline(
                source, device=dev, dtype=dt, progress=progress, performance=performance
            )
        return _cache[key]


def clear_cache() -> None:
    """Forget the pipeline `generate` keeps loaded between calls."""
    with _cache_lock:
        _cache.clear()


def generate(
    prompt: str | Sequence[str] | None = None,
    *,
    model: str | os.PathLike[str] | StableDiffusion = DEFAULT_MODEL,
    negative_prompt: str | Sequence[str] | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    scheduler: str | Scheduler | None = None,
    seed: Seeds = None,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
    output_type: OutputType = "pil",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    callback: Callback | None = None,
    progress: bool = True,
    clip_skip: int | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    image: ImageInput | None = None,
    mask_image: ImageInput | None = None,
    strength: float | None = None,
    depth_map: ImageInput | None = None,
    performance: Performance | None = None,
) -> GenerationResult:
    """Generate images from a text prompt in one call.

    Args:
        prompt: A prompt, or a list of prompts (``num_images`` images each).
        model: A Hub repo id, a local diffusers folder, or a loaded pipeline. The loaded
            model is kept, so repeated calls with the same model do not reload it.
        negative_prompt: What to steer away from (the unconditional branch of guidance).
        steps: Number of denoising steps; ``None``: the model's recommended number
            (20 for the built-in shapes model), else 50.
        guidance_scale: Classifier-free guidance weight; ≤ 1 turns guidance off. ``None``:
            the model's recommended scale, else 7.5 (Stable Diffusion's usual value).
        guidance_rescale: Rescale factor φ of Lin et al. 2024 (0 = off).
        scheduler: A scheduler name (see ``latentkit.schedulers.names()``) or object;
            ``None`` uses the model's own.
        seed: An int (one CPU generator for the batch, exactly as diffusers'
            ``torch.Generator("cpu").manual_seed(seed)``), a list with one seed per image,
            or ``None`` for a fresh random seed (reported in ``result.parameters``).
        height: Image height in pixels, a multiple of the autoencoder factor (8); ``None``: the model's size.
        width: Image width in pixels, likewise.
        num_images: Images per prompt.
        output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        device: ``"auto"`` (CUDA, then MPS, then CPU), or a device.
        dtype: ``"auto"`` (fp16 on GPUs, fp32 on CPU), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        callback: Called with a `latentkit.SamplerStep` after every step.
        progress: Show progress bars on stderr.
        clip_skip: Condition on the text encoder's hidden states this many layers before
            the last (1 = the penultimate layer, as in A1111 and diffusers).
        prompt_embeds: Precomputed text embeddings (batch, tokens, width) instead of ``prompt``.
        negative_prompt_embeds: Precomputed embeddings for the negative prompt, same shape.
        image: Start from this picture (image-to-image; with ``mask_image``, inpainting): a
            PIL image, an array (H, W, 3) or tensor (3, H, W) in [0, 1], or a file path. The
            output has its size (or ``height``/``width``), rounded down to a multiple of 8.
        mask_image: Where to repaint (white) and what to keep (black); resized to the image.
            Inpainting models (9 input channels) read it as input; any other model
            repaints by blending the kept region back after every step.
        strength: How much of the schedule runs, in [0, 1]: 1 starts from pure noise, small
            values stay close to ``image``. Default 0.8 for image-to-image, 1.0 for inpainting.
        depth_map: For depth-to-image models (5 input channels): the depth to follow, as a
            grey image, an array or a tensor (H, W); without it, the model's own depth
            estimator reads ``image``.
        performance: Speed and memory options for loading ``model`` (see
            `latentkit.Performance`); part of the key of the kept pipeline.

    Prompts longer than the text encoder's 77-token window are encoded in chunks and the
    chunks concatenated, never cut; ``(word:1.3)``, ``(word)`` and ``[word]`` weight words as
    in A1111 (see the text conditioner docs).

    Example:
        >>> result = latentkit.generate("a photo of a cat", scheduler="dpm-solver++", steps=25, seed=42)  # doctest: +SKIP
        >>> result.images[0].save("cat.png")  # doctest: +SKIP
    """
    if isinstance(model, StableDiffusion):
        if device != "auto" or dtype != "auto" or performance is not None:
            raise InvalidArgumentError(
                "device, dtype and performance are fixed when a pipeline is loaded: pass "
                "them to load_pipeline, not with model=<pipeline>"
            )
        pipe = model
    else:
        pipe = _cached_pipeline(model, device, dtype, progress, performance)
    return pipe.generate(
        prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        scheduler=scheduler,
        seed=seed,
        height=height,
        width=width,
        num_images=num_images,
        output_type=output_type,
        callback=callback,
        progress=progress,
        clip_skip=clip_skip,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        image=image,
        mask_image=mask_image,
        strength=strength,
        depth_map=depth_map,
    )
