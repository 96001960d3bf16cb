"""Finding a model's files (Hub repo or local folder) and loading its components.

Only the files the pipeline uses are fetched: ``model_index.json``, the configs, the
tokenizer files and one weight file per model component, of the chosen variant. Weights
are safetensors unless the caller opts into pickle, which is then read with
``torch.load(weights_only=True)``. No code from a model repo is ever executed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentkit.errors import (
    InvalidArgumentError,
    MissingComponentError,
    ModelNotCachedError,
    ModelNotFoundError,
    PickleWeightsError,
    WeightMismatchError,
)

logger = logging.getLogger("latentkit")

# Components a text-to-image pipeline uses, and the file stem of each one's weights
# (diffusers models write ``diffusion_pytorch_model``, transformers models ``model``).
WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "depth_estimator": "model",
}
PICKLE_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "pytorch_model",
    "depth_estimator": "pytorch_model",
}
# Depth-to-image repos (Stable Diffusion 2 depth) carry their own depth estimator and its
# image processor; other repos' feature_extractor (for the safety checker) is never fetched.
DEPTH_ESTIMATOR_CONFIG = "depth_estimator/config.json"
DEPTH_PROCESSOR_CONFIG = "feature_extractor/preprocessor_config.json"
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelFiles:
    """Where one model's files are, once resolved (downloaded or found locally)."""

    root: Path
    """Folder in the diffusers layout (a local folder or a Hub cache snapshot)."""
    name: str
    """The source as the user gave it (repo id or path), for metadata."""
    weights: Mapping[str, tuple[Path, ...]]
    """Component → its weight files (several when sharded)."""
    variant: str | None = None
    """The weight variant asked for (a component without it uses its regular weights)."""

    @classmethod
    def at(
        cls, root: Path, name: str, weights: Mapping[str, list[str]], variant: str | None
    ) -> ModelFiles:
        """The files of ``weights`` (component → paths relative to ``root``)."""
        return cls(
            root, name, {c: tuple(root / f for f in fs) for c, fs in weights.items()}, variant
        )

    def model_index(self) -> dict[str, Any]:
        """The pipeline's ``model_index.json`` (component → [library, class])."""
        data: dict[str, Any] = json.loads((self.root / "model_index.json").read_text())
        return data

    def config(self, component: str) -> dict[str, Any]:
        path = self.root / CONFIG_FILES[component]
        if not path.is_file():
            raise MissingComponentError(f"{self.name}: missing {CONFIG_FILES[component]}")
        data: dict[str, Any] = json.loads(path.read_text())
        return data


def select_files(
    files: Iterable[str], *, variant: str | None, allow_pickle: bool, name: str
) -> tuple[list[str], dict[str, list[str]]]:
    """Choose the files a pipeline needs from a repo listing.

    Returns the list of every file to fetch and, per model component, its weight files.
    A variant's weights (``*.fp16.safetensors``) are preferred; a component without that
    variant falls back to its regular weights. Pickle weights are taken only when no
    safetensors exist and ``allow_pickle`` is set.
    """
    available = {f.replace(os.sep, "/") for f in files}
    if "model_index.json" not in available:
        raise MissingComponentError(
            f"{name}: no model_index.json; latentkit loads models in the diffusers folder layout"
        )
    needed = ["model_index.json", *CONFIG_FILES.values()]
    needed += sorted(f for f in available if f.startswith("tokenizer/") and f.count("/") == 1)
    weights: dict[str, list[str]] = {}
    components = [c for c in WEIGHT_STEMS if c != "depth_estimator"]
    if DEPTH_ESTIMATOR_CONFIG in available:
        components.append("depth_estimator")
        needed += [DEPTH_ESTIMATOR_CONFIG, DEPTH_PROCESSOR_CONFIG]
    for component in components:
        weights[component] = _pick_weights(available, component, variant, allow_pickle, name)
        needed += weights[component]
    for f in needed:
        if f not in available and not f.endswith(".safetensors"):
            raise MissingComponentError(f"{name}: missing {f}")
    if not any(f.startswith("tokenizer/") for f in needed):
        raise MissingComponentError(f"{name}: missing the tokenizer/ folder")
    return needed, weights


def _pick_weights(
    available: set[str], component: str, variant: str | None, allow_pickle: bool, name: str
) -> list[str]:
    def candidates(stem: str, ext: str) -> Iterator[list[str]]:
        folder = f"{component}/"
        for v in ([variant] if variant else []) + [None]:
            single = f"{folder}{stem}.{v}.{ext}" if v else f"{folder}{stem}.{ext}"
            index = (
                f"{folder}{stem}.{ext}.index.{v}.json" if v else f"{folder}{stem}.{ext}.index.json"
            )
            if single in available:
                yield [single]
            elif index in available:
                # Sharded weights: the shards are named after the index's stem.
                shard = re.compile(
                    re.escape(f"{folder}{stem}")
                    + (rf"\.{re.escape(v)}" if v else "")
                    + rf"-\d+-of-\d+\.{ext}$"
                )
                yield [index, *sorted(f for f in available if shard.match(f))]
            if v is not None and (single in available or index in available):
                return

    for files in candidates(WEIGHT_STEMS[component], "safetensors"):
        if variant and not any(f".{variant}." in f for f in files):
            logger.warning(
                "%s: %s has no %r variant; using its regular weights", name, component, variant
            )
        return files
    pickles = [f for files in candidates(PICKLE_STEMS[component], "bin") for f in files]
    if pickles:
        if not allow_pickle:
            raise PickleWeightsError(
                f"{name}: {component} has only pickle weights ({', '.join(pickles)}); pickle "
                "files can run code when loaded. Pass allow_pickle=True if you trust this model "
                "(latentkit then loads them with torch.load(weights_only=True))"
            )
        return pickles[:1] if not pickles[0].endswith(".json") else pickles
    raise MissingComponentError(
        f"{name}: no weights for {component} (looked for {component}/{WEIGHT_STEMS[component]}"
        f"[.{variant or 'VARIANT'}].safetensors)"
    )


BUILTIN_MODELS = {"latentkit/shapes": "shapes"}
"""Models shipped inside the package (``latentkit/assets/<folder>``), addressable by name."""


def builtin_model(name: str) -> Path | None:
    """The folder of the built-in model ``name``, or None if ``name`` is not one."""
    folder = BUILTIN_MODELS.get(name.strip().lower())
    return None if folder is None else Path(__file__).parent / "assets" / folder


def resolve(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> ModelFiles:
    """Find (and if needed download) the files of the model ``source``.

    ``source`` is a local folder in the diffusers layout or a Hub repo id (``owner/name``).
    """
    name = os.fspath(source)
    builtin = builtin_model(name)
    path = builtin or Path(name).expanduser()
    if builtin is not None and not builtin.is_dir():
        raise MissingComponentError(
            f"the built-in model {name} is not installed (expected {builtin})"
        )
    if path.is_dir():
        files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        _, weights = select_files(files, variant=variant, allow_pickle=allow_pickle, name=name)
        return ModelFiles.at(path, name, weights, variant)
    if path.exists():
        raise InvalidArgumentError(
            f"{name} is a file; latentkit loads a folder in the diffusers layout (or a Hub repo id)"
        )
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"local path {name} does not exist (and it is not a Hub repo id)")
    return _resolve_hub(
        name,
        revision=revision,
        variant=variant,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        local_files_only=local_files_only,
        token=token,
        allow_pickle=allow_pickle,
        progress=progress,
    )


def _resolve_hub(
    repo_id: str,
    *,
    revision: str | None,
    variant: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
    allow_pickle: bool,
    progress: bool,
) -> ModelFiles:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = local_files_only or constants.HF_HUB_OFFLINE
    reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "local_files_only=True"
    if not offline:
        try:
            info = HfApi().model_info(repo_id, revision=revision, token=token)
        except GatedRepoError as e:
            raise ModelNotFoundError(
                f"{repo_id} is gated: accept its terms on the Hub and pass token= (or log in)"
            ) from e
        except RepositoryNotFoundError as e:
            raise ModelNotFoundError(
                f"repo {repo_id} was not found on the Hub (or it is private: pass token=)"
            ) from e
        except RevisionNotFoundError as e:
            raise ModelNotFoundError(f"repo {repo_id} has no revision {revision!r}") from e
        except HfHubHTTPError as e:  # the Hub answered, with an error (bad token, 5xx, ...)
            raise ModelNotFoundError(f"the Hub refused {repo_id}: {e}") from e
        except Exception as e:  # no connection: fall back to the cache, as huggingface_hub does
            logger.info("cannot reach the Hub (%s); looking in the cache", e)
            reason = f"the Hub cannot be reached ({type(e).__name__})"
        else:
            listing = [s.rfilename for s in info.siblings or []]
            needed, weights = select_files(
                listing, variant=variant, allow_pickle=allow_pickle, name=repo_id
            )
            with progress_bars(progress):
                folder = Path(
                    snapshot_download(
                        repo_id,
                        revision=info.sha,  # pin the commit we listed
                        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                        token=token,
                        allow_patterns=needed,
                    )
                )
            return ModelFiles.at(folder, repo_id, weights, variant)
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError as e:
        raise ModelNotCachedError(
            f"{repo_id}{'@' + revision if revision else ''} is not in the cache ({cache}) and "
            f"cannot be downloaded: {reason}. Connect and unset HF_HUB_OFFLINE to download it, "
            "or pass cache_dir= pointing at a cache that has it"
        ) from e
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    try:
        _, weights = select_files(files, variant=variant, allow_pickle=allow_pickle, name=repo_id)
    except MissingComponentError as e:
        raise MissingComponentError(f"{e} in the cached copy ({folder}); {reason}") from e
    return ModelFiles.at(folder, repo_id, weights, variant)


@contextmanager
def progress_bars(enabled: bool, *, transformers: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's own progress bars off while loading, if asked, and
    transformers' too when ``transformers`` (only then is transformers imported)."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils

    hub_was_on = not hub_utils.are_progress_bars_disabled()
    hub_utils.disable_progress_bars()
    tf_was_on = False
    if transformers:
        from transformers.utils import logging as tf_logging

        tf_was_on = tf_logging.is_progress_bar_enabled()
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_on:
            hub_utils.enable_progress_bars()
        if tf_was_on:
            tf_logging.enable_progress_bar()


def read_state_dict(
    paths: Iterable[Path],
    *,
    device: torch.device,
    dtype: torch.dtype,
    rename: Callable[[str], str | None] = lambda k: k,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time, converted to ``dtype`` on ``device``.

    ``rename`` maps a checkpoint key to the module's parameter name; a key it maps to None
    is skipped unread (a tensor the format carries that the module has no place for).
    Streaming keeps peak memory at the model's size plus one tensor.
    """
    from safetensors import safe_open

    for path in paths:
        if path.suffix == ".json":
            continue  # a shard index; the shards follow
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    name = rename(key)
                    if name is not None:
                        yield name, _convert(f.get_tensor(key), device, dtype)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key, tensor in state.items():
                name = rename(key)
                if name is not None:
                    yield name, _convert(tensor, device, dtype)


def _convert(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor = tensor.to(dtype=dtype)
    return tensor.to(device)


def load_into(
    module: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    name: str,
) -> None:
    """Put ``tensors`` into ``module`` (built on the meta device) by name, checking each shape.

    The tensors are assigned, not copied, so no second copy of the weights ever exists.
    """
    expected = dict(module.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors:
        if key not in expected:
            raise WeightMismatchError(f"{name}: unexpected tensor {key!r} in the weights")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightMismatchError(
                f"{name}: tensor {key!r} has shape {tuple(tensor.shape)} but the config "
                f"gives {tuple(expected[key].shape)}"
            )
        state[key] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightMismatchError(f"{name}: the weights lack {', '.join(missing[:5])}{more}")
    module.load_state_dict(state, strict=True, assign=True)
    module.eval().requires_grad_(False)
