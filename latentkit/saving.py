"""Writing a pipeline folder in the diffusers layout, the inverse of `latentkit.load_pipeline`.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json``;
``unet/`` and ``vae/`` with ``config.json`` and ``diffusion_pytorch_model.safetensors``;
``text_encoder/`` with the ``config.json`` and ``model.safetensors`` of a transformers
``CLIPTextModel``; ``tokenizer/`` written by the tokenizer's ``save_pretrained`` (latentkit's
`CLIPTokenizer` writes the Hub's ``vocab.json`` / ``merges.txt`` layout); and
``scheduler/scheduler_config.json``. latentkit and diffusers both load it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentkit.errors import InvalidArgumentError
from latentkit.models.autoencoder import AutoencoderKL
from latentkit.models.controlnet import ControlNet
from latentkit.models.text_encoder import CLIPTextEncoder
from latentkit.models.unet import UNet2DCondition
from latentkit.protocols import Scheduler
from latentkit.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    import transformers
    from transformers import CLIPTextModel

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The subfolders `save_pipeline` writes (and, with ``overwrite=True``, replaces)."""

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS_NAME = "model.safetensors"
"""transformers' name for a model's weights."""


def model_index(
    *,
    text_encoder: CLIPTextEncoder | CLIPTextModel,
    tokenizer: CLIPTokenizer | transformers.CLIPTokenizer,
    scheduler: Scheduler,
) -> dict[str, Any]:
    """The ``model_index.json`` of a text-to-image pipeline: each component's library and
    class, and no safety checker or feature extractor. latentkit's `CLIPTextEncoder` and
    `CLIPTokenizer` are listed as the transformers classes that read their files,
    ``CLIPTextModel`` and ``CLIPTokenizer``."""
    text_class = (
        "CLIPTextModel"
        if isinstance(text_encoder, CLIPTextEncoder)
        else type(text_encoder).__name__
    )
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler.to_config()["_class_name"]],
        "text_encoder": ["transformers", text_class],
        "tokenizer": [
            "transformers",
            "CLIPTokenizer" if isinstance(tokenizer, CLIPTokenizer) else type(tokenizer).__name__,
        ],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_pipeline(
    folder: str | os.PathLike[str],
    *,
    unet: UNet2DCondition,
    vae: AutoencoderKL,
    text_encoder: CLIPTextEncoder | CLIPTextModel,
    tokenizer: CLIPTokenizer | transformers.CLIPTokenizer,
    scheduler: Scheduler,
    overwrite: bool = False,
    generation_defaults: dict[str, float] | None = None,
) -> Path:
    """Write a Stable Diffusion pipeline to ``folder`` in the diffusers layout; returns its path.

    ``text_encoder`` is latentkit's `CLIPTextEncoder` (what `load_pipeline` builds) or a
    transformers ``CLIPTextModel``; either is written in transformers' layout. ``tokenizer``
    is latentkit's `CLIPTokenizer` or transformers'. Weights are
    written as safetensors in their current dtype. An existing non-empty
    ``folder`` is refused with `InvalidArgumentError` unless ``overwrite=True``, which
    replaces ``model_index.json`` and the component subfolders (`COMPONENTS`) and leaves any
    other file there alone. ``generation_defaults`` (``steps``, ``guidance_scale``) are the
    settings this model is meant to be sampled with; they are written to ``model_index.json``
    under ``_latentkit_defaults`` (diffusers ignores keys that start with ``_``) and used by
    `StableDiffusion.generate` when the caller leaves those keywords out.

    Example:
        >>> save_pipeline("my-model", unet=unet, vae=vae, text_encoder=text_encoder,
        ...               tokenizer=tokenizer, scheduler=scheduler)  # doctest: +SKIP
        >>> latentkit.load_pipeline("my-model").generate("a red circle")  # doctest: +SKIP
    """
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(f"{root} is a file; give a folder to write the pipeline to")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise InvalidArgumentError(
                f"{root} exists and is not empty; pass overwrite=True to replace the pipeline "
                "files in it, or choose a new folder"
            )
        for name in COMPONENTS:
            if (root / name).is_dir():
                shutil.rmtree(root / name)
        (root / "model_index.json").unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)

    _save_model(root / "unet", unet.config.to_dict(), unet)
    _save_model(root / "vae", vae.config.to_dict(), vae)
    if isinstance(text_encoder, CLIPTextEncoder):
        _save_model(
            root / "text_encoder",
            text_encoder.config.to_dict(),
            text_encoder,
            TEXT_ENCODER_WEIGHTS_NAME,
        )
    else:
        text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler_config(scheduler))
    index = model_index(text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if generation_defaults:
        index[DEFAULTS_KEY] = check_generation_defaults(generation_defaults)
    # Written last: a folder without it is not a pipeline, so an interrupted save is not loaded.
    _write_json(root / "model_index.json", index)
    return root


def save_controlnet(
    folder: str | os.PathLike[str], controlnet: ControlNet, *, overwrite: bool = False
) -> Path:
    """Write ``controlnet`` to ``folder`` in the layout of diffusers' ``ControlNetModel``
    (``config.json`` and ``diffusion_pytorch_model.safetensors``, weights in their current
    dtype); returns its path. `LatentDiffusion.with_controlnet` and diffusers'
    ``ControlNetModel.from_pretrained`` read it. An existing non-empty ``folder`` is refused
    with `InvalidArgumentError` unless ``overwrite=True``, which replaces those two files.

    Example:
        >>> save_controlnet("my-controlnet", controlnet)  # doctest: +SKIP
        >>> pipe = pipe.with_controlnet("my-controlnet")  # doctest: +SKIP
    """
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(f"{root} is a file; give a folder to write the ControlNet to")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise InvalidArgumentError(
            f"{root} exists and is not empty; pass overwrite=True to replace the ControlNet "
            "files in it, or choose a new folder"
        )
    _save_model(root, controlnet.control_config.to_dict(), controlnet)
    return root


LATENT_SCHEDULER_FIELDS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}
"""Fields Stable Diffusion's scheduler configs carry for the *other* schedulers a user may swap
in (diffusers' ``from_config`` and `latentkit.schedulers.create(config=)` read them). Without
``clip_sample=False``, DDIM made from a DPM-Solver config would clip unit-variance latents
to [-1, 1]."""


def scheduler_config(scheduler: Scheduler) -> dict[str, Any]:
    """``scheduler``'s config plus `LATENT_SCHEDULER_FIELDS` where it does not set them."""
    return {**LATENT_SCHEDULER_FIELDS, **scheduler.to_config()}


DEFAULTS_KEY = "_latentkit_defaults"
"""The ``model_index.json`` key holding a model's recommended ``steps`` / ``guidance_scale``."""


def check_generation_defaults(defaults: Any) -> dict[str, float]:
    """``defaults`` checked: only ``steps`` (an int >= 1) and ``guidance_scale`` (>= 0)."""
    if not isinstance(defaults, dict):
        raise InvalidArgumentError(f"{DEFAULTS_KEY} must be a mapping, got {defaults!r}")
    unknown = set(defaults) - {"steps", "guidance_scale"}
    if unknown:
        raise InvalidArgumentError(f"{DEFAULTS_KEY}: unknown keys {sorted(unknown)}")
    steps, scale = defaults.get("steps"), defaults.get("guidance_scale")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InvalidArgumentError(f"{DEFAULTS_KEY}: steps must be an int >= 1, got {steps!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 0
    ):
        raise InvalidArgumentError(
            f"{DEFAULTS_KEY}: guidance_scale must be a number >= 0, got {scale!r}"
        )
    return dict(defaults)


def _save_model(
    folder: Path, config: dict[str, Any], module: torch.nn.Module, weights: str = WEIGHTS_NAME
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config)
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    # transformers 4 refuses safetensors files without the "format" metadata.
    save_file(state, str(folder / weights), metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
