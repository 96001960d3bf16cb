"""The two entry points: `load_pipeline` and `generate`."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from latentkit.devices import resolve_device, resolve_dtype
from latentkit.errors import InvalidArgumentError
from latentkit.performance import Performance, Runtime
from latentkit.pipelines import LatentDiffusion, detect
from latentkit.request import Request
from latentkit.results import GenerationResult

DEFAULT_MODEL = "latentkit/shapes"
"""The built-in shapes model: it ships inside the package, so the default works offline."""


def load_pipeline(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    variant: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    torch_dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    performance: Performance | None = None,
) -> LatentDiffusion:
    """Load a model of any registered family (SD 1.x/2.x, SDXL, ...) from a Hub repo id or a
    local diffusers folder.

    The family is read from ``model_index.json``'s ``_class_name`` and, where that is
    ambiguous, from the UNet config (`latentkit.pipelines.detect`); ``pipe.family`` names it.

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

    # Check the cheap arguments before touching the network or the disk. Flags are real
    # bools: allow_pickle="false" is a truthy string that must not opt into pickle.
    for flag, value in (
        ("local_files_only", local_files_only),
        ("allow_pickle", allow_pickle),
        ("progress", progress),
    ):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{flag} must be True or False, got {value!r}")
    if not isinstance(source, (str, os.PathLike)) or isinstance(source, bytes):
        raise InvalidArgumentError(
            f"source must be a Hub repo id or a path (str or os.PathLike), not {type(source).__name__}"
        )
    if token is not None and not isinstance(token, (str, bool)):
        raise InvalidArgumentError(
            f"token must be a string, a bool or None, not {type(token).__name__}"
        )
    if torch_dtype is not None:
        # diffusers' name for it, so code moved from diffusers keeps working.
        if dtype != "auto":
            raise InvalidArgumentError("pass dtype or torch_dtype (an alias of dtype), not both")
        dtype = torch_dtype
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
    family = detect(files.model_index(), files.config("unet"), source=files.name)
    return LatentDiffusion.from_files(
        files, family=family, device=dev, dtype=dt, progress=progress, performance=performance
    )


_cache_lock = threading.Lock()
_cache: dict[tuple[Any, ...], LatentDiffusion] = {}


def _cached_pipeline(
    model: str | os.PathLike[str],
    device: str | torch.device,
    dtype: str | torch.dtype,
    progress: bool,
    performance: Performance | None,
) -> LatentDiffusion:
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
    model: str | os.PathLike[str] | LatentDiffusion = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    performance: Performance | None = None,
    **options: Any,
) -> GenerationResult:
    """Generate images from a text prompt in one call.

    The keywords besides ``model``, ``device``, ``dtype`` and ``performance`` are those of
    `latentkit.request.Request`, declared and checked there once; an unknown one is an
    `InvalidArgumentError` that names the closest valid ones.

    Args:
        prompt: A prompt, or a list of prompts (``num_images`` images each).
        model: A Hub repo id, a local diffusers folder, or a loaded pipeline. The loaded
            model is kept, so repeated calls with the same model do not reload it.
        device: ``"auto"`` (CUDA, then MPS, then CPU), or a device.
        dtype: ``"auto"`` (fp16 on GPUs, fp32 on CPU), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        performance: Speed and memory options for loading ``model`` (see
            `latentkit.Performance`); part of the key of the kept pipeline.
        **options: `latentkit.request.Request`'s keywords: ``negative_prompt``, ``steps``,
            ``guidance_scale``, ``scheduler``, ``seed``, ``height``, ``width``,
            ``num_images``, ``output_type``, ``image``, ``mask_image``, ``strength``, SDXL's
            ``prompt_2`` and micro-conditioning, ``denoising_start``/``denoising_end``, ...

    Prompts longer than the text encoder's 77-token window are encoded in chunks and the
    chunks concatenated, never cut; ``(word:1.3)``, ``(word)`` and ``[word]`` weight words as
    in A1111 (see the text conditioner docs).

    Example:
        >>> result = latentkit.generate("a photo of a cat", scheduler="dpm-solver++", steps=25, seed=42)  # doctest: +SKIP
        >>> result.images[0].save("cat.png")  # doctest: +SKIP
    """
    # Every keyword is checked before a model is loaded.
    request = Request.create(prompt, **options)
    if isinstance(model, LatentDiffusion):
        if device != "auto" or dtype != "auto" or performance is not None:
            raise InvalidArgumentError(
                "device, dtype and performance are fixed when a pipeline is loaded: pass "
                "them to load_pipeline, not with model=<pipeline>"
            )
        pipe = model
    else:
        pipe = _cached_pipeline(model, device, dtype, request.progress, performance)
    return pipe.run(request)
