"""Finding a model's files (Hub repo or local folder) and loading its components.

Only the files the pipeline uses are fetched: ``model_index.json``, the configs, the
tokenizer files and one weight file per model component, of the chosen variant. Weights
are safetensors unless the caller opts into pickle, which is then read with
``torch.load(weights_only=True)``. No code from a model repo is ever executed.

Every file is checked before it is used (see `latentkit.readers` and
`latentkit.models.config_checks`): a broken or hostile model raises a typed error naming
the file at load time, a local folder is never left (no symlink out of it, no config that
fetches from the network), and a Hub ``revision`` is checked before it names a path.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from latentkit.errors import (
    CorruptFileError,
    InvalidArgumentError,
    InvalidConfigError,
    LatentkitError,
    MissingComponentError,
    ModelNotCachedError,
    ModelNotFoundError,
    PickleWeightsError,
    UnsafeFileError,
    UnsupportedModelError,
    WeightMismatchError,
)
from latentkit.models.config_checks import ConfigKind, check_config
from latentkit.readers import FLOAT_DTYPES, read_json_object, safetensors_header

logger = logging.getLogger("latentkit")
T = TypeVar("T")

# Components a text-to-image pipeline uses, and the file stem of each one's weights
# (diffusers models write ``diffusion_pytorch_model``, transformers models ``model``).
WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "depth_estimator": "model",
}
PICKLE_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "pytorch_model",
    "text_encoder_2": "pytorch_model",
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
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "low_res_scheduler": "low_res_scheduler/scheduler_config.json",
}
OPTIONAL_CONFIGS = frozenset({"low_res_scheduler"})
"""Config-only components fetched when the repo has them: the x4 upscaler's
``low_res_scheduler`` (the DDPM schedule that noises its low-resolution input); the family
that needs one refuses a folder without it (`MissingComponentError`)."""
TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
"""Text encoder components and their tokenizers' folders (SDXL has both; its refiner and
SD 1.x/2.x one of them)."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_REVISION = re.compile(r"^[A-Za-z0-9_.\-/]{1,255}$")
_VARIANT = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_CONFIG_KINDS: dict[str, ConfigKind] = {
    "unet": "unet",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
    "scheduler": "scheduler",
    "low_res_scheduler": "scheduler",
}


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
        """The pipeline's ``model_index.json`` (component → [library, class]), checked to be
        a JSON object (`CorruptFileError` otherwise) with a ``_class_name`` string and
        components that are ``[library, class]`` pairs (`InvalidConfigError`)."""
        path = self.root / "model_index.json"
        index = read_json_object(path)
        name = index.get("_class_name")
        if not isinstance(name, str):  # diffusers writes it always, and reads it first
            raise InvalidConfigError(
                f"{path}: _class_name={name!r} must be the pipeline class's name, a string "
                "such as 'StableDiffusionPipeline'",
                path=path,
            )
        for key, value in index.items():
            if key in CONFIG_FILES and not (
                isinstance(value, list)
                and len(value) == 2
                and all(v is None or isinstance(v, str) for v in value)
            ):
                raise InvalidConfigError(
                    f"{path}: {key}={value!r} must be a [library, class] pair of strings",
                    path=path,
                )
        return index

    def config(self, component: str) -> dict[str, Any]:
        """The config file of ``component``, parsed and its values checked
        (`latentkit.models.config_checks.check_config`): `MissingComponentError` if it is
        absent, `CorruptFileError` if it is not a JSON object, `InvalidConfigError` naming
        the file and key for a value of the wrong type or out of range."""
        path = self.root / CONFIG_FILES[component]
        if not path.is_file():
            raise MissingComponentError(f"{self.name}: missing {CONFIG_FILES[component]}")
        data = read_json_object(path)
        kind = _CONFIG_KINDS.get(component)
        if kind is not None:
            check_config(kind, data, source=path)
        return data

    def parse_config(self, component: str, parse: Callable[[dict[str, Any]], T]) -> T:
        """``parse(self.config(component))`` (e.g. ``UNetConfig.from_dict``), with any
        refusal it raises naming the file: the message of its `LatentkitError` (an
        unsupported setting, a block count that does not match) gets the config file's path
        in front, so the user learns which file of which model to look at."""
        data = self.config(component)
        try:
            return parse(data)
        except LatentkitError as e:
            path = os.fspath(self.root / CONFIG_FILES[component])
            if e.args and isinstance(e.args[0], str) and path not in e.args[0]:
                e.args = (f"{path}: {e.args[0]}", *e.args[1:])
            raise


class Selector(Protocol):
    """Chooses the files to fetch from a repo listing: `select_files`'s signature."""

    def __call__(
        self, files: Iterable[str], *, variant: str | None, allow_pickle: bool, name: str
    ) -> tuple[list[str], dict[str, list[str]]]: ...


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
    # The text encoders the folder has (an SDXL refiner has only the second), with their
    # configs and tokenizer files; the other components are always needed.
    encoders = [e for e in TEXT_ENCODERS if CONFIG_FILES[e] in available]
    if not encoders:
        raise MissingComponentError(f"{name}: missing text_encoder/config.json")
    configs = [
        f
        for c, f in CONFIG_FILES.items()
        if (c in encoders if c in TEXT_ENCODERS else c not in OPTIONAL_CONFIGS or f in available)
    ]
    needed = ["model_index.json", *configs]
    for encoder in encoders:
        folder = TEXT_ENCODERS[encoder] + "/"
        tokenizer = sorted(f for f in available if f.startswith(folder) and f.count("/") == 1)
        if not tokenizer:
            raise MissingComponentError(f"{name}: missing the {folder} folder")
        needed += tokenizer
    weights: dict[str, list[str]] = {}
    components = ["unet", "vae", *encoders]
    if DEPTH_ESTIMATOR_CONFIG in available:
        components.append("depth_estimator")
        needed += [DEPTH_ESTIMATOR_CONFIG, DEPTH_PROCESSOR_CONFIG]
    for component in components:
        weights[component] = _pick_weights(available, component, variant, allow_pickle, name)
        needed += weights[component]
    for f in needed:
        if f not in available and not f.endswith(".safetensors"):
            raise MissingComponentError(f"{name}: missing {f}")
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
    select: Selector | None = None,
) -> ModelFiles:
    """Find (and if needed download) the files of the model ``source``.

    ``source`` is a local folder in the diffusers layout or a Hub repo id (``owner/name``).
    ``select`` chooses the files from the folder's or repo's listing: `select_files` (a
    pipeline's) by default; a single model (a ControlNet: ``config.json`` and weights at the
    root) passes its own.
    Every file the pipeline will read is checked here, before any model is built: it must
    lie inside the model's folder (after following symlinks), ``model_index.json`` and a
    depth estimator's configs must be JSON objects that fetch nothing from the network, and
    each safetensors header must describe its file exactly (`latentkit.readers`).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"model must be a Hub repo id or a folder path, not {type(source).__name__}"
        )
    name = os.fspath(source)
    if not isinstance(name, str) or "\0" in name or not name.strip():
        raise InvalidArgumentError(f"model must be a Hub repo id or a folder path, got {name!r}")
    check_revision(revision)
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.match(variant)):
        raise InvalidArgumentError(
            f"variant must be a weight variant name such as 'fp16' (letters, digits, '_' and "
            f"'-'), got {variant!r}"
        )
    builtin = builtin_model(name)
    path = builtin or Path(name).expanduser()
    if builtin is not None and not builtin.is_dir():
        raise MissingComponentError(
            f"the built-in model {name} is not installed (expected {builtin})"
        )
    if path.is_dir():
        files = _list_model_folder(path, name)
        needed, weights = (select or select_files)(
            files, variant=variant, allow_pickle=allow_pickle, name=name
        )
        model = ModelFiles.at(path, name, weights, variant)
        check_model_files(model, needed, inside=_cache_repo_folder(path) or path, cached=False)
        return model
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
        select=select,
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
    select: Selector | None = None,
) -> ModelFiles:
    """A Hub repo's files (downloaded, or from the cache when offline), chosen from its
    listing by ``select`` (default `select_files`: a pipeline's; a single model such as a
    ControlNet passes its own)."""
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
            needed, weights = (select or select_files)(
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
            model = ModelFiles.at(folder, repo_id, weights, variant)
            check_model_files(model, needed, inside=folder.parent.parent, cached=True)
            return model
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
    files = _list_model_folder(folder, repo_id)
    try:
        needed, weights = (select or select_files)(
            files, variant=variant, allow_pickle=allow_pickle, name=repo_id
        )
    except MissingComponentError as e:
        raise MissingComponentError(f"{e} in the cached copy ({folder}); {reason}") from e
    model = ModelFiles.at(folder, repo_id, weights, variant)
    # A snapshot's files link to blobs two folders up, inside the repo's cache folder.
    check_model_files(model, needed, inside=folder.parent.parent, cached=True)
    return model


def check_revision(revision: object) -> None:
    """Refuse a ``revision`` that is not a branch, tag or commit name.

    huggingface_hub joins a revision to cache paths (``refs/<revision>``,
    ``snapshots/<commit>``), so ``"../../x"`` would read outside the cache: the name must be
    made of letters, digits, ``_ - . /``, with no empty, ``.``-leading or ``..`` part.
    """
    if revision is None:
        return
    if not (
        isinstance(revision, str)
        and _REVISION.match(revision)
        and not any(part == "" or part.startswith(".") for part in revision.split("/"))
    ):
        raise InvalidArgumentError(
            "revision must be a branch, tag or commit of the repo (letters, digits and "
            f"'_-./', no '..' or empty parts; e.g. 'main' or a 40-hex commit), got {revision!r}"
        )


def _list_model_folder(root: Path, name: str) -> list[str]:
    """The files of a model folder at the two depths the diffusers layout uses (the root and
    one folder down), as ``/``-separated paths relative to ``root``.

    Not a recursive walk: ``load_pipeline("/")`` or a home folder must fail at once (no
    ``model_index.json``), not after reading every folder below it.
    """
    found: list[str] = []
    try:
        with os.scandir(root) as entries:
            top = sorted(entries, key=lambda e: e.name)
        found = [e.name for e in top if e.is_file()]
        if "model_index.json" not in found:
            return found  # select_files says what is missing
        for entry in top:
            if entry.is_dir():
                with os.scandir(entry.path) as inner:
                    found += [f"{entry.name}/{e.name}" for e in inner if e.is_file()]
    except OSError as e:
        raise MissingComponentError(
            f"{name}: cannot list the model folder {root}: {e.strerror or e}"
        ) from e
    return found


def _cache_repo_folder(folder: Path) -> Path | None:
    """The repo folder of a Hugging Face cache snapshot (``models--o--n/snapshots/<commit>``),
    whose files link to blobs in that repo folder; None for any other folder."""
    snapshots = folder.resolve().parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return snapshots.parent
    return None


def check_model_files(
    files: ModelFiles, needed: Iterable[str], *, inside: Path, cached: bool
) -> None:
    """Check, before anything is built, the files a pipeline will read (``needed``, relative
    to ``files.root``): each lies inside the folder ``inside`` once symlinks are followed
    (`UnsafeFileError`), ``model_index.json`` and the component configs are JSON objects
    (`CorruptFileError`) with valid values (`InvalidConfigError`), each safetensors header
    describes its file exactly and each shard index is JSON (`CorruptFileError`), and a
    depth estimator's config fetches nothing from the network (`UnsafeFileError`).

    ``cached`` files are in the Hugging Face cache: the message then says what to delete
    so that the next load downloads a broken file again.
    """
    boundary = inside.resolve()
    needed = list(needed)
    for relative in needed:
        path = files.root / relative
        if not os.path.lexists(path):
            continue  # select_files allowed it to be absent
        real = path.resolve()
        if not real.is_relative_to(boundary):
            raise UnsafeFileError(
                f"{path} links to {real}, outside the model folder {boundary}; latentkit reads "
                "a model's files only from inside its folder (copy the file in to use it)",
                path=path,
            )
    try:
        if "model_index.json" in needed:  # a pipeline's (a single model has none)
            files.model_index()
        for component, relative in CONFIG_FILES.items():
            if relative in needed:  # parsed and checked here, where a broken one gets the hint
                files.config(component)
        for paths in files.weights.values():
            for path in paths:
                if path.suffix == ".json":
                    read_json_object(path)  # a shard index
                elif path.suffix == ".safetensors":
                    safetensors_header(path)
    except CorruptFileError as e:
        if not cached or e.path is None:
            raise
        blob = Path(e.path).resolve()
        raise CorruptFileError(
            f"{e}; it is in the Hugging Face cache: delete {blob}"
            + ("" if blob == Path(e.path) else f" and {e.path}")
            + " to download it again",
            path=e.path,
        ) from e
    if "depth_estimator" in files.weights:
        _check_depth_estimator_config(files.root / DEPTH_ESTIMATOR_CONFIG)
        read_json_object(files.root / DEPTH_PROCESSOR_CONFIG)


def _check_depth_estimator_config(path: Path) -> None:
    """transformers builds a DPT depth estimator's backbone from its config, and fetches it
    from the Hub (ignoring ``local_files_only``) when the config names a ``backbone`` repo,
    asks for pretrained backbone weights, or uses a timm backbone (timm downloads its own).
    latentkit refuses those, so a model's files are all it ever reads."""
    config = read_json_object(path)
    model_type = config.get("model_type", "dpt")
    if model_type != "dpt":
        raise UnsupportedModelError(
            f"{path}: model_type={model_type!r}; latentkit reads DPT depth estimators ('dpt')"
        )
    backbone = config.get("backbone_config")
    if backbone is not None and not isinstance(backbone, dict):
        raise InvalidConfigError(
            f"{path}: backbone_config must be a JSON object or null, got {backbone!r}", path=path
        )
    for where, settings in (("", config), ("backbone_config.", backbone or {})):
        reaches = [
            f"{where}{key}={settings[key]!r}"
            for key in ("backbone", "use_pretrained_backbone")
            if settings.get(key) not in (None, False, "")
        ]
        if settings.get("model_type") == "timm_backbone":
            reaches.append(f"{where}model_type='timm_backbone'")
        if reaches:
            raise UnsafeFileError(
                f"{path}: {', '.join(reaches)} would make transformers fetch a backbone from "
                "the network; latentkit loads a depth estimator only from its own files "
                "(describe the backbone inline in backbone_config, without a 'backbone' name)",
                path=path,
            )


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

    A safetensors header is checked before any tensor is read (`latentkit.readers`), and
    the dtypes of the tensors kept: `CorruptFileError` for a broken file,
    `WeightMismatchError` for a weight that is not floating point (an int8/bool/int64
    tensor would be loaded as garbage). Pickle weights (``allow_pickle=True``) are read with
    ``torch.load(weights_only=True)``; one that tries to import code raises
    `PickleWeightsError`, one that is corrupt `CorruptFileError`.
    """
    from safetensors import SafetensorError, safe_open

    for path in paths:
        if path.suffix == ".json":
            continue  # a shard index; the shards follow
        if path.suffix == ".safetensors":
            header = safetensors_header(path)
            kept = {key: name for key in header if (name := rename(key)) is not None}
            for key in kept:
                if not header[key].is_float:
                    raise _not_float(path, key, header[key].dtype)
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CorruptFileError(f"{path} cannot be opened: {e}", path=path) from e
            with handle as f:
                for key, name in kept.items():
                    try:
                        tensor = f.get_tensor(key)
                    except (SafetensorError, OSError) as e:
                        raise CorruptFileError(
                            f"{path}: tensor {key!r} cannot be read: {e}", path=path
                        ) from e
                    yield name, _convert(tensor, device, dtype)
        else:
            for key, value in _load_pickle(path).items():
                name = rename(key)
                if name is None:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise WeightMismatchError(
                        f"{path}: {key!r} holds a {type(value).__name__}, not a tensor", path=path
                    )
                if not value.is_floating_point():
                    raise _not_float(path, key, str(value.dtype).removeprefix("torch."))
                yield name, _convert(value, device, dtype)


def _not_float(path: Path, key: str, dtype: str) -> WeightMismatchError:
    return WeightMismatchError(
        f"{path}: tensor {key!r} has dtype {dtype}; network weights are floating point "
        f"({', '.join(sorted(FLOAT_DTYPES))})",
        path=path,
    )


_PICKLE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _python3_name(dotted: str) -> str:
    """The Python 3 name of a global a pickle names: torch.save writes protocol 2, where
    Python 3 names are written as Python 2's (``subprocess.call`` as ``commands.call``)."""
    import _compat_pickle

    module, _, name = dotted.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}" if f"{module}.{name}" == dotted else f"{module}.{name} ({dotted})"


def _load_pickle(path: Path) -> Mapping[str, Any]:
    """A pickle weights file, read by ``torch.load(weights_only=True)`` (memory-mapped), as
    a mapping of names to values, with every way that fails as a typed error."""
    try:
        zipped = zipfile.is_zipfile(path)
    except OSError as e:
        raise CorruptFileError(f"{path} cannot be read: {e.strerror or e}", path=path) from e
    if not zipped:
        # torch's legacy (before 1.6) format cannot be memory-mapped, and its storages are
        # sized by the pickle alone, so a hostile one could make torch allocate at will.
        raise CorruptFileError(
            f"{path} is not a PyTorch zip checkpoint (torch.save since torch 1.6); latentkit "
            "reads no other pickle format. Convert it to safetensors in a sandbox",
            path=path,
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "Weights only load failed" not in message:
            raise CorruptFileError(f"{path} is not a valid pickle: {message}", path=path) from e
        found = _PICKLE_GLOBAL.search(message)
        tried = f"import {_python3_name(found.group(1))}" if found else "run code"
        raise PickleWeightsError(
            f"{path} tried to {tried} while it was unpickled; weights never do, so it was "
            "refused (weights_only loading ran none of it). It may be malicious: use this "
            "model's safetensors weights instead",
        ) from e
    except Exception as e:  # the zip reader, a truncated pickle: RuntimeError, EOFError, ...
        reason = str(e).split("\n")[0]
        raise CorruptFileError(
            f"{path} is not a valid PyTorch checkpoint ({type(e).__name__}: {reason})", path=path
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CorruptFileError(
            f"{path} holds a {type(state).__name__}, not a mapping of tensor names to tensors",
            path=path,
        )
    return state


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
