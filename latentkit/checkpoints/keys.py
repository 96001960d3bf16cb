"""Every key map between the original single-file checkpoints and latentkit's modules, as data.

Stable Diffusion's original checkpoints (CompVis ``ldm`` for SD 1.x/2.x, Stability's ``sgm``
for SDXL, as A1111 and ComfyUI save them) name the same tensors differently from diffusers:
``model.diffusion_model.input_blocks.1.0.in_layers.0.weight`` is the UNet's
``down_blocks.0.resnets.0.norm1.weight``. latentkit's module paths equal the diffusers /
transformers state-dict keys, so "diffusers names" are ours.

A map is a list of `Rule`\\ s, each pairing an original key prefix with ours (at a ``.``
boundary), built from the block layout of a config (`UNetLayout`, `VAELayout`,
`OpenCLIPLayout`): the rules *are* the data, and every direction uses the same ones.
`convert` streams an original state dict into ours, `to_original` streams ours back,
`detect_layout` reads the family and layout off a file's keys and shapes, and LoRA files
with original block names (kohya SDXL) are read through the same `KeyMap`
(`latentkit.adapters.lora`).

The layout rules, in words (Rombach et al. 2022's UNet as ``ldm``/``sgm`` build it):

- UNet: ``input_blocks.0.0`` is ``conv_in``; down level ``i`` (of ``n``) with ``L`` layers
  fills ``input_blocks.1+i(L+1)+j`` with ``.0`` a ResNet and ``.1`` its transformer, and
  ``input_blocks.1+i(L+1)+L.0.op`` with the downsampler (all levels but the last);
  ``middle_block.{0,1,2}`` are ResNet, transformer, ResNet; up level ``i`` fills
  ``output_blocks.i(L+1)+j`` (``j <= L``) with ``.0`` a ResNet, ``.1`` its transformer and,
  after the last layer, ``.1.conv`` or ``.2.conv`` (after a transformer) the upsampler;
  ``time_embed.{0,2}``, ``label_emb.0.{0,2}`` (SDXL's vector), ``out.{0,2}`` the rest.
  Inside a ResNet ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}`` and
  ``skip_connection`` are ``norm1``/``conv1``, ``time_emb_proj``, ``norm2``/``conv2`` and
  ``conv_shortcut``; transformer insides have the same names in both.
- VAE (``first_stage_model``): ``down.i.block.j`` / ``down.i.downsample`` are
  ``down_blocks.i.resnets.j`` / ``downsamplers.0``; the decoder's ``up.k`` is numbered from
  the bottom, so ``up.(n-1-i)`` is ``up_blocks.i``; ``mid.block_1``, ``mid.attn_1``,
  ``mid.block_2`` are the mid block's; the attention's 1x1 convolutions ``q``, ``k``, ``v``,
  ``proj_out`` are the linear ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; ``nin_shortcut``
  is ``conv_shortcut``, ``norm_out`` ``conv_norm_out``.
- CLIP ViT-L (``cond_stage_model.transformer``, SDXL ``conditioner.embedders.0.transformer``):
  transformers' own keys under a prefix.
- OpenCLIP (``cond_stage_model.model`` for SD 2.x, ``conditioner.embedders.1.model`` for
  SDXL, ``conditioner.embedders.0.model`` for its refiner): ``transformer.resblocks.i`` are
  ``text_model.encoder.layers.i``, with ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``,
  ``attn.out_proj`` as ``layer_norm1``/``layer_norm2``, ``mlp.fc1``/``mlp.fc2``,
  ``self_attn.out_proj``; the fused ``attn.in_proj_weight``/``_bias`` rows are q, k, v
  stacked; ``text_projection`` (``x @ P``) is the transpose of a linear layer's weight;
  ``positional_embedding`` and ``ln_final`` are the position embedding and final norm. SD 2.x
  uses the penultimate layer, so its encoder has one layer fewer than the file (the last
  layer and the projection are dropped).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from latentkit.errors import InvalidArgumentError, UnsupportedModelError, WeightMismatchError

if TYPE_CHECKING:
    from torch import Tensor

    from latentkit.models.autoencoder import AutoencoderKLConfig
    from latentkit.models.unet import UNetConfig

_T = TypeVar("_T")

Family = Literal["sd1", "sd2", "sdxl-base", "sdxl-refiner"]
FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "sdxl-base", "sdxl-refiner")


class Transform(enum.Enum):
    """How a tensor changes between the two layouts (original → ours; the inverse undoes it)."""

    NONE = "none"
    SQUEEZE = "squeeze"
    """A 1x1 convolution's (out, in, 1, 1) weight is a linear layer's (out, in) (VAE attention)."""
    TRANSPOSE = "transpose"
    """OpenCLIP's ``text_projection`` multiplies from the right: ours is its transpose."""
    SPLIT = "split"
    """One fused tensor whose rows are several of ours, stacked in order (OpenCLIP's
    ``in_proj_weight`` = rows of q, k, v)."""


@dataclass(frozen=True)
class Rule:
    """The original key prefix ``original`` is ``ours`` (one prefix, or several for `Transform.SPLIT`).

    Prefixes end at a ``.`` boundary: a rule for ``a.b`` renames ``a.b.weight`` and
    ``a.b.c.weight`` but not ``a.bc``. The longest matching prefix wins. ``ours=()`` marks
    tensors the original format carries that have no place in ours (skipped on purpose).
    ``inverse=False`` marks a second spelling of an original prefix that `to_original` never writes.
    """

    original: str
    ours: tuple[str, ...]
    transform: Transform = Transform.NONE
    inverse: bool = True


def _pairs(rules: Iterable[tuple[str, str]], transform: Transform = Transform.NONE) -> list[Rule]:
    return [Rule(o, (u,), transform) for o, u in rules]


@dataclass(frozen=True)
class KeyMap:
    """One component's rules, relative to its roots (no ``model.diffusion_model.`` / ``unet.``)."""

    rules: tuple[Rule, ...]
    _forward: dict[str, Rule] = field(init=False, repr=False, compare=False)
    _inverse: dict[str, tuple[Rule, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        forward: dict[str, Rule] = {}
        inverse: dict[str, tuple[Rule, int]] = {}
        for rule in self.rules:
            if rule.original in forward:
                raise InvalidArgumentError(f"two rules for the original prefix {rule.original!r}")
            forward[rule.original] = rule
            if rule.inverse:
                for i, ours in enumerate(rule.ours):
                    if ours in inverse:
                        raise InvalidArgumentError(f"two rules for our prefix {ours!r}")
                    inverse[ours] = (rule, i)
        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "_inverse", inverse)

    def lookup(self, original: str) -> tuple[Rule, str] | None:
        """The rule for an original key (or module path) and the rest of the key after its
        prefix (``""`` or ``".weight"``, ...), or None when no rule covers it."""
        return _longest(self._forward, original)

    def ours(self, original: str) -> tuple[str, ...] | None:
        """Our names for an original key or module path (``()``: skipped on purpose; None: unknown).

        >>> unet_keys(UNetLayout(levels=2, layers_per_block=1)).ours("input_blocks.1.0.in_layers.2.weight")
        ('down_blocks.0.resnets.0.conv1.weight',)
        """
        found = self.lookup(original)
        if found is None:
            return None
        rule, rest = found
        return tuple(o + rest for o in rule.ours)

    def original(self, ours: str) -> str | None:
        """The original name of one of our keys or module paths, or None when no rule covers it.
        A key that is one part of a `Transform.SPLIT` tensor names the fused tensor.

        >>> unet_keys(UNetLayout(levels=2, layers_per_block=1)).original("up_blocks.0.upsamplers.0.conv")
        'output_blocks.1.1.conv'
        """
        found = self.inverse_lookup(ours)
        if found is None:
            return None
        rule, rest = found
        return rule.original + rest

    def inverse_lookup(self, ours: str) -> tuple[Rule, str] | None:
        """The rule that makes one of our keys (or module paths), and the rest of the key."""
        found = _longest(self._inverse, ours)
        return None if found is None else (found[0][0], found[1])


def _longest(table: Mapping[str, _T], key: str) -> tuple[_T, str] | None:
    """The entry of the longest prefix of ``key`` (at a ``.`` boundary) and the rest of ``key``."""
    prefix = key
    while True:
        value = table.get(prefix)
        if value is not None:
            return value, key[len(prefix) :]
        cut = prefix.rfind(".")
        if cut < 0:
            return None
        prefix = prefix[:cut]


# ---------------------------------------------------------------- UNet

RESNET_RENAMES: tuple[tuple[str, str], ...] = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
"""A UNet ResNet block's parts: original name, ours (``in_layers.1`` is the SiLU, ``.3`` dropout)."""


@dataclass(frozen=True)
class UNetLayout:
    """What the UNet's key names depend on: levels, ResNets per level, where the transformers are.

    ``down_attention[i]`` / ``up_attention[i]``: whether down / up level ``i`` (diffusers'
    order) has a transformer after each ResNet; the mid block always has one. ``vector``:
    whether the UNet has SDXL's vector embedding (``label_emb``).
    """

    levels: int
    layers_per_block: int
    down_attention: tuple[bool, ...] = ()
    up_attention: tuple[bool, ...] = ()
    vector: bool = False

    def __post_init__(self) -> None:
        if self.levels < 1 or self.layers_per_block < 1:
            raise InvalidArgumentError(
                f"a UNet layout needs at least one level and one layer, got {self.levels} and "
                f"{self.layers_per_block}"
            )
        # Unset: SD 1.x/2.x's pattern, a transformer on every level but the lowest.
        default = tuple(i < self.levels - 1 for i in range(self.levels))
        for name, value in (("down_attention", default), ("up_attention", default[::-1])):
            given = getattr(self, name)
            if not given:
                object.__setattr__(self, name, value)
            elif len(given) != self.levels:
                raise InvalidArgumentError(f"{name} needs {self.levels} entries, got {len(given)}")

    @classmethod
    def from_config(cls, config: UNetConfig) -> UNetLayout:
        """The layout of a UNet built from ``config``."""
        return cls(
            levels=len(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            down_attention=tuple(t == "CrossAttnDownBlock2D" for t in config.down_block_types),
            up_attention=tuple(t == "CrossAttnUpBlock2D" for t in config.up_block_types),
            vector=config.addition_embed_type is not None,
        )

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> UNetLayout:
        """The layout of an original UNet state dict (keys without ``model.diffusion_model.``)."""
        inputs: dict[int, set[str]] = {}
        outputs: dict[int, set[str]] = {}
        vector = False
        for key in keys:
            parts = key.split(".")
            if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 2:
                table = inputs if parts[0] == "input_blocks" else outputs
                table.setdefault(int(parts[1]), set()).add(".".join(parts[2:4]))
            vector = vector or parts[0] == "label_emb"
        if not inputs or not outputs:
            raise UnsupportedModelError("the UNet has no input_blocks / output_blocks keys")
        downsamplers = sum(1 for parts in inputs.values() if "0.op" in parts)
        levels = downsamplers + 1
        layers, remainder = divmod(max(inputs) - downsamplers, levels)
        if remainder or layers < 1 or len(outputs) != levels * (layers + 1):
            raise UnsupportedModelError(
                f"the UNet's blocks ({len(inputs)} input, {len(outputs)} output, "
                f"{downsamplers} downsamplers) do not form a Stable Diffusion UNet"
            )
        step = layers + 1

        def has_transformer(parts: set[str] | None) -> bool:
            return any(p.startswith("1.") and p != "1.conv" for p in parts or ())

        return cls(
            levels=levels,
            layers_per_block=layers,
            down_attention=tuple(has_transformer(inputs.get(1 + i * step)) for i in range(levels)),
            up_attention=tuple(has_transformer(outputs.get(i * step)) for i in range(levels)),
            vector=vector,
        )


def _resnet(original: str, ours: str) -> list[Rule]:
    return _pairs((f"{original}.{o}", f"{ours}.{u}") for o, u in RESNET_RENAMES)


def unet_keys(layout: UNetLayout) -> KeyMap:
    """The UNet's map: ``ldm``/``sgm`` keys (after ``model.diffusion_model.``) to ours."""
    n, per_level = layout.levels, layout.layers_per_block
    step = per_level + 1  # blocks per level on the way down: the layers, then a downsampler
    rules = _pairs(
        [
            ("time_embed.0", "time_embedding.linear_1"),
            ("time_embed.2", "time_embedding.linear_2"),
            ("input_blocks.0.0", "conv_in"),
            ("out.0", "conv_norm_out"),
            ("out.2", "conv_out"),
        ]
    )
    if layout.vector:
        rules += _pairs(
            [
                ("label_emb.0.0", "add_embedding.linear_1"),
                ("label_emb.0.2", "add_embedding.linear_2"),
            ]
        )
    for i in range(n):
        for j in range(per_level):
            block = 1 + i * step + j
            rules += _resnet(f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}")
            if layout.down_attention[i]:
                rules += _pairs([(f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}")])
        if i < n - 1:
            block = 1 + i * step + per_level
            rules += _pairs(
                [(f"input_blocks.{block}.0.op", f"down_blocks.{i}.downsamplers.0.conv")]
            )
    rules += _resnet("middle_block.0", "mid_block.resnets.0")
    rules += _pairs([("middle_block.1", "mid_block.attentions.0")])
    rules += _resnet("middle_block.2", "mid_block.resnets.1")
    for i in range(n):
        for j in range(step):  # one ResNet more than on the way down
            block = i * step + j
            rules += _resnet(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}")
            if layout.up_attention[i]:
                rules += _pairs([(f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}")])
            if j == per_level and i < n - 1:
                slot = 2 if layout.up_attention[i] else 1
                rules += _pairs(
                    [(f"output_blocks.{block}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv")]
                )
    return KeyMap(tuple(rules))


# ---------------------------------------------------------------- ControlNet

CONTROLNET_PREFIX = "control_model."
"""The prefix of a ControlNet's keys in the original single files (some files drop it)."""


def controlnet_keys(layout: UNetLayout, *, hint_convs: int) -> KeyMap:
    """A ControlNet's map (keys after ``control_model.``): the UNet's encoder half as in
    `unet_keys`, plus the control image's embedding and the zero convolutions.

    The original ``input_hint_block`` is a ``Sequential`` of ``hint_convs`` convolutions with
    a SiLU after each but the last, so convolution ``j`` is at index ``2 j``: the first is
    ``controlnet_cond_embedding.conv_in``, the last ``conv_out``, those between ``blocks.*``;
    ``zero_convs.i.0`` is ``controlnet_down_blocks.i`` and ``middle_block_out.0``
    ``controlnet_mid_block``.

    >>> controlnet_keys(UNetLayout(levels=2, layers_per_block=1), hint_convs=8).ours(
    ...     "input_hint_block.14.weight")
    ('controlnet_cond_embedding.conv_out.weight',)
    """
    if hint_convs < 2:
        raise InvalidArgumentError(
            f"a ControlNet's hint block has at least 2 convolutions, got {hint_convs}"
        )
    encoder = [
        r for r in unet_keys(layout).rules if not r.original.startswith(("output_blocks.", "out."))
    ]
    hint = [("input_hint_block.0", "controlnet_cond_embedding.conv_in")]
    hint += [
        (f"input_hint_block.{2 * j}", f"controlnet_cond_embedding.blocks.{j - 1}")
        for j in range(1, hint_convs - 1)
    ]
    hint.append((f"input_hint_block.{2 * (hint_convs - 1)}", "controlnet_cond_embedding.conv_out"))
    skips = 1 + layout.levels * layout.layers_per_block + (layout.levels - 1)
    zero = [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(skips)]
    zero.append(("middle_block_out.0", "controlnet_mid_block"))
    return KeyMap(tuple(encoder + _pairs(hint + zero)))


# ---------------------------------------------------------------- VAE


@dataclass(frozen=True)
class VAELayout:
    """The autoencoder's levels and ResNets per encoder level (the decoder has one more)."""

    levels: int
    layers_per_block: int

    @classmethod
    def from_config(cls, config: AutoencoderKLConfig) -> VAELayout:
        return cls(levels=len(config.block_out_channels), layers_per_block=config.layers_per_block)

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> VAELayout:
        """The layout of an original VAE state dict (keys without ``first_stage_model.``)."""
        blocks: dict[int, set[int]] = {}
        for key in keys:
            match = re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.", key)
            if match:
                blocks.setdefault(int(match[1]), set()).add(int(match[2]))
        if not blocks:
            raise UnsupportedModelError("the VAE has no encoder.down.*.block.* keys")
        return cls(levels=max(blocks) + 1, layers_per_block=max(blocks[0]) + 1)


_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"))


def vae_keys(layout: VAELayout) -> KeyMap:
    """The autoencoder's map: ``ldm`` keys (after ``first_stage_model.``) to ours."""
    n = layout.levels
    rules = _pairs(
        [(f"{p}conv", f"{p}conv") for p in ("quant_", "post_quant_")]
        + [
            (f"{part}.conv_{io}", f"{part}.conv_{io}")
            for part in ("encoder", "decoder")
            for io in ("in", "out")
        ]
        + [(f"{part}.norm_out", f"{part}.conv_norm_out") for part in ("encoder", "decoder")]
    )

    def resnet(original: str, ours: str) -> list[Rule]:
        # The parts keep their names (norm1, conv1, ...) except the 1x1 shortcut.
        return _pairs([(original, ours), (f"{original}.nin_shortcut", f"{ours}.conv_shortcut")])

    for part in ("encoder", "decoder"):
        mid = f"{part}.mid_block"
        rules += resnet(f"{part}.mid.block_1", f"{mid}.resnets.0")
        rules += resnet(f"{part}.mid.block_2", f"{mid}.resnets.1")
        attention = f"{part}.mid.attn_1"
        rules += _pairs(
            [(f"{attention}.{o}", f"{mid}.attentions.0.{u}") for o, u in _VAE_ATTENTION[:1]]
        )
        rules += _pairs(
            [(f"{attention}.{o}", f"{mid}.attentions.0.{u}") for o, u in _VAE_ATTENTION[1:]]
            + [(f"{attention}.proj_out", f"{mid}.attentions.0.to_out.0")],
            Transform.SQUEEZE,
        )
    for i in range(n):
        for j in range(layout.layers_per_block):
            rules += resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < n - 1:
            rules += _pairs(
                [
                    (
                        f"encoder.down.{i}.downsample.conv",
                        f"encoder.down_blocks.{i}.downsamplers.0.conv",
                    )
                ]
            )
        level = n - 1 - i  # the decoder's `up` list runs from the lowest resolution's end
        for j in range(layout.layers_per_block + 1):
            rules += resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if i < n - 1:
            rules += _pairs(
                [(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")]
            )
    return KeyMap(tuple(rules))


# ---------------------------------------------------------------- text encoders


def clip_keys() -> KeyMap:
    """CLIP ViT-L as ``ldm``/``sgm`` save it: transformers' keys. Very old files lack the
    ``text_model.`` level; the position ids some carry are a buffer we do not keep."""
    return KeyMap(
        (
            Rule("text_model", ("text_model",)),
            Rule("text_model.embeddings.position_ids", ()),
            Rule("embeddings", ("text_model.embeddings",), inverse=False),
            Rule("encoder", ("text_model.encoder",), inverse=False),
            Rule("final_layer_norm", ("text_model.final_layer_norm",), inverse=False),
        )
    )


@dataclass(frozen=True)
class OpenCLIPLayout:
    """An OpenCLIP text tower: the ``layers`` our encoder has, the ``file_layers`` the file has
    (more when the model uses a penultimate layer: SD 2.x's 24 for 23), and whether our encoder
    has the ``projection`` (SDXL's ``text_encoder_2``) or the file's is dropped (SD 2.x)."""

    layers: int
    file_layers: int | None = None
    projection: bool = False

    def __post_init__(self) -> None:
        if self.file_layers is not None and self.file_layers < self.layers:
            raise InvalidArgumentError(
                f"the file has {self.file_layers} layers, fewer than the encoder's {self.layers}"
            )


_OPENCLIP_LAYER = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)


def open_clip_keys(layout: OpenCLIPLayout) -> KeyMap:
    """OpenCLIP's text tower (after ``cond_stage_model.model.`` / ``conditioner.embedders.N.model.``)
    to transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` keys."""
    rules = [
        Rule("token_embedding", ("text_model.embeddings.token_embedding",)),
        Rule("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
        Rule("ln_final", ("text_model.final_layer_norm",)),
        Rule(
            "text_projection",
            ("text_projection.weight",) if layout.projection else (),
            Transform.TRANSPOSE,
        ),
        Rule("logit_scale", ()),  # CLIP's contrastive temperature: not part of the text model
    ]
    for i in range(layout.layers):
        original, ours = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        rules += _pairs((f"{original}.{o}", f"{ours}.{u}") for o, u in _OPENCLIP_LAYER)
        for kind in ("weight", "bias"):
            rules.append(
                Rule(
                    f"{original}.attn.in_proj_{kind}",
                    tuple(f"{ours}.self_attn.{p}_proj.{kind}" for p in "qkv"),
                    Transform.SPLIT,
                )
            )
    for i in range(layout.layers, layout.file_layers or layout.layers):
        rules.append(Rule(f"transformer.resblocks.{i}", ()))
    return KeyMap(tuple(rules))


# ---------------------------------------------------------------- whole checkpoints

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

IGNORED_KEYS = frozenset(
    {
        # ldm's DDPM schedule, saved with the model as buffers (latentkit's schedulers compute it).
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        # sgm's discrete denoiser keeps its sigma schedule as buffers.
        "denoiser.sigmas",
        "denoiser.log_sigmas",
        "model_ema.decay",
        "model_ema.num_updates",
    }
)
"""Top-level tensors of original checkpoints that no network reads."""
IGNORED_PREFIXES = ("model_ema.",)
"""Original checkpoint subtrees that are skipped: the EMA copy of the UNet (``model_ema.*``,
flattened names), which training files carry beside ``model.diffusion_model``."""


@dataclass(frozen=True)
class ComponentKeys:
    """One component of a single-file checkpoint: its name (``unet``, ``vae``,
    ``text_encoder``, ``text_encoder_2``), its key prefix in the file, and its map."""

    component: str
    prefix: str
    keys: KeyMap


@dataclass(frozen=True)
class CheckpointLayout:
    """A single-file checkpoint's family and the maps of its components."""

    family: Family
    components: tuple[ComponentKeys, ...]

    def component(self, name: str) -> ComponentKeys:
        for c in self.components:
            if c.component == name:
                return c
        raise InvalidArgumentError(
            f"a {self.family} checkpoint has no {name}; it has "
            + ", ".join(c.component for c in self.components)
        )

    def locate(self, key: str) -> tuple[ComponentKeys, str] | None:
        """The component an original key belongs to and the key within it."""
        best: ComponentKeys | None = None
        for c in self.components:
            if key.startswith(c.prefix) and (best is None or len(c.prefix) > len(best.prefix)):
                best = c
        return None if best is None else (best, key[len(best.prefix) :])

    def ours(self, key: str) -> tuple[str, ...] | None:
        """Our names (``component.path``) for an original key: ``()`` for a tensor skipped on
        purpose (`IGNORED_KEYS`, a dropped layer, ...), None for one no rule knows."""
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            return ()
        found = self.locate(key)
        if found is None:
            return None
        component, rest = found
        names = component.keys.ours(rest)
        return None if names is None else tuple(f"{component.component}.{n}" for n in names)

    def original(self, ours: str) -> str | None:
        """The original key of one of ours (``component.path``), or None."""
        component, _, rest = ours.partition(".")
        for c in self.components:
            if c.component == component:
                name = c.keys.original(rest)
                return None if name is None else c.prefix + name
        return None


def checkpoint_layout(
    family: Family,
    *,
    unet: UNetLayout,
    vae: VAELayout,
    open_clip: OpenCLIPLayout | None = None,
) -> CheckpointLayout:
    """The layout of an original ``family`` checkpoint with these networks.

    ``open_clip`` describes the OpenCLIP text encoder of SD 2.x (default: 23 of the file's 24
    layers, no projection) and SDXL (default: 32 layers with the projection).
    """
    if family not in FAMILIES:
        raise InvalidArgumentError(f"unknown checkpoint family {family!r}; valid: {FAMILIES}")
    parts = [
        ComponentKeys("unet", UNET_PREFIX, unet_keys(unet)),
        ComponentKeys("vae", VAE_PREFIX, vae_keys(vae)),
    ]
    if family == "sd1":
        parts.append(ComponentKeys("text_encoder", "cond_stage_model.transformer.", clip_keys()))
    elif family == "sd2":
        tower = open_clip or OpenCLIPLayout(layers=23, file_layers=24)
        parts.append(
            ComponentKeys("text_encoder", "cond_stage_model.model.", open_clip_keys(tower))
        )
    else:
        tower = open_clip or OpenCLIPLayout(layers=32, projection=True)
        slot = 1 if family == "sdxl-base" else 0  # the refiner has only the OpenCLIP encoder
        parts.append(
            ComponentKeys(
                "text_encoder_2", f"conditioner.embedders.{slot}.model.", open_clip_keys(tower)
            )
        )
        if family == "sdxl-base":
            parts.append(
                ComponentKeys("text_encoder", "conditioner.embedders.0.transformer.", clip_keys())
            )
    return CheckpointLayout(family, tuple(parts))


def plan(keys: Iterable[str], *, layout: CheckpointLayout) -> tuple[list[str], list[str]]:
    """Split original ``keys`` into those `convert` reads and those no rule knows (in order).

    Reads names only, so a loader can refuse a file before reading any tensor.
    """
    known: list[str] = []
    unknown: list[str] = []
    for key in keys:
        names = layout.ours(key)
        if names is None:
            unknown.append(key)
        elif names:
            known.append(key)
    return known, unknown


def convert(
    state: Mapping[str, Tensor],
    *,
    layout: CheckpointLayout,
    unknown: Literal["raise", "skip"] = "raise",
) -> Iterator[tuple[str, Tensor]]:
    """Stream an original checkpoint as ``(component.key, tensor)`` pairs in our names.

    ``state`` may be lazy (tensors read when indexed); each tensor is read once and comes
    out as a view where the layouts differ only in shape (a fused q/k/v split into three
    row blocks, a 1x1 convolution's weight as a matrix), so no second copy of the weights
    exists; a transposed projection is made contiguous, one tensor at a time. Keys no rule
    knows raise `WeightMismatchError` (naming up to ten) before any tensor is read, or are
    skipped with ``unknown="skip"``.

    >>> import torch
    >>> layout = checkpoint_layout("sd1", unet=UNetLayout(levels=2, layers_per_block=1),
    ...                            vae=VAELayout(levels=2, layers_per_block=1))
    >>> [k for k, _ in convert({"model.diffusion_model.out.2.bias": torch.zeros(4)}, layout=layout)]
    ['unet.conv_out.bias']
    """
    known, missed = plan(state.keys(), layout=layout)
    if missed and unknown == "raise":
        shown = ", ".join(missed[:10]) + (
            f" and {len(missed) - 10} more" if len(missed) > 10 else ""
        )
        raise WeightMismatchError(
            f"{len(missed)} tensors of the {layout.family} checkpoint have no place in the "
            f"model: {shown}"
        )
    for key in known:
        found = layout.locate(key)
        assert found is not None  # plan() found a rule for it
        component, rest = found
        located = component.keys.lookup(rest)
        assert located is not None
        rule, tail = located
        for name, tensor in _forward(rule, state[key]):
            yield f"{component.component}.{name}{tail}", tensor


def _forward(rule: Rule, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
    if rule.transform is Transform.SPLIT:
        if tensor.shape[0] % len(rule.ours):
            raise WeightMismatchError(
                f"{rule.original}: {tuple(tensor.shape)} does not split into {len(rule.ours)} row blocks"
            )
        yield from zip(rule.ours, tensor.chunk(len(rule.ours)), strict=True)
        return
    (name,) = rule.ours
    if rule.transform is Transform.SQUEEZE and tensor.ndim == 4:
        if tensor.shape[2:] != (1, 1):
            raise WeightMismatchError(f"{rule.original}: {tuple(tensor.shape)} is not a 1x1 kernel")
        tensor = tensor[:, :, 0, 0]
    elif rule.transform is Transform.TRANSPOSE:
        tensor = tensor.t().contiguous()
    yield name, tensor


def to_original(
    state: Mapping[str, Tensor], *, layout: CheckpointLayout
) -> Iterator[tuple[str, Tensor]]:
    """Stream our state dicts (``component.key`` → tensor) in the original layout: the inverse
    of `convert` (fused q/k/v concatenated, 1x1 convolutions given back their kernel axes,
    the projection transposed). Keys that no rule covers raise `WeightMismatchError`."""
    done: set[str] = set()
    for key in state:
        component, _, rest = key.partition(".")
        try:
            part = layout.component(component)
        except InvalidArgumentError as e:
            raise WeightMismatchError(str(e)) from e
        found = part.keys.inverse_lookup(rest)
        if found is None:
            raise WeightMismatchError(f"{key} has no name in the {layout.family} layout")
        rule, tail = found
        original = part.prefix + rule.original + tail
        if original in done:
            continue
        done.add(original)
        tensor = state[key]
        if rule.transform is Transform.SPLIT:
            import torch

            tensor = torch.cat([state[f"{component}.{o}{tail}"] for o in rule.ours])
        elif rule.transform is Transform.SQUEEZE and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        elif rule.transform is Transform.TRANSPOSE:
            tensor = tensor.t().contiguous()
        yield original, tensor


# ---------------------------------------------------------------- detection

# Probe keys: the text encoders tell the families apart (the UNets of SD 1.x and 2.x have
# the same blocks). diffusers' `single_file_utils.CHECKPOINT_KEY_NAMES` probes the same places.
_PROBES: tuple[tuple[Family, str], ...] = (
    ("sdxl-base", "conditioner.embedders.1.model."),
    ("sdxl-refiner", "conditioner.embedders.0.model."),
    ("sd2", "cond_stage_model.model."),
    ("sd1", "cond_stage_model.transformer."),
)
_CONTEXT_WIDTHS: dict[int, Family] = {
    768: "sd1",
    1024: "sd2",
    2048: "sdxl-base",
    1280: "sdxl-refiner",
}
"""A UNet-only file: the family by the width of the text its cross-attention reads."""


@dataclass(frozen=True)
class DetectedLayout:
    """What `detect_layout` reads off a single-file checkpoint."""

    family: Family
    in_channels: int
    """The UNet's input channels: 4 text-to-image, 9 inpainting, 5 depth (SD 2)."""
    layout: CheckpointLayout
    context_dim: int
    """Width of the text the UNet's cross-attention reads (768, 1024, 2048, 1280)."""


def detect_layout(shapes: Mapping[str, Sequence[int]]) -> DetectedLayout:
    """The family (``sd1``, ``sd2``, ``sdxl-base``, ``sdxl-refiner``), UNet input channels and
    key layout of an original single-file checkpoint, from its keys and tensor shapes only.

    ``shapes`` maps each key to its shape (a safetensors header has them without reading
    data). The text encoder's prefix decides the family; a file without one (a UNet alone)
    is judged by the width of its cross-attention's keys. Raises `UnsupportedModelError`
    for a file that is not an original Stable Diffusion checkpoint (diffusers' layout included).
    """
    unet = {k[len(UNET_PREFIX) :]: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        hint = (
            " (it is in the diffusers layout: load its folder instead)"
            if any(k.startswith(("down_blocks.", "unet.")) for k in shapes)
            else ""
        )
        raise UnsupportedModelError(
            "not an original Stable Diffusion checkpoint: no "
            f"{UNET_PREFIX}input_blocks.0.0.weight{hint}"
        )
    context = next(
        (v[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight") and len(v) == 2), None
    )
    if context is None:
        raise UnsupportedModelError("the UNet has no cross-attention (attn2.to_k) weights")
    family = next((f for f, p in _PROBES if any(k.startswith(p) for k in shapes)), None)
    if family is None:
        family = _CONTEXT_WIDTHS.get(context)
        if family is None:
            raise UnsupportedModelError(
                f"a UNet whose cross-attention reads {context}-wide text is none of "
                f"{', '.join(FAMILIES)}"
            )
    vae_keys_ = [k[len(VAE_PREFIX) :] for k in shapes if k.startswith(VAE_PREFIX)]
    vae = VAELayout.from_keys(vae_keys_) if vae_keys_ else VAELayout(levels=4, layers_per_block=2)
    open_clip = None
    if family != "sd1":
        prefix = dict((f, p) for f, p in _PROBES)[family]
        layers = {
            int(m[1])
            for k in shapes
            if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))
        }
        if layers:
            count = max(layers) + 1
            # SD 2.x reads the penultimate layer: its encoder has one layer fewer than the file.
            open_clip = (
                OpenCLIPLayout(layers=count - 1, file_layers=count)
                if family == "sd2"
                else OpenCLIPLayout(layers=count, projection=True)
            )
    layout = checkpoint_layout(
        family, unet=UNetLayout.from_keys(unet), vae=vae, open_clip=open_clip
    )
    return DetectedLayout(
        family=family, in_channels=int(conv_in[1]), layout=layout, context_dim=int(context)
    )
