"""Single-file checkpoints (``model.safetensors`` in the original CompVis / sgm / A1111 layout).

The family and configuration are read off the tensors (`latentkit.checkpoints.keys.detect_layout`:
key prefixes and shapes); the configs are the published ones (`latentkit.checkpoints.configs`)
with the detected UNet input channels; the keys are converted by the one key map
(`latentkit.checkpoints.keys.convert`) while they stream from the memory-mapped file, so no
second copy of the weights is made. Pickle (``.ckpt``) only with ``allow_pickle=True``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from latentkit.checkpoints.configs import FAMILIES, clip_tokenizer
from latentkit.checkpoints.keys import (
    UNET_PREFIX,
    VAE_PREFIX,
    DetectedLayout,
    Family,
    OpenCLIPLayout,
    UNetLayout,
    VAELayout,
    checkpoint_layout,
    convert,
    detect_layout,
)
from latentkit.errors import (
    PickleWeightsError,
    UnsupportedModelError,
    WeightMismatchError,
)
from latentkit.loading import _convert
from latentkit.protocols import PredictionType
from latentkit.readers import read_json_object
from latentkit.tokenizer import CLIPTokenizer

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names → torch dtypes."""

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""File endings of single-file checkpoints; all but safetensors are pickle."""

FAMILY_NAMES: dict[Family, str] = {
    "sd1": "stable-diffusion",
    "sd2": "stable-diffusion",
    "sdxl-base": "stable-diffusion-xl",
    "sdxl-refiner": "stable-diffusion-xl",
}
"""The pipeline family each checkpoint family loads as."""


class Checkpoint(Mapping[str, torch.Tensor]):
    """The tensors of a single file by name, read lazily (one at a time, memory-mapped)."""

    def __init__(self, path: Path, *, allow_pickle: bool) -> None:
        self.path = path
        self._pickled: dict[str, torch.Tensor] | None = None
        self._map: Any = None
        if path.suffix == ".safetensors":
            from latentkit.readers import safetensors_header

            self._header = safetensors_header(path)
            self.shapes: dict[str, tuple[int, ...]] = {
                k: tuple(v.shape) for k, v in self._header.items()
            }
            with open(path, "rb") as f:
                self._data_start = 8 + int.from_bytes(f.read(8), "little")
            return
        if not allow_pickle:
            raise PickleWeightsError(
                f"{path} is a pickle checkpoint, which can run code when loaded; pass "
                "allow_pickle=True if you trust it (latentkit then reads it with "
                "torch.load(weights_only=True)), or use a .safetensors file"
            )
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise PickleWeightsError(f"{path}: refused by weights-only loading ({e})") from e
        # Lightning/CompVis checkpoints nest the weights under "state_dict".
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightMismatchError(f"{path} holds no tensor dictionary")
        self._pickled = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._pickled.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        if self._map is None:
            import mmap

            # A private (copy-on-write) mapping of the whole file: each tensor is a view of
            # its bytes, so a weight whose dtype already fits is never copied, and only the
            # pages a computation touches become resident (as diffusers' loader does).
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        info = self._header[key]
        dtype = _DTYPES.get(info.dtype)
        if dtype is None:
            raise WeightMismatchError(f"{self.path}: tensor {key!r} has dtype {info.dtype}")
        count = (info.end - info.start) // dtype.itemsize
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(
            self._map, dtype=dtype, count=count, offset=self._data_start + info.start
        )
        return flat.reshape(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def is_single_file(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a checkpoint file (by its ending), local or on the Hub."""
    return os.fspath(source).lower().endswith(SUFFIXES)


def parts(
    path: Path,
    *,
    name: str,
    allow_pickle: bool = False,
    prediction_type: PredictionType | None = None,
    config: Path | None = None,
) -> tuple[Any, str]:
    """The `latentkit.pipelines.base.Parts` of the checkpoint at ``path`` and its pipeline
    family's name.

    ``prediction_type`` says what the tensors cannot: SD 2.x checkpoints default to
    v-prediction (diffusers' default config for them, stable-diffusion-2-1), except
    inpainting and depth models (epsilon); others to epsilon. ``config``, a diffusers folder,
    supplies the configs and tokenizers instead of the published ones (a fine-tune of
    another architecture, as diffusers' ``from_single_file(config=...)``).
    """
    from latentkit.models.autoencoder import AutoencoderKLConfig
    from latentkit.models.unet import UNetConfig
    from latentkit.pipelines.parts import Parts

    checkpoint = Checkpoint(path, allow_pickle=allow_pickle)
    detected = detect_layout(checkpoint.shapes)
    configs = _configs(detected, prediction_type, config)
    unet = UNetLayout.from_config(UNetConfig.from_dict(configs["unet"]))
    vae = VAELayout.from_config(AutoencoderKLConfig.from_dict(configs["vae"]))
    found_unet = UNetLayout.from_keys(_under(checkpoint, UNET_PREFIX))
    found_vae = VAELayout.from_keys(_under(checkpoint, VAE_PREFIX))
    if (unet, vae) != (found_unet, found_vae):
        raise UnsupportedModelError(
            f"{name}: a {detected.family} checkpoint whose blocks differ from "
            f"{'the configs in ' + str(config) if config else 'the published architecture'}; "
            "pass config= a diffusers folder with this model's configs"
        )
    open_clip = None
    if detected.family != "sd1":
        encoder = "text_encoder" if detected.family == "sd2" else "text_encoder_2"
        open_clip = OpenCLIPLayout(
            layers=int(configs[encoder]["num_hidden_layers"]),
            file_layers=_resblocks(checkpoint),
            projection=detected.family != "sd2",
        )
    layout = checkpoint_layout(detected.family, unet=unet, vae=vae, open_clip=open_clip)
    # Each component's tensors, split by name before any is read.
    by_component: dict[str, list[str]] = {}
    for key in checkpoint:
        found = layout.locate(key)
        if found is not None:
            by_component.setdefault(found[0].component, []).append(key)

    def tensors(
        component: str, device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        subset = _Subset(checkpoint, by_component.get(component, []))
        prefix = component + "."
        for key, tensor in convert(subset, layout=layout, unknown="skip"):
            # A third of a fused tensor (OpenCLIP's q/k/v) gets storage of its own, so the
            # fused tensor is not kept whole behind it; other tensors stay views of the file.
            base = tensor._base
            own = tensor.clone() if base is not None and base.numel() != tensor.numel() else tensor
            yield key.removeprefix(prefix), _convert(own, device, dtype)

    encoders = tuple(e for e in ("text_encoder", "text_encoder_2") if e in configs)
    # OpenCLIP's tokenizer (SD 2.x, SDXL's second encoder) pads with "!", CLIP's with its end.
    pads = {"text_encoder": "!" if detected.family == "sd2" else "<|endoftext|>"}
    pads["text_encoder_2"] = "!"
    folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

    def tokenizer(encoder: str) -> CLIPTokenizer:
        if config is not None:
            return CLIPTokenizer.from_pretrained(config / folders[encoder])
        return clip_tokenizer(pad_token=pads[encoder])

    model_index: Mapping[str, Any] = FAMILIES[detected.family]["model_index"]
    if config is not None:
        model_index = read_json_object(
            config / "model_index.json", label=f"{config}/model_index.json"
        )
    return (
        Parts(
            name=name,
            model_index=model_index,
            configs=configs,
            encoders=encoders,
            tensors=tensors,
            tokenizer=tokenizer,
            file=path,
        ),
        FAMILY_NAMES[detected.family],
    )


def _configs(
    detected: DetectedLayout, prediction_type: PredictionType | None, folder: Path | None
) -> dict[str, dict[str, Any]]:
    published = FAMILIES[detected.family]
    components = [k for k in published if k != "model_index"]
    if folder is not None:
        files = {"scheduler": "scheduler/scheduler_config.json"}
        configs = {
            k: dict(
                read_json_object(folder / files.get(k, f"{k}/config.json"), label=f"{folder}/{k}")
            )
            for k in components
        }
        if prediction_type is not None:
            configs["scheduler"]["prediction_type"] = prediction_type
        return configs
    configs = {k: dict(published[k]) for k in components}
    configs["unet"]["in_channels"] = detected.in_channels
    if prediction_type is None:
        plain = detected.family == "sd2" and detected.in_channels == 4
        prediction_type = "v_prediction" if plain else "epsilon"
    configs["scheduler"]["prediction_type"] = prediction_type
    return configs


def _under(checkpoint: Checkpoint, prefix: str) -> list[str]:
    return [k.removeprefix(prefix) for k in checkpoint if k.startswith(prefix)]


_RESBLOCK = re.compile(
    r"^(?:cond_stage_model|conditioner\.embedders\.\d+)\.model\.transformer\.resblocks\.(\d+)\."
)


def _resblocks(checkpoint: Checkpoint) -> int | None:
    """How many OpenCLIP layers the file holds (SD 2.x files have one more than is used)."""
    found = {int(m.group(1)) for k in checkpoint if (m := _RESBLOCK.match(k))}
    return max(found) + 1 if found else None


class _Subset(Mapping[str, torch.Tensor]):
    def __init__(self, checkpoint: Checkpoint, keys: list[str]) -> None:
        self.checkpoint, self.keys_ = checkpoint, keys

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.checkpoint[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def file_hash(path: Path) -> str:
    """The sha256 of a file (hex), read in 1 MiB blocks: A1111's ``Model hash`` is its first
    10 characters (AutoV2), ``Lora hashes`` the first 12."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def vae_override(
    path: Path, *, config: Mapping[str, Any], allow_pickle: bool
) -> tuple[dict[str, Any], Any]:
    """A replacement autoencoder: its config and its tensors function (as `Parts.tensors`).

    ``path`` is a diffusers VAE folder (``config.json`` + weights, as on the Hub) or a single
    file, in diffusers' layout or the original one (``encoder.down.0.block.0...``, e.g.
    ``vae-ft-mse-840000-ema-pruned.safetensors``); a single file takes the pipeline's own VAE
    ``config`` (its scaling factor), as a checkpoint carries no config. A folder whose config
    names ``AutoencoderTiny`` (TAESD, `latentkit.models.autoencoder_tiny`) is read as it is.
    """
    from latentkit.checkpoints.keys import CheckpointLayout, ComponentKeys, vae_keys
    from latentkit.models.autoencoder import AutoencoderKLConfig, rename_legacy_key
    from latentkit.models.autoencoder_tiny import is_tiny

    if path.is_dir():
        from latentkit.readers import read_json_object

        config = read_json_object(path / "config.json", label=f"{path}/config.json")
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            raise WeightMismatchError(f"{path} has no diffusion_pytorch_model.safetensors")
        path = files[0]
    checkpoint = Checkpoint(path, allow_pickle=allow_pickle)
    if is_tiny(config):
        # TAESD in diffusers' layout: the keys are the module paths, nothing to convert.
        def tiny(
            component: str, device: torch.device, dtype: torch.dtype
        ) -> Iterator[tuple[str, torch.Tensor]]:
            for key in checkpoint:
                yield key, _convert(checkpoint[key], device, dtype)

        return dict(config), tiny
    original = any(k.startswith(("encoder.down.", "first_stage_model.")) for k in checkpoint)
    prefix = (
        "first_stage_model." if any(k.startswith("first_stage_model.") for k in checkpoint) else ""
    )
    layout = CheckpointLayout(
        "sd1",
        (
            ComponentKeys(
                "vae",
                prefix,
                vae_keys(VAELayout.from_config(AutoencoderKLConfig.from_dict(config))),
            ),
        ),
    )
    keys = [k for k in checkpoint if k.startswith(prefix)] if original else list(checkpoint)

    def tensors(
        component: str, device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        subset = _Subset(checkpoint, keys)
        if original:
            for key, tensor in convert(subset, layout=layout, unknown="skip"):
                yield key.removeprefix("vae."), _convert(tensor, device, dtype)
        else:
            for key in keys:
                yield rename_legacy_key(key), _convert(checkpoint[key], device, dtype)

    return dict(config), tensors
