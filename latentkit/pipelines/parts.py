"""A model's parts, however they are stored: configs, tensors and tokenizers by component.

A diffusers folder (`Parts.from_files`) and a single checkpoint
(`latentkit.checkpoints.single_file.parts`) both come out as `Parts`, which
`LatentDiffusion.from_parts` builds a pipeline from; so does a family's
configs-only component. Also here: what a pipeline records of the files it was made from
(adapters, hashes) for PNG metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from latentkit import schedulers
from latentkit.conditioners.depth import DepthConditioner
from latentkit.errors import LatentkitError, MissingComponentError
from latentkit.loading import ModelFiles, read_state_dict
from latentkit.pipelines.family import Family
from latentkit.tokenizer import CLIPTokenizer

logger = logging.getLogger("latentkit")
T = TypeVar("T")

TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
"""The text encoders a model folder may have, in the order their states are concatenated."""


@dataclass(frozen=True)
class AdapterRecord:
    """A LoRA or an embedding added to a pipeline, as the PNG metadata names it."""

    kind: Literal["lora", "embedding"]
    path: Path
    hash: str
    """The first 12 hex digits of the file's sha256 (A1111's short hash), taken when the
    adapter is added: the file may be gone by the time an image is written."""
    scale: float | None = None
    token: str | None = None

    @classmethod
    def of(
        cls,
        kind: Literal["lora", "embedding"],
        path: Path,
        *,
        scale: float | None = None,
        token: str | None = None,
    ) -> AdapterRecord:
        return cls(kind, path, short_hash(path, 12), scale=scale, token=token)

    @property
    def name(self) -> str:
        """The file's name without its ending (A1111 names LoRAs and embeddings so)."""
        return self.token or self.path.stem


@dataclass(frozen=True)
class Parts:
    """A model's parts, however they are stored (a diffusers folder, a single checkpoint)."""

    name: str
    """The source as the user gave it, for messages and metadata."""
    model_index: Mapping[str, Any]
    configs: Mapping[str, Mapping[str, Any]]
    """Diffusers configs by component: ``unet``, ``vae``, ``scheduler``, each text encoder's,
    and any the family lists in ``extra_configs``."""
    encoders: tuple[str, ...]
    """The text encoder components present (``text_encoder``, ``text_encoder_2``), in order."""
    tensors: Callable[[str, torch.device, torch.dtype], Iterable[tuple[str, torch.Tensor]]]
    """A component's tensors, named as its module's parameters, streamed one at a time."""
    tokenizer: Callable[[str], CLIPTokenizer]
    """The tokenizer of a text encoder component."""
    depth: Callable[[torch.device, torch.dtype], DepthConditioner] | None = None
    """Builds the depth estimator of a depth-to-image model."""
    file: Path | None = None
    """The single checkpoint file the parts come from, if they do."""
    sources: Mapping[str, tuple[Path, ...]] = dataclasses.field(default_factory=dict)
    """Component → the files (or folder) its weights are read from, where that is not
    `file`: names the weights for caches of converted networks."""

    def source(self, component: str) -> tuple[Path, ...]:
        """The files ``component``'s weights are read from (none if unknown)."""
        return self.sources.get(component) or ((self.file,) if self.file is not None else ())

    @classmethod
    def from_files(cls, files: ModelFiles, *, family: type[Family]) -> Parts:
        """The parts of a diffusers folder (resolved by `latentkit.loading.resolve`)."""
        from latentkit.models.autoencoder import rename_legacy_key
        from latentkit.models.text_encoder import rename_checkpoint_key

        model_index = files.model_index()
        for component in ("unet", "vae", *(e for e, _ in TEXT_COMPONENTS)):
            listed = model_index.get(component)
            if isinstance(listed, list) and listed[:1] != [None] and component not in files.weights:
                raise MissingComponentError(
                    f"{files.name}: model_index.json lists {component} but its files are missing"
                )
        encoders = tuple(e for e, _ in TEXT_COMPONENTS if e in files.weights)
        folders = dict(TEXT_COMPONENTS)
        renames = {"vae": rename_legacy_key, **{e: rename_checkpoint_key for e in encoders}}

        def tensors(
            component: str, device: torch.device, dtype: torch.dtype
        ) -> Iterator[tuple[str, torch.Tensor]]:
            rename = renames.get(component, lambda k: k)
            return read_state_dict(
                files.weights[component], device=device, dtype=dtype, rename=rename
            )

        return cls(
            name=files.name,
            model_index=model_index,
            configs={c: files.config(c) for c in ("unet", "vae", *encoders, *family.extra_configs)}
            | {"scheduler": scheduler_config(files)},
            encoders=encoders,
            tensors=tensors,
            sources=files.weights,
            # latentkit's own CLIP tokenizer: the same ids as transformers', without
            # importing transformers (most of a small model's load time).
            tokenizer=lambda e: CLIPTokenizer.from_pretrained(files.root / folders[e]),
            depth=(
                (lambda device, dtype: load_depth_estimator(files, device, dtype))
                if "depth_estimator" in files.weights
                else None
            ),
        )


@functools.lru_cache(maxsize=16)
def _cached_hash(path: Path, size: int, modified: float) -> str:
    from latentkit.checkpoints.single_file import file_hash

    return file_hash(path)


def short_hash(path: Path, digits: int) -> str:
    """The first ``digits`` hex digits of a file's sha256, computed once per file version
    (its size and time of change are part of the cache key)."""
    stat = path.stat()
    return _cached_hash(path, stat.st_size, stat.st_mtime)[:digits]


def parse_config(parts: Parts, component: str, parse: Callable[[Mapping[str, Any]], T]) -> T:
    """A component's config parsed; a refusal names the model and the component."""
    try:
        return parse(parts.configs[component])
    except LatentkitError as e:
        e.args = (f"{parts.name}: {component} config: {e}", *e.args[1:])
        raise


def scheduler_config(files: ModelFiles) -> dict[str, Any]:
    """The model's scheduler config, corrected as diffusers corrects it when it loads one."""
    config = files.config("scheduler")
    # Like diffusers, the class named in model_index.json wins over the config's own.
    listed = files.model_index().get("scheduler")
    if isinstance(listed, list) and len(listed) == 2 and isinstance(listed[1], str):
        config = {**config, "_class_name": listed[1]}
    scheduler = schedulers.from_config(config)
    # diffusers' StableDiffusionPipeline corrects outdated scheduler configs when it loads
    # them (steps_offset 1, clip_sample off); so do we, so a model gives the same images.
    fixes: dict[str, Any] = {}
    if getattr(scheduler, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if getattr(scheduler, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    if fixes:
        logger.warning(
            "%s: outdated scheduler config, using %s as diffusers does", files.name, fixes
        )
        config = {**config, **fixes}
    return config


def transformers_model(
    cls: Any, files: ModelFiles, component: str, device: torch.device, dtype: torch.dtype
) -> Any:
    """A transformers model component, read from exactly the weight file `select_files`
    chose (variant, safetensors or opted-in pickle with ``weights_only``), frozen, on ``device``."""
    weights = files.weights[component]
    v = files.variant
    model = cls.from_pretrained(
        str(files.root / component),
        dtype=dtype,
        variant=v if v and any(f".{v}." in p.name for p in weights) else None,
        use_safetensors=any(p.suffix == ".safetensors" for p in weights),
        weights_only=True,
        local_files_only=True,
    ).to(device)
    model.eval().requires_grad_(False)
    return model


def load_depth_estimator(
    files: ModelFiles, device: torch.device, dtype: torch.dtype
) -> DepthConditioner:
    """The repo's DPT depth estimator and its image processor (transformers classes)."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    estimator = transformers_model(DPTForDepthEstimation, files, "depth_estimator", device, dtype)
    processor = DPTImageProcessor.from_pretrained(
        str(files.root / "feature_extractor"), local_files_only=True
    )
    return DepthConditioner(estimator=estimator, processor=processor)
