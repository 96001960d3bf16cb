"""Writing a pipeline folder in the diffusers layout, the inverse of `latentkit.load_pipeline`.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json``;
``unet/`` and ``vae/`` with ``config.json`` and ``diffusion_pytorch_model.safetensors``;
``text_encoder/`` and ``tokenizer/`` written by transformers' ``save_pretrained``; and
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
from latentkit.models.unet import UNet2DCondition
from latentkit.protocols import Scheduler

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The subfolders `save_pipeline` writes (and, with ``overwrite=True``, replaces)."""

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def model_index(
    *, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler: Scheduler
) -> dict[str, Any]:
    """The ``model_index.json`` of a text-to-image pipeline: each component's library and
    class, and no safety checker or feature extractor."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler.to_config()["_class_name"]],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_pipeline(
    folder: str | os.PathLike[str],
    *,
    unet: UNet2DCondition,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: Scheduler,
    overwrite: bool = False,
) -> Path:
    """Write a Stable Diffusion pipeline to ``folder`` in the diffusers layout; returns its path.

    Weights are written as safetensors in their current dtype. An existing non-empty
    ``folder`` is refused with `InvalidArgumentError` unless ``overwrite=True``, which
    replaces ``model_index.json`` and the component subfolders (`COMPONENTS`) and leaves any
    other file there alone.

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
    text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler.to_config())
    # Written last: a folder without it is not a pipeline, so an interrupted save is not loaded.
    _write_json(
        root / "model_index.json",
        model_index(text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler),
    )
    return root


def _save_model(folder: Path, config: dict[str, Any], module: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config)
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
