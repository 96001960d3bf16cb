"""What LoRA and textual inversion share: finding an adapter's file, the typed mismatch
error and warning, and copying a module tree along the paths an adapter changes.

Adapters never modify the networks they are given. `replace_modules` returns a new tree
that shares every module off the changed paths (and with it every unaffected parameter)
with the base; only the modules from the root down to each replaced leaf are shallow
copies, so the base pipeline's outputs stay bit-identical.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from latentkit.errors import (
    InvalidArgumentError,
    ModelNotCachedError,
    ModelNotFoundError,
    PickleWeightsError,
    WeightMismatchError,
)

M = TypeVar("M", bound=nn.Module)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class AdapterMismatchError(WeightMismatchError):
    """An adapter does not fit the pipeline: made for another architecture (modules the
    pipeline lacks, or other shapes), or holding nothing this kind of adapter has.

    ``matched`` of the adapter's ``total`` modules (LoRA) or vector sets (embeddings) fit;
    the message names some of those that do not.
    """

    def __init__(
        self, message: str, *, matched: int, total: int, path: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.matched = matched
        self.total = total


class PartialAdapterWarning(UserWarning):
    """An otherwise compatible adapter has parts for a component the pipeline does not have
    (a text-encoder LoRA on a refiner without that encoder, SDXL embeddings' ``clip_l`` on a
    pipeline with only the OpenCLIP encoder); those parts are left out, and the warning
    lists them."""


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class AdapterFile:
    """An adapter's tensors as read, with the safetensors metadata (empty for pickles)."""

    state: dict[str, Any]
    """Tensors by key; a pickle (A1111 ``.pt`` embeddings) may nest dicts and strings."""
    metadata: dict[str, str]
    path: Path


def find_adapter_file(
    source: str | os.PathLike[str],
    *,
    weight_name: str | None,
    default_names: tuple[str, ...],
    allow_pickle: bool,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    what: str = "adapter",
) -> Path:
    """The ``what`` (adapter) file ``source`` names: a file, a folder, or a Hub repo id.

    In a folder or repo, ``weight_name`` if given, else the first of ``default_names``
    present, else its only safetensors file (or only pickle, with ``allow_pickle``).
    Pickle files are refused without ``allow_pickle`` (`PickleWeightsError`): they can run
    code when loaded (latentkit reads them with ``torch.load(weights_only=True)``).
    """
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        return _check_suffix(path, allow_pickle)
    if path.is_dir():
        listing = sorted(p.name for p in path.iterdir() if p.is_file())
        return _check_suffix(
            path / _pick(listing, weight_name, default_names, allow_pickle, name), allow_pickle
        )
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(
            f"{what} {name} does not exist (a file, a folder or a Hub repo id)"
        )
    return _hub_file(
        name,
        weight_name=weight_name,
        default_names=default_names,
        allow_pickle=allow_pickle,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )


def _pick(
    listing: list[str],
    weight_name: str | None,
    default_names: tuple[str, ...],
    allow_pickle: bool,
    where: str,
) -> str:
    if weight_name is not None:
        if weight_name not in listing:
            raise ModelNotFoundError(f"{where} has no {weight_name}")
        return weight_name
    for default in default_names:
        if default in listing:
            return default
    for suffixes in ((".safetensors",), PICKLE_SUFFIXES if allow_pickle else ()):
        found = [f for f in listing if f.endswith(suffixes)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InvalidArgumentError(
                f"{where} holds several weight files ({', '.join(found)}); pass weight_name="
            )
    pickles = [f for f in listing if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise PickleWeightsError(
            f"{where} has only pickle weights ({', '.join(pickles)}); pickle files can run code "
            "when loaded. Pass allow_pickle=True if you trust them"
        )
    raise ModelNotFoundError(
        f"{where} holds no adapter weights (looked for {', '.join(default_names)})"
    )


def _check_suffix(path: Path, allow_pickle: bool) -> Path:
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise PickleWeightsError(
            f"{path} is a pickle file, which can run code when loaded. Pass allow_pickle=True "
            "if you trust it (latentkit then reads it with torch.load(weights_only=True))"
        )
    return path


def _hub_file(
    repo_id: str,
    *,
    weight_name: str | None,
    default_names: tuple[str, ...],
    allow_pickle: bool,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
) -> Path:
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    cache = None if cache_dir is None else os.fspath(cache_dir)
    offline = local_files_only or constants.HF_HUB_OFFLINE
    candidates = [weight_name] if weight_name is not None else list(default_names)
    if not offline and weight_name is None:
        try:
            listing = HfApi().list_repo_files(repo_id, token=token)
        except HfHubHTTPError as e:
            raise ModelNotFoundError(f"the Hub refused {repo_id}: {e}") from e
        except Exception:  # no connection: try the cached defaults below
            pass
        else:
            candidates = [_pick(sorted(listing), None, default_names, allow_pickle, repo_id)]
    for filename in candidates:
        try:
            downloaded = hf_hub_download(
                repo_id,
                filename,
                cache_dir=cache,
                token=token,
                local_files_only=offline,
            )
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        except HfHubHTTPError as e:
            raise ModelNotFoundError(f"the Hub refused {repo_id}: {e}") from e
        return _check_suffix(Path(downloaded), allow_pickle)
    error = ModelNotCachedError if offline else ModelNotFoundError
    raise error(f"{repo_id}: none of {', '.join(candidates)} is {'cached' if offline else 'there'}")


def read_adapter_file(path: Path) -> AdapterFile:
    """Read an adapter file (safetensors, or a pickle read with ``weights_only=True``)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state: dict[str, Any] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = f.get_tensor(key)
        return AdapterFile(state, metadata, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        if isinstance(loaded, Tensor):
            return AdapterFile({"": loaded}, {}, path)
        raise WeightMismatchError(f"{path} holds a {type(loaded).__name__}, not tensors")
    return AdapterFile(dict(loaded), {}, path)


def metadata_json(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    """A JSON object stored under ``key`` in safetensors metadata (empty if absent or not JSON)."""
    text = metadata.get(key)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- module trees


def shallow_copy(module: M, cls: type[nn.Module] | None = None) -> M:
    """A new module (of ``cls``, default ``type(module)``) with ``module``'s attributes, its
    own tables of parameters, buffers and children, the same tensors in them.

    Changing a child or parameter of the copy leaves ``module`` as it was; the tensors
    themselves are shared (``data_ptr`` equal), so nothing is copied.
    """
    new: Any = object.__new__(cls or type(module))
    new.__dict__.update(module.__dict__)
    new._parameters = module._parameters.copy()
    new._buffers = module._buffers.copy()
    new._modules = module._modules.copy()
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    result: M = new
    return result


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted ``path`` under ``root`` ("" is the root), or None."""
    module: nn.Module | None = root
    for part in path.split(".") if path else ():
        if module is None:
            return None
        module = module._modules.get(part)
    return module


def replace_modules(
    root: nn.Module,
    replacements: Mapping[str, nn.Module],
    *,
    adjust: Callable[[str, nn.Module], None] | None = None,
) -> nn.Module:
    """A copy of ``root`` with the module at each path of ``replacements`` swapped.

    Only the modules on the paths from ``root`` to the replaced ones are copied
    (`shallow_copy`); everything else is the base's own object. ``adjust(path, copy)`` is
    called on each copied ancestor (never on a base module), for settings that must follow
    a replaced child.
    """
    if not replacements:
        return root
    if "" in replacements:
        return replacements[""]
    tree: dict[str, Any] = {}
    for path, module in replacements.items():
        node = tree
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidArgumentError(f"{path} lies under another replaced module")
        node[parts[-1]] = module

    def rebuild(base: nn.Module, node: dict[str, Any], path: str) -> nn.Module:
        copy = shallow_copy(base)
        for name, child in node.items():
            here = f"{path}.{name}" if path else name
            current = base._modules.get(name)
            if current is None:
                raise InvalidArgumentError(f"no module {here} to replace")
            copy._modules[name] = (
                child if isinstance(child, nn.Module) else rebuild(current, child, here)
            )
        if adjust is not None:
            adjust(path, copy)
        return copy

    return rebuild(root, tree, "")
