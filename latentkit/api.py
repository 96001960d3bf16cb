"""The two entry points: `load_pipeline` and `generate`."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from latentkit import pipelines
from latentkit.checkpoints import single_file
from latentkit.devices import resolve_device, resolve_dtype
from latentkit.errors import InvalidArgumentError, ModelNotFoundError
from latentkit.performance import Performance, Runtime
from latentkit.pipelines import LatentDiffusion, detect
from latentkit.pipelines.parts import Parts
from latentkit.protocols import PredictionType
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
    filename: str | None = None,
    prediction_type: PredictionType | None = None,
    vae: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
) -> LatentDiffusion:
    """Load a model of any registered family (SD 1.x/2.x, SDXL, ...) from a Hub repo id, a
    local diffusers folder, or a single checkpoint file.

    A single file (``model.safetensors`` in the original CompVis/A1111 layout, local, or on the
    Hub as ``"org/repo/file.safetensors"`` or ``source="org/repo", filename=...``) is
    recognised by its tensors (`latentkit.checkpoints`): SD 1.x, SD 2.x, SDXL base or refiner,
    text-to-image, inpainting or depth; ``prediction_type`` says what the tensors cannot
    (SD 2.x files default to ``"v_prediction"``, as diffusers' default config for them).
    ``config`` (a local diffusers folder) gives a single file its configs and tokenizers
    instead of the published ones. ``vae`` swaps the autoencoder: a diffusers VAE folder or
    Hub repo (an ``AutoencoderKL``, or TAESD's ``AutoencoderTiny`` such as
    ``madebyollin/taesd``, a fast decoder), or a single VAE file.

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
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise InvalidArgumentError(
            f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
        )
    if filename is not None or single_file.is_single_file(source):
        path = _file(
            source,
            filename,
            allow_pickle=allow_pickle,
            what="checkpoint",
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        folder = None if config is None else Path(config).expanduser()
        if folder is not None and not (folder / "model_index.json").is_file():
            raise InvalidArgumentError(f"config must be a diffusers folder; {folder} is not one")
        parts, name = single_file.parts(
            path,
            name=os.fspath(source),
            allow_pickle=allow_pickle,
            prediction_type=prediction_type,
            config=folder,
        )
        family = pipelines.registry[name]
    else:
        files = resolve(
            source,
            revision=revision,
            variant=variant,
            allow_pickle=allow_pickle,
            progress=progress,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        family = detect(files.model_index(), files.config("unet"), source=files.name)
        parts = Parts.from_files(files, family=family)
        if prediction_type is not None:
            scheduler = {**parts.configs["scheduler"], "prediction_type": prediction_type}
            parts = dataclasses.replace(parts, configs={**parts.configs, "scheduler": scheduler})
    if vae is not None:
        parts = _with_vae(
            parts,
            vae,
            allow_pickle=allow_pickle,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
    return LatentDiffusion.from_parts(
        parts, family=family, device=dev, dtype=dt, progress=progress, performance=performance
    )


def _file(
    source: str | os.PathLike[str],
    filename: str | None,
    *,
    allow_pickle: bool,
    what: str,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
) -> Path:
    """The local path of a single file: ``source`` itself, ``source/filename`` (a folder or a
    Hub repo), or ``org/repo/file`` on the Hub (downloaded, or found in the cache)."""
    from latentkit.adapters.common import find_adapter_file

    name = os.fspath(source)
    if filename is None and not Path(name).expanduser().exists() and name.count("/") >= 2:
        repo, _, filename = name.partition("/")[2].partition("/")
        name, filename = f"{name.split('/')[0]}/{repo}", filename
    return find_adapter_file(
        name,
        weight_name=filename,
        default_names=(),
        allow_pickle=allow_pickle,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        what=what,
    )


def _with_vae(
    parts: Parts,
    vae: str | os.PathLike[str],
    *,
    allow_pickle: bool,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
) -> Parts:
    """``parts`` with the autoencoder at ``vae`` (folder, Hub repo or single file)."""
    if not isinstance(vae, (str, os.PathLike)):
        raise InvalidArgumentError(f"vae must be a path or a Hub repo id, not {type(vae).__name__}")
    name = os.fspath(vae)
    path = Path(name).expanduser()
    if not path.exists() and not single_file.is_single_file(name) and name.count("/") == 1:
        from huggingface_hub import constants, snapshot_download

        try:
            path = Path(
                snapshot_download(
                    name,
                    allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"],
                    cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                    local_files_only=local_files_only or constants.HF_HUB_OFFLINE,
                    token=token,
                )
            )
        except Exception as e:  # offline and not cached, not on the Hub, refused
            raise ModelNotFoundError(
                f"vae {name}: cannot get it from the Hub or the cache ({e})"
            ) from e
    elif not path.is_dir():
        path = _file(
            name,
            None,
            allow_pickle=allow_pickle,
            what="vae",
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
    config, tensors = single_file.vae_override(
        path, config=parts.configs["vae"], allow_pickle=allow_pickle
    )
    base = parts.tensors

    def swapped(
        component: str, device: torch.device, dtype: torch.dtype
    ) -> Iterable[tuple[str, torch.Tensor]]:
        chosen: Iterable[tuple[str, torch.Tensor]] = (
            tensors(component, device, dtype)
            if component == "vae"
            else base(component, device, dtype)
        )
        return chosen

    return dataclasses.replace(
        parts,
        configs={**parts.configs, "vae": config},
        tensors=swapped,
        sources={**parts.sources, "vae": (path,)},
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
