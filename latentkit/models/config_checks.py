"""Type and range checks of the values in a model's config files, in one place.

Each model config's ``from_dict`` (and `latentkit.loading.ModelFiles.config`, which reads
the files) calls `check_config` before it converts a single value, so a config that parses
but holds an absurd value (``block_out_channels: [0]``, ``norm_eps: -1``,
``scaling_factor: 0``, ``"attention_head_dim": "8"``, a token id beyond the vocabulary)
raises `InvalidConfigError` naming the file, the key and what would be valid, at load time,
instead of a ``TypeError`` from ``int(None)``, a ``ZeroDivisionError`` while the network is
built or an ``IndexError`` at generation time.

Only the keys listed here are checked; a key a config leaves out takes the model's default
(diffusers' and transformers' own) and a key not listed is left to ``from_dict``, which
refuses the settings latentkit does not implement (`UnsupportedModelError`). The ranges are
wide enough for every published Stable Diffusion 1.x/2.x/XL model and narrow enough that no
value in them makes latentkit allocate more than the weights file holds.
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from latentkit.errors import InvalidConfigError

ConfigKind = Literal["unet", "vae", "text_encoder", "scheduler"]

MAX_CHANNELS = 65_536
"""Most channels of any layer (SD's widest is 1280; SDXL's vector input 2816)."""
MAX_BLOCKS = 16
"""Most resolution levels of a UNet or autoencoder (SD has 4)."""
MAX_LAYERS = 256
"""Most layers of one kind in a block or encoder (SDXL's deepest block has 10 transformers)."""
MAX_HEADS = 4096
MAX_VOCABULARY = 2**24
"""Most tokens a text encoder's embedding table may have (CLIP has 49,408)."""
MAX_POSITIONS = 65_536
MAX_LATENT_SIDE = 16_384
"""Largest ``sample_size`` (latent pixels a side) a config may name."""
MAX_TRAIN_TIMESTEPS = 1_000_000


@dataclass(frozen=True)
class Rule:
    """What a config value must be: ``accepts(value)`` is true, described as ``valid``."""

    valid: str
    accepts: Callable[[Any], bool]
    """Called with any JSON value (hence ``Any``): checks its type before using it."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _list(value: object) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    return isinstance(value, (list, tuple))


def integer(low: int, high: int, *, optional: bool = False) -> Rule:
    """An int in ``[low, high]`` (JSON's ``true`` is not one), or None when ``optional``."""
    return Rule(
        f"an int from {low} to {high}" + (" or null" if optional else ""),
        lambda v: (optional and v is None) or (_is_int(v) and low <= v <= high),
    )


def integers(low: int, high: int, *, scalar: bool = False, nested: bool = False) -> Rule:
    """A non-empty list of at most `MAX_BLOCKS` ints in ``[low, high]`` (one per block);
    with ``scalar``, one such int for every block is also accepted; with ``nested``, each
    entry may itself be such a list (a per-layer setting)."""
    one = integer(low, high)

    def entry(v: object) -> bool:
        return one.accepts(v) or (
            nested and _list(v) and 0 < len(v) <= MAX_LAYERS and all(map(one.accepts, v))
        )

    return Rule(
        ("an int, or " if scalar else "")
        + f"a list of 1 to {MAX_BLOCKS} ints from {low} to {high}"
        + (" (or lists of them)" if nested else ""),
        lambda v: (
            (scalar and one.accepts(v))
            or (_list(v) and 0 < len(v) <= MAX_BLOCKS and all(map(entry, v)))
        ),
    )


def real(low: float, high: float, *, low_open: bool = False, optional: bool = False) -> Rule:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    left = "(" if low_open else "["

    def accepts(v: Any) -> bool:
        if optional and v is None:
            return True
        if not _is_real(v):
            return False
        x = float(v)
        return (low < x if low_open else low <= x) and x <= high

    return Rule(
        f"a finite number in {left}{low:g}, {high:g}]" + (" or null" if optional else ""), accepts
    )


def boolean() -> Rule:
    """A flag; null reads as false (published configs write ``"upcast_attention": null``)."""
    return Rule("true, false or null", lambda v: v is None or isinstance(v, bool))


def text(*, optional: bool = False) -> Rule:
    return Rule(
        "a string" + (" or null" if optional else ""),
        lambda v: isinstance(v, str) or (optional and v is None),
    )


def strings() -> Rule:
    return Rule(
        f"a list of 1 to {MAX_BLOCKS} strings",
        lambda v: _list(v) and 0 < len(v) <= MAX_BLOCKS and all(isinstance(s, str) for s in v),
    )


def side(*, optional: bool) -> Rule:
    """``sample_size``: one side, or (height, width)."""
    one = integer(1, MAX_LATENT_SIDE)
    return Rule(
        f"an int from 1 to {MAX_LATENT_SIDE}, or a pair of them"
        + (", or null" if optional else ""),
        lambda v: (
            (optional and v is None)
            or one.accepts(v)
            or (_list(v) and len(v) == 2 and all(map(one.accepts, v)))
        ),
    )


_CHANNELS = integer(1, MAX_CHANNELS)
_EPS = real(0, 1, low_open=True)
_BETA = real(0, 1, low_open=True)

RULES: Mapping[ConfigKind, Mapping[str, Rule]] = {
    "unet": {
        "in_channels": _CHANNELS,
        "out_channels": _CHANNELS,
        "block_out_channels": integers(1, MAX_CHANNELS),
        "layers_per_block": integers(1, MAX_LAYERS, scalar=True),
        "down_block_types": strings(),
        "up_block_types": strings(),
        # The number of heads, under either name (see `UNetConfig.from_dict`).
        "attention_head_dim": Rule(
            f"an int from 1 to {MAX_HEADS}, or a list of them (one per block), or null",
            lambda v: v is None or integers(1, MAX_HEADS, scalar=True).accepts(v),
        ),
        "num_attention_heads": Rule(
            f"an int from 1 to {MAX_HEADS}, or a list of them (one per block), or null",
            lambda v: v is None or integers(1, MAX_HEADS, scalar=True).accepts(v),
        ),
        "cross_attention_dim": integers(1, MAX_CHANNELS, scalar=True),
        "transformer_layers_per_block": integers(1, MAX_LAYERS, scalar=True, nested=True),
        "use_linear_projection": boolean(),
        "upcast_attention": boolean(),
        "norm_num_groups": integer(1, MAX_CHANNELS, optional=True),
        "norm_eps": _EPS,
        "flip_sin_to_cos": boolean(),
        "freq_shift": real(-1e6, 1e6),
        "downsample_padding": integer(0, 16),
        "mid_block_scale_factor": real(0, 1e6, low_open=True),
        "dropout": real(0, 1),
        "sample_size": side(optional=True),
        "addition_embed_type": text(optional=True),
        "addition_time_embed_dim": integer(1, MAX_CHANNELS, optional=True),
        "projection_class_embeddings_input_dim": integer(1, 16 * MAX_CHANNELS, optional=True),
        # The x4 upscaler's noise-level embedding (1000 classes) and per-block attention kind.
        "num_class_embeds": integer(1, MAX_TRAIN_TIMESTEPS, optional=True),
        "only_cross_attention": Rule(
            f"true, false, or a list of 1 to {MAX_BLOCKS} of them (one per block)",
            lambda v: (
                isinstance(v, bool)
                or (_list(v) and 0 < len(v) <= MAX_BLOCKS and all(isinstance(b, bool) for b in v))
            ),
        ),
    },
    "vae": {
        "in_channels": _CHANNELS,
        "out_channels": _CHANNELS,
        "block_out_channels": integers(1, MAX_CHANNELS),
        "layers_per_block": integer(1, MAX_LAYERS),
        "down_block_types": strings(),
        "up_block_types": strings(),
        "latent_channels": _CHANNELS,
        "norm_num_groups": integer(1, MAX_CHANNELS),
        "sample_size": side(optional=False),
        "scaling_factor": real(0, 1e6, low_open=True),
        "use_quant_conv": boolean(),
        "use_post_quant_conv": boolean(),
        "mid_block_add_attention": boolean(),
        "force_upcast": boolean(),
    },
    "text_encoder": {
        "vocab_size": integer(1, MAX_VOCABULARY),
        "hidden_size": _CHANNELS,
        "intermediate_size": integer(1, 16 * MAX_CHANNELS),
        "num_hidden_layers": integer(1, MAX_LAYERS),
        "num_attention_heads": integer(1, MAX_HEADS),
        "max_position_embeddings": integer(1, MAX_POSITIONS),
        "hidden_act": text(),
        "layer_norm_eps": _EPS,
        "bos_token_id": integer(0, MAX_VOCABULARY - 1),
        "eos_token_id": integer(0, MAX_VOCABULARY - 1),
        "pad_token_id": integer(0, MAX_VOCABULARY - 1),
        "projection_dim": integer(1, MAX_CHANNELS, optional=True),
        "use_attention_mask": boolean(),
        "model_type": text(),
    },
    "scheduler": {
        "num_train_timesteps": integer(2, MAX_TRAIN_TIMESTEPS),
        "beta_start": _BETA,
        "beta_end": _BETA,
        "beta_schedule": text(),
        "steps_offset": integer(0, MAX_TRAIN_TIMESTEPS - 1),
        "prediction_type": text(),
        "timestep_spacing": text(),
        "clip_sample": boolean(),
        "clip_sample_range": real(0, 1e6, low_open=True),
        "set_alpha_to_one": boolean(),
        "rescale_betas_zero_snr": boolean(),
        "trained_betas": Rule(
            f"null, or a list of 2 to {MAX_TRAIN_TIMESTEPS} numbers in (0, 1)",
            lambda v: (
                v is None
                or (_list(v) and 2 <= len(v) <= MAX_TRAIN_TIMESTEPS and all(map(_BETA.accepts, v)))
            ),
        ),
    },
}
"""Per config kind, the keys checked and what each must be."""

_DEFAULTS: Mapping[ConfigKind, Mapping[str, object]] = {
    # diffusers' and transformers' defaults for the keys the cross-checks below read.
    "unet": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "norm_num_groups": 32,
        "attention_head_dim": 8,
    },
    "vae": {"block_out_channels": (64,), "norm_num_groups": 32},
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 512,
        "num_attention_heads": 8,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    },
    "scheduler": {"num_train_timesteps": 1000, "steps_offset": 0},
}


def check_config(
    kind: ConfigKind,
    config: object,
    *,
    source: str | os.PathLike[str] | None = None,
) -> Mapping[str, Any]:
    """Check the values of a ``kind`` config (the parsed JSON of its file) and return it.

    Raises `InvalidConfigError` naming ``source`` (the file; the kind of config when None),
    the key, the value and what would be valid: for a config that is not a JSON object, a
    value of the wrong type or out of range (`RULES`), per-block lists whose lengths differ
    from ``block_out_channels``, channels that ``norm_num_groups`` or the head count does
    not divide (a ``GroupNorm`` or an attention reshape would fail), and token ids that are
    not in the vocabulary (the embedding lookup would fail at generation time).
    """
    where = (
        os.fspath(source)
        if source is not None
        else {
            "unet": "UNet",
            "vae": "VAE",
            "text_encoder": "text encoder",
            "scheduler": "scheduler",
        }[kind]
        + " config"
    )

    def fail(message: str) -> InvalidConfigError:
        return InvalidConfigError(f"{where}: {message}", path=source)

    if not isinstance(config, Mapping):
        raise fail(f"must be a JSON object, got {type(config).__name__}")
    if not all(isinstance(k, str) for k in config):
        raise fail("its keys must be strings")
    for key, rule in RULES[kind].items():
        if key in config and not rule.accepts(config[key]):
            raise fail(f"{key}={_show(config[key])} is invalid; it must be {rule.valid}")

    def get(key: str) -> Any:
        return config.get(key, _DEFAULTS[kind].get(key))

    # Per-block lists must have one entry per block_out_channels entry.
    channels: Sequence[int] = get("block_out_channels") or ()
    if kind in ("unet", "vae"):
        keys = ("down_block_types", "up_block_types", "layers_per_block")
        more = ("transformer_layers_per_block", "only_cross_attention", heads_key(config))
        for key in (*keys, *more):
            value = config.get(key)
            if _list(value) and len(value) != len(channels):
                raise fail(
                    f"{key} has {len(value)} entries but block_out_channels has {len(channels)}; "
                    "give one per block"
                )
        groups = get("norm_num_groups")
        for i, c in enumerate(channels):
            if groups is not None and c % groups:
                raise fail(
                    f"block_out_channels[{i}]={c} is not a multiple of norm_num_groups={groups} "
                    "(group normalization splits the channels into equal groups)"
                )
    if kind == "unet":
        key = heads_key(config)
        heads, kinds = get(key), list(get("down_block_types"))
        if heads is not None and len(kinds) == len(channels):
            per_block = list(heads) if _list(heads) else [heads] * len(channels)
            # The attention blocks, and the mid block (the last level's width and heads).
            attended = [i for i, k in enumerate(kinds) if "CrossAttn" in str(k)]
            for i in sorted({*attended, len(channels) - 1}):
                if channels[i] % per_block[i]:
                    raise fail(
                        f"block_out_channels[{i}]={channels[i]} is not a multiple of "
                        f"{key}[{i}]={per_block[i]} (each attention head is channels / heads "
                        "wide)"
                    )
    if kind == "text_encoder":
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        if hidden % heads:
            raise fail(
                f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                "(each attention head is hidden_size / heads wide)"
            )
        vocabulary = get("vocab_size")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if get(key) >= vocabulary:
                raise fail(
                    f"{key}={get(key)} is not in the vocabulary; it must be below "
                    f"vocab_size={vocabulary}"
                )
    if kind == "scheduler":
        steps = get("num_train_timesteps")
        if get("steps_offset") >= steps:
            raise fail(
                f"steps_offset={get('steps_offset')} must be below num_train_timesteps={steps}"
            )
        betas = config.get("trained_betas")
        if betas is not None and len(betas) != steps:
            raise fail(
                f"trained_betas has {len(betas)} values but num_train_timesteps is {steps}; "
                "give one beta per training step"
            )
    return config


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 4, 60, 60


def heads_key(config: Mapping[str, Any]) -> str:
    """The key a UNet config gives its head counts under: diffusers reads
    ``num_attention_heads`` when it is set, else the misnamed ``attention_head_dim``."""
    return "num_attention_heads" if config.get("num_attention_heads") else "attention_head_dim"


def _show(value: object) -> str:
    """A short ``repr`` of a config value: a hostile config may hold megabytes, or lists
    nested deeper than ``repr`` can recurse."""
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a self-containing list
        return f"<a {type(value).__name__}>"
