"""Low-rank adapters (LoRA; Hu et al. 2021) in every common file dialect, on shared weights.

A LoRA changes a linear or convolution layer's weight ``W`` by a product of two thin
matrices (Hu et al. 2021, eq. 3, with kohya's ``alpha`` convention)::

    W' = W + scale * alpha / rank * up @ down          (down: rank x in, up: out x rank)

A convolution's ``down`` is a convolution with the layer's kernel, stride and padding and
its ``up`` a 1x1 convolution, so ``up @ down`` is taken over the flattened kernels. A file
without ``alpha`` means ``alpha = rank``.

Reading (`load_lora`, `lora_from_state_dict`) turns any dialect into one normal form,
`Lora`: ``"<component>.<module path>"`` → `LoraWeights`, component one of ``unet``,
``text_encoder``, ``text_encoder_2``. The dialects:

- kohya / A1111: ``lora_unet_*``, ``lora_te_*`` (``lora_te1_*`` / ``lora_te2_*`` for SDXL's two
  encoders) with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; the module path
  with ``.`` written ``_``. SD 1.x files use diffusers' module names, SDXL files the original
  ``sgm`` block names (``input_blocks_4_1_...``), read through the same key map as
  single-file checkpoints (`latentkit.checkpoints.keys.unet_keys`).
- diffusers / PEFT, as ``save_lora_weights`` writes it: ``unet.<path>.lora_A.weight`` /
  ``lora_B.weight`` (alpha in the ``lora_adapter_metadata`` JSON, PEFT's ``lora_alpha`` /
  ``alpha_pattern`` / ``use_rslora``), and diffusers' older spellings (``.lora.down``,
  ``.lora_linear_layer.down``, ``processor.to_q_lora.down``, ``.alpha`` tensors).

Applying (`apply_lora`) never touches the given networks: it returns new module trees that
share every parameter the LoRA does not change (see `latentkit.adapters.common`):

- unfused (default): each adapted layer becomes a `LoraLinear` / `LoraConv2d`, the same
  layer (same weight tensor) plus a low-rank side path ``y = layer(x) + s * up(down(x))``.
  No weight is copied; switching LoRAs costs only the small matrices.
- fused (``fuse=True``): each adapted layer gets a private copy of its weight with the
  change added (``W'`` above), for speed; the base's weight is left as it was.

LoRAs stack: applying one to trees another LoRA made adds a second side path (unfused) or
adds its change to the private copy (fused), in either combination.

Order: build → load → adapt → prepare. latentkit's fused attention projections
(`latentkit.models.layers.Attention.fuse_projections`, ``to_qkv`` / ``to_kv``) are adapted
too: a LoRA on ``to_q``/``to_k``/``to_v`` changes the rows of the fused layer it lives in,
and an attention whose projections carry a side path is not fused afterwards.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from latentkit.adapters.common import (
    AdapterMismatchError,
    PartialAdapterWarning,
    find_adapter_file,
    metadata_json,
    read_adapter_file,
    replace_modules,
    shallow_copy,
)
from latentkit.checkpoints.keys import KeyMap, UNetLayout, clip_keys, unet_keys
from latentkit.errors import InvalidArgumentError, UnsupportedModelError, WeightMismatchError
from latentkit.models.layers import Attention, Conv2d

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""The networks a LoRA adapts, by their pipeline names."""

DEFAULT_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors",)
"""The file a LoRA folder or Hub repo is read from when ``weight_name`` is not given (what
diffusers' ``save_lora_weights`` writes); otherwise a folder's only safetensors file."""

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
"""kohya/A1111 key prefixes and the component each names (``lora_te1_``/``lora_te2_``: SDXL)."""

KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".down.weight": "down",  # with an old module spelling (`processor.to_q_lora`), below
    ".up.weight": "up",
    ".alpha": "alpha",
}
"""The diffusers/PEFT spellings of a module's down and up matrices and its alpha."""

OLD_DIFFUSERS_MODULES = {
    "unet": {
        "processor.to_q_lora": "to_q",
        "processor.to_k_lora": "to_k",
        "processor.to_v_lora": "to_v",
        "processor.to_out_lora": "to_out.0",
    },
    "text": {
        "to_q_lora": "q_proj",
        "to_k_lora": "k_proj",
        "to_v_lora": "v_proj",
        "to_out_lora": "out_proj",
    },
}
"""diffusers' attention-processor LoRA names (before PEFT) and the layers they adapt."""

UNSUPPORTED_KINDS = (
    (re.compile(r"(^|\.)(dora_scale|lora_magnitude_vector)$"), "DoRA"),
    (re.compile(r"\.hada_\w+$"), "LoHa"),
    (re.compile(r"\.lokr_\w+$"), "LoKr"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with a CP-decomposed middle (lora_mid)"),
    (re.compile(r"\.lora_B\.bias$"), "LoRA with a bias on lora_B"),
    (re.compile(r"^lora_\w+\.(diff|diff_b)$"), "full weight differences"),
    (re.compile(r"^lora_\w+\.(w_norm|b_norm)$"), "norm-layer adapters"),
    (re.compile(r"\.oft_\w+$"), "OFT"),
)
"""Adapter kinds latentkit refuses by name (`UnsupportedModelError`), not silently."""


# ---------------------------------------------------------------- the normal form


@dataclass(frozen=True)
class LoraWeights:
    """One layer's LoRA: ``delta W = alpha / rank * up @ down`` (times the user's scale).

    ``down`` is (rank, in) for a linear layer, (rank, in, kh, kw) for a convolution; ``up``
    (out, rank) or (out, rank, 1, 1). ``alpha`` None means ``alpha = rank``.
    """

    down: Tensor
    up: Tensor
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.down.ndim not in (2, 4) or self.up.ndim != self.down.ndim:
            raise WeightMismatchError(
                f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} must both be "
                "matrices (linear) or both 4-d (convolution)"
            )
        if self.up.shape[1] != self.down.shape[0] or self.up.shape[2:] not in ((), (1, 1)):
            raise WeightMismatchError(
                f"LoRA up {tuple(self.up.shape)} does not follow down {tuple(self.down.shape)} "
                "(up must be out x rank [x 1 x 1], down rank x in [x kh x kw])"
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        """``alpha / rank``: the factor of ``up @ down`` at scale 1."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def delta(self) -> Tensor:
        """``alpha / rank * up @ down`` in float32, shaped like the layer's weight."""
        flat = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (flat * self.scaling).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class Lora:
    """A LoRA in normal form: ``"<component>.<module path>"`` → `LoraWeights`.

    Module paths are those of the networks it was read for (`load_lora`); a ``to_q`` /
    ``to_k`` / ``to_v`` path also addresses the rows of a fused ``to_qkv`` / ``to_kv``.
    """

    weights: Mapping[str, LoraWeights]
    name: str = "LoRA"
    """Where it came from (a file path), for messages."""

    def components(self) -> list[str]:
        return sorted({key.partition(".")[0] for key in self.weights})


# ---------------------------------------------------------------- layers


class LowRank(nn.Module):
    """The side path ``scaling * up(down(x))`` of one LoRA on one layer.

    The matrices are non-persistent buffers: they move with ``.to()`` but a state dict of
    the adapted network holds only the base layer's tensors. ``conv`` holds the base
    convolution's stride, padding and dilation (``down`` convolves like the layer, ``up`` is
    1x1, as PEFT's and kohya's conv LoRAs do); None for a linear layer.
    """

    def __init__(
        self,
        down: Tensor,
        up: Tensor,
        scaling: float,
        conv: tuple[Any, Any, Any] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.scaling = scaling
        self.conv = conv

    down: Tensor
    up: Tensor

    def forward(self, x: Tensor) -> Tensor:
        # The order of PEFT's `result + lora_B(lora_A(x)) * scaling`, so an unfused LoRA
        # rounds as diffusers' does.
        down, up = self.down, self.up
        if self.conv is None:
            out = F.linear(F.linear(x, down), up)
        else:
            stride, padding, dilation = self.conv
            out = F.conv2d(F.conv2d(x, down, None, stride, padding, dilation), up)
        return out * self.scaling


class LoraLinear(nn.Linear):
    """A linear layer with LoRA side paths: ``F.linear(x, W, b) + sum(adapter(x))``.

    Made by `apply_lora` from an existing layer (its own weight tensors, not copies), never
    constructed directly; ``adapters`` holds one `LowRank` per stacked LoRA.
    """

    adapters: nn.ModuleList

    def forward(self, input: Tensor) -> Tensor:
        out = F.linear(input, self.weight, self.bias)
        for adapter in self.adapters:
            out = out + adapter(input)
        return out


class LoraConv2d(Conv2d):
    """latentkit's `Conv2d` (its ``gemm`` setting kept) with LoRA side paths; see `LoraLinear`."""

    adapters: nn.ModuleList

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        for adapter in self.adapters:
            out = out + adapter(input)
        return out


# ---------------------------------------------------------------- targets in a network


@dataclass(frozen=True)
class _Target:
    """Where one LoRA module acts: the layer at ``leaf`` (output ``rows`` of it, for q/k/v
    fused into one layer), with the layer's input width and kernel."""

    leaf: str
    layer: nn.Linear | nn.Conv2d
    rows: tuple[int, int] | None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.layer, nn.Conv2d)

    @property
    def in_features(self) -> int:
        layer = self.layer
        return int(layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features)

    @property
    def out_features(self) -> int:
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        layer = self.layer
        return int(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)

    @property
    def kernel(self) -> tuple[int, ...]:
        layer = self.layer
        return tuple(layer.kernel_size) if isinstance(layer, nn.Conv2d) else ()


class _Targets:
    """The layers of one network a LoRA may adapt, under every name a file may use.

    ``paths``: module path → target (virtual ``to_q``/``to_k``/``to_v`` for fused attention
    included). ``kohya``: the path with ``.`` as ``_`` → module path, for our names and, for
    a UNet, the original ``sgm`` block names (kohya SDXL). ``keys`` maps a dotted name in
    another spelling (original block names, CLIP without ``text_model.``) to ours.
    """

    def __init__(self, root: nn.Module, keys: KeyMap | None) -> None:
        self.keys = keys
        self.paths: dict[str, _Target] = {}
        for path, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                self.paths[path] = _Target(path, module, None)
            if isinstance(module, Attention):
                self._fused(path, module)
        # Our names canonical: a transformers 5 CLIPTextModel has no `text_model.` level.
        self.canonical: dict[str, str] = {}
        for path in self.paths:
            self.canonical.setdefault(self._canonical(path), path)
        self.kohya: dict[str, str | None] = {}
        for canonical, path in self.canonical.items():
            names = [canonical]
            if keys is not None and (original := keys.original(canonical)) is not None:
                names.append(original)
            for name in names:
                flat = name.replace(".", "_")
                # Two modules with one flattened name cannot be told apart: neither matches.
                self.kohya[flat] = path if self.kohya.get(flat, path) == path else None

    def _fused(self, path: str, attention: Attention) -> None:
        prefix = f"{path}." if path else ""
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            layer = getattr(attention, fused, None)
            if not isinstance(layer, nn.Linear):
                continue
            width = layer.out_features // len(parts)
            for i, part in enumerate(parts):
                self.paths[prefix + part] = _Target(
                    prefix + fused, layer, (i * width, (i + 1) * width)
                )

    def _canonical(self, name: str) -> str:
        if self.keys is not None:
            renamed = self.keys.ours(name)
            if renamed:
                return renamed[0]
        return name

    def find(self, name: str, *, flattened: bool) -> str | None:
        """The module path a file's name for a module means, or None."""
        if flattened:
            return self.kohya.get(name)
        if name in self.paths:
            return name
        return self.canonical.get(self._canonical(name))


def _unet_layout(unet: nn.Module) -> UNetLayout | None:
    from latentkit.models.unet import UNetConfig

    config = getattr(unet, "config", None)
    if isinstance(config, UNetConfig):
        return UNetLayout.from_config(config)
    if isinstance(config, Mapping):  # a diffusers model's FrozenDict
        try:
            return UNetLayout.from_config(UNetConfig.from_dict(config))
        except (InvalidArgumentError, UnsupportedModelError):
            return None
    return None


def _targets(component: str, root: nn.Module) -> _Targets:
    if component == "unet":
        layout = _unet_layout(root)
        return _Targets(root, None if layout is None else unet_keys(layout))
    return _Targets(root, clip_keys())


# ---------------------------------------------------------------- reading


@dataclass
class _Parts:
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    key: str = ""
    """The file's down key, for messages."""


def _split_key(key: str) -> tuple[str, str, bool, str] | None:
    """``(component, module name, flattened, part)`` of a LoRA key, or None for another key."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, part = key.partition(".")
            kind = KOHYA_PARTS.get(part)
            return None if kind is None else (component, name[len(prefix) :], True, kind)
    for suffix, kind in DIFFUSERS_SUFFIXES.items():
        if not key.endswith(suffix):
            continue
        path = key[: -len(suffix)]
        path = path.removeprefix("base_model.model.")  # PEFT's own save_pretrained
        component, _, rest = path.partition(".")
        if component not in COMPONENTS:
            component, rest = "unet", path  # a UNet's own LoRA state dict, unprefixed
        if suffix in (".down.weight", ".up.weight"):
            old = OLD_DIFFUSERS_MODULES["unet" if component == "unet" else "text"]
            match = next((o for o in old if rest == o or rest.endswith("." + o)), None)
            if match is None:
                return None
            rest = rest[: len(rest) - len(match)] + old[match]
        return component, rest, False, kind
    return None


def _unsupported(keys: Iterable[str]) -> str | None:
    for key in keys:
        for pattern, kind in UNSUPPORTED_KINDS:
            if pattern.search(key):
                return f"{kind} (key {key!r})"
    return None


def _peft_alpha(
    config: Mapping[str, Any], component: str, path: str, rank: int
) -> tuple[float | None, bool]:
    """PEFT's alpha for module ``path`` of ``component`` from diffusers' metadata, as
    ``(alpha, dora)``: ``alpha_pattern`` first (PEFT's ``(.*\\.)?(pattern)$`` match), else
    ``lora_alpha``; with ``use_rslora`` the factor is ``alpha / sqrt(rank)``, returned as the
    alpha that gives it over ``rank``."""
    if not config:
        return None, False

    def get(name: str) -> Any:
        return config.get(f"{component}.{name}")

    alpha = get("lora_alpha")
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    if alpha is None:
        return None, bool(get("use_dora"))
    value = float(alpha)
    if get("use_rslora"):
        value = value * rank / math.sqrt(rank)
    return value, bool(get("use_dora"))


def _conform(parts: _Parts, target: _Target) -> tuple[Tensor, Tensor] | str:
    """The down and up matrices shaped for ``target`` (a 1x1 kernel either way round), or
    the reason they do not fit it."""
    down, up = parts.down, parts.up
    assert down is not None and up is not None
    rank = down.shape[0]
    if target.is_conv:
        kernel = target.kernel
        # A 1x1 convolution's LoRA may be stored as matrices (and a linear layer's as 1x1 kernels).
        down = down[:, :, None, None] if down.ndim == 2 else down
        up = up[:, :, None, None] if up.ndim == 2 else up
        expected_down: tuple[int, ...] = (rank, target.in_features, *kernel)
        expected_up: tuple[int, ...] = (target.out_features, rank, 1, 1)
    else:
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down = down[:, :, 0, 0]
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up[:, :, 0, 0]
        expected_down, expected_up = (rank, target.in_features), (target.out_features, rank)
    if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        return (
            f"down {tuple(parts.down.shape)} / up {tuple(parts.up.shape)} for a layer "  # type: ignore[union-attr]
            f"that needs {expected_down} / {expected_up}"
        )
    return down, up


def lora_from_state_dict(
    state: Mapping[str, Any],
    *,
    modules: Mapping[str, nn.Module | None],
    metadata: Mapping[str, str] | None = None,
    name: str = "LoRA",
) -> Lora:
    """Read a LoRA state dict of any dialect (see the module docstring) against the networks
    ``modules`` (``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}``; a missing or
    None entry is a component the pipeline lacks).

    Raises, before anything is applied: `AdapterMismatchError` (with ``matched`` and
    ``total``) when a module of a component the pipeline has is not found or has another
    shape, or when the file holds no LoRA weights (made for another architecture: an SDXL
    LoRA on SD 1.5, a checkpoint that is not a LoRA); `UnsupportedModelError` for adapter
    kinds latentkit does not implement (DoRA, LoHa, LoKr, ...). Modules for a component the
    pipeline does not have are left out with a `PartialAdapterWarning` listing them.
    """
    unsupported = _unsupported(state)
    if unsupported is not None:
        raise UnsupportedModelError(f"{name}: latentkit does not implement {unsupported}")
    peft = metadata_json(metadata or {}, "lora_adapter_metadata")
    groups: dict[tuple[str, str, bool], _Parts] = {}
    other: list[str] = []
    for key, value in state.items():
        split = _split_key(key) if isinstance(value, Tensor) else None
        if split is None:
            other.append(key)
            continue
        component, module, flattened, kind = split
        parts = groups.setdefault((component, module, flattened), _Parts())
        if kind == "alpha":
            parts.alpha = float(value.item())
        elif kind == "down":
            parts.down, parts.key = value, key
        else:
            parts.up = value
    incomplete = [m for (_, m, _), p in groups.items() if p.down is None or p.up is None]
    if incomplete:
        raise WeightMismatchError(
            f"{name}: {len(incomplete)} LoRA modules lack a down or up matrix: "
            + ", ".join(incomplete[:5])
        )
    total = len(groups)
    if not groups:
        raise AdapterMismatchError(
            f"{name}: no LoRA weights (0 of {len(other)} tensors matched any LoRA dialect: "
            f"{', '.join(other[:5]) or 'the file is empty'}); it is not a LoRA file",
            matched=0,
            total=0,
        )
    targets: dict[str, _Targets] = {}
    weights: dict[str, LoraWeights] = {}
    absent: dict[str, list[str]] = {}
    missing: list[str] = []
    misfit: list[str] = []
    for (component, module, flattened), parts in groups.items():
        root = modules.get(component)
        spelled = parts.key.rsplit(".", 2)[0] if flattened else f"{component}.{module}"
        if root is None:
            absent.setdefault(component, []).append(spelled)
            continue
        if component not in targets:
            targets[component] = _targets(component, root)
        path = targets[component].find(module, flattened=flattened)
        target = None if path is None else targets[component].paths[path]
        if path is None or target is None:
            missing.append(spelled)
            continue
        conformed = _conform(parts, target)
        if isinstance(conformed, str):
            misfit.append(f"{spelled}: {conformed}")
            continue
        down, up = conformed
        alpha = parts.alpha
        if alpha is None and not flattened:
            alpha, dora = _peft_alpha(peft, component, module, int(down.shape[0]))
            if dora:
                raise UnsupportedModelError(f"{name}: latentkit does not implement DoRA")
        key = f"{component}.{path}"
        if key in weights:
            raise WeightMismatchError(f"{name}: two LoRA weights for {key} (in two spellings)")
        weights[key] = LoraWeights(down=down, up=up, alpha=alpha)
    matched = len(weights)
    present_total = total - sum(len(v) for v in absent.values())
    if missing or misfit or other or not weights:
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} name modules the pipeline lacks (" + ", ".join(missing[:5]) + ")"
            )
        if misfit:
            problems.append(f"{len(misfit)} have other shapes (" + "; ".join(misfit[:3]) + ")")
        if other:
            problems.append(
                f"{len(other)} tensors are not LoRA weights (" + ", ".join(other[:5]) + ")"
            )
        if not weights and absent:
            problems.append("every module is for a network the pipeline does not have")
        raise AdapterMismatchError(
            f"{name}: {matched} of {present_total} LoRA modules match this pipeline"
            + (f" ({total} in the file)" if present_total != total else "")
            + ": "
            + "; ".join(problems)
            + ". It was probably made for another architecture (e.g. SDXL vs SD 1.x/2.x)",
            matched=matched,
            total=total,
        )
    if absent:
        listed = "; ".join(
            f"{c}: {len(v)} modules ({', '.join(v[:5])}{', ...' if len(v) > 5 else ''})"
            for c, v in sorted(absent.items())
        )
        warnings.warn(
            f"{name}: left out the LoRA modules for networks this pipeline does not have "
            f"({matched} of {total} applied): {listed}",
            PartialAdapterWarning,
            stacklevel=3,
        )
    return Lora(weights=weights, name=name)


def load_lora(
    source: str | os.PathLike[str],
    *,
    modules: Mapping[str, nn.Module | None],
    weight_name: str | None = None,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Lora:
    """Read the LoRA at ``source`` (a file, a folder, or a Hub repo id) for ``modules``.

    A folder or repo is read from ``weight_name``, else ``pytorch_lora_weights.safetensors``,
    else its only safetensors file. See `lora_from_state_dict` for the errors and warnings.

    >>> lora = load_lora("my_lora.safetensors", modules={"unet": unet})  # doctest: +SKIP
    >>> adapted = apply_lora({"unet": unet}, lora, scale=0.8)  # doctest: +SKIP
    """
    path = find_adapter_file(
        source,
        weight_name=weight_name,
        default_names=DEFAULT_WEIGHT_NAMES,
        allow_pickle=allow_pickle,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )
    read = read_adapter_file(path)
    return lora_from_state_dict(read.state, modules=modules, metadata=read.metadata, name=str(path))


# ---------------------------------------------------------------- applying


def apply_lora(
    modules: Mapping[str, nn.Module | None],
    lora: Lora | Sequence[Lora],
    *,
    scale: float | Sequence[float] = 1.0,
    fuse: bool = False,
) -> dict[str, nn.Module | None]:
    """New networks with ``lora`` applied at ``scale``: ``W + scale * alpha/rank * up @ down``.

    ``modules`` maps component names to networks; the result has the same keys, each
    network either the given object (no LoRA module in it) or a new tree sharing every
    unchanged module and parameter with it. The given networks are never modified.
    Several LoRAs (with one scale each) apply in order, as applying them one at a time does.

    Unfused (default), adapted layers get a side path (`LoraLinear`, `LoraConv2d`) and no
    weight is copied; ``fuse=True`` adds the change into a private copy of each adapted
    weight instead (same outputs up to float rounding).
    Raises `AdapterMismatchError` if a module of ``lora`` is not in ``modules`` or has
    another shape (a `Lora` is read for given networks: see `load_lora`).
    """
    loras = [lora] if isinstance(lora, Lora) else list(lora)
    scales = [float(scale)] * len(loras) if isinstance(scale, (int, float)) else list(scale)
    if len(scales) != len(loras):
        raise InvalidArgumentError(
            f"{len(loras)} LoRAs need {len(loras)} scales, got {len(scales)}"
        )
    result = dict(modules)
    for one, factor in zip(loras, scales, strict=True):
        result = _apply_one(result, one, factor, fuse)
    return result


def _apply_one(
    modules: dict[str, nn.Module | None], lora: Lora, scale: float, fuse: bool
) -> dict[str, nn.Module | None]:
    by_component: dict[str, list[tuple[str, LoraWeights]]] = {}
    for key, weights in lora.weights.items():
        component, _, path = key.partition(".")
        by_component.setdefault(component, []).append((path, weights))
    # Resolve and check everything first: nothing is built for a LoRA that does not fit.
    plans: dict[str, dict[str, list[tuple[_Target, LoraWeights]]]] = {}
    problems: list[str] = []
    for component, entries in by_component.items():
        root = modules.get(component)
        if root is None:
            problems += [f"{component}.{p} (no {component})" for p, _ in entries]
            continue
        targets = _targets(component, root)
        leaves = plans.setdefault(component, {})
        for path, weights in entries:
            target = targets.paths.get(path)
            if target is None:
                problems.append(f"{component}.{path} (no such layer)")
                continue
            fits = _conform(_Parts(weights.down, weights.up), target)
            if isinstance(fits, str):
                problems.append(f"{component}.{path}: {fits}")
                continue
            leaves.setdefault(target.leaf, []).append((target, weights))
    if problems:
        total = len(lora.weights)
        raise AdapterMismatchError(
            f"{lora.name}: {total - len(problems)} of {total} LoRA modules fit these networks: "
            + ", ".join(problems[:5]),
            matched=total - len(problems),
            total=total,
        )
    result = dict(modules)
    for component, leaves in plans.items():
        root = modules[component]
        assert root is not None
        replacements = {
            leaf: _adapted(entries[0][0].layer, entries, scale, fuse)
            for leaf, entries in leaves.items()
        }
        result[component] = replace_modules(root, replacements)
    return result


def _adapted(
    layer: nn.Module, entries: list[tuple[_Target, LoraWeights]], scale: float, fuse: bool
) -> nn.Module:
    """A new layer for ``layer`` with the LoRAs of ``entries`` (several when q, k and v of a
    fused projection are adapted); ``layer`` itself is left unchanged."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise InvalidArgumentError(
            f"LoRA adapts linear and convolution layers, not {type(layer).__name__}"
        )
    weight = layer.weight
    if fuse:
        merged = weight.detach().float().clone()
        for target, w in entries:
            delta = w.delta().to(merged.device) * scale
            if target.rows is None:
                merged += delta
            else:
                merged[target.rows[0] : target.rows[1]] += delta
        new = shallow_copy(layer)
        new.weight = nn.Parameter(merged.to(weight.dtype), requires_grad=weight.requires_grad)
        return new
    conv = None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise UnsupportedModelError(
                f"LoRA on a grouped or {layer.padding_mode}-padded convolution is not supported"
            )
        conv = (layer.stride, layer.padding, layer.dilation)
    side = []
    for target, w in entries:
        down, up = w.down.to(weight), w.up.to(weight)
        if target.rows is not None:
            # Rows of a fused q/k/v layer: the other rows' up matrix is zero.
            full = up.new_zeros(weight.shape[0], *up.shape[1:])
            full[target.rows[0] : target.rows[1]] = up
            up = full
        side.append(LowRank(down, up, w.scaling * scale, conv))
    cls: type[nn.Module] = LoraConv2d if isinstance(layer, nn.Conv2d) else LoraLinear
    new = shallow_copy(layer, cls)
    if isinstance(layer, nn.Conv2d) and "gemm" not in new.__dict__:
        new.__dict__["gemm"] = False  # a torch Conv2d, not latentkit's: the direct kernel
    existing = list(layer.adapters) if isinstance(layer, (LoraLinear, LoraConv2d)) else []
    new.adapters = nn.ModuleList([*existing, *side])
    return new
