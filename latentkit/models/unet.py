"""The denoising UNet of Stable Diffusion 1.x, 2.x and XL (Rombach et al. 2022, sec. 3.3;
Podell et al. 2023, sec. 2).

`UNetConfig` reads a diffusers ``unet/config.json``; `UNet2DCondition` is the
network, with module paths equal to the checkpoint keys so weights load by name.
SDXL adds a per-block transformer depth and a vector condition (`time_ids_embedding`)
added to the time embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError, UnsupportedModelError
from latentkit.models.config_checks import check_config
from latentkit.models.layers import (
    Conv2d,
    DownBlock,
    Downsample,
    MidBlock,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)
from latentkit.protocols import ControlResiduals

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Config keys that SD 1.x/2.x leave at diffusers' default but that change the network when set:
# each maps to the only value latentkit implements. Keys not listed here and not read by
# `UNetConfig.from_dict` do not change an SD UNet (e.g. `_class_name`) and are ignored.
_FIXED_KEYS: dict[str, object] = {
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "center_input_sample": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "cross_attention_norm": None,
}

ADDITION_EMBED_TYPES = ("text_time",)
"""The ``addition_embed_type`` values latentkit implements (besides None): SDXL's
``"text_time"``, a vector of pooled text embedding and size/crop ids (`time_ids_embedding`)."""


def _unsupported(key: str, value: object, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"UNet config {key}={value!r} is not supported; latentkit implements Stable Diffusion "
        f"1.x/2.x/XL UNets, which use {supported}"
    )


def _transformer_depths(value: object, blocks: int) -> int | tuple[int, ...]:
    """``transformer_layers_per_block`` as diffusers reads it: one int for every block, or one
    per down block. A list per layer (an asymmetric UNet, which also needs
    ``reverse_transformer_layers_per_block``) is refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise _unsupported(
        "transformer_layers_per_block", value, f"one int, or one int per block ({blocks})"
    )


def time_ids_embedding(
    time_ids: Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float
) -> Tensor:
    """The sinusoidal embeddings of SDXL's (B, k) size and crop ids, flattened to (B, k * dim).

    Each id (original height and width, crop top and left, target height and width, or the
    refiner's aesthetic score in place of the target size) is embedded like a timestep with
    ``dim = addition_time_embed_dim`` channels (Podell et al. 2023, sec. 2.2: "embed each
    component independently using Fourier feature encoding, and concatenate"); the UNet's
    vector condition is ``cat([pooled_text, time_ids_embedding(ids, ...)], dim=-1)``. Pass the
    UNet's ``flip_sin_to_cos`` and ``freq_shift``. Float32, whatever the dtype of ``time_ids``.

    >>> time_ids_embedding(torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]), 8,
    ...                    flip_sin_to_cos=True, freq_shift=0).shape
    torch.Size([1, 48])
    """
    if time_ids.ndim != 2:
        raise InvalidArgumentError(
            f"time_ids must have shape (batch, ids), got {tuple(time_ids.shape)}"
        )
    flat = timestep_embedding(
        time_ids.reshape(-1), dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift
    )
    return flat.reshape(time_ids.shape[0], -1)


def _uniform_int(d: Mapping[str, Any], key: str, default: int) -> int:
    """An int setting that diffusers also accepts per block; per-block values must all be equal."""
    value = d.get(key, default)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(set(value)) != 1:
            raise _unsupported(key, value, "one value for every block")
        value = value[0]
    return int(value)


@dataclass(frozen=True)
class UNetConfig:
    """The settings of a Stable Diffusion UNet, read from diffusers' ``unet/config.json``.

    Defaults are diffusers' own, so a config file that omits a key means the same here.
    """

    in_channels: int = 4
    """4 for text-to-image, 9 for inpainting (latents, mask, masked image), 5 for depth."""
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    """Heads per down block (the up blocks use them reversed); each head is ``channels // heads`` wide."""
    cross_attention_dim: int = 1280
    """Width of the text encoder's hidden states (768 for SD 1.x, 1024 for SD 2.x, 2048 for
    SDXL's two encoders together, 1280 for the SDXL refiner)."""
    transformer_layers_per_block: int | tuple[int, ...] = 1
    """Transformer blocks in each attention layer: one number for all, or one per down block
    (SDXL: ``(1, 2, 10)``). The up blocks use them reversed, the mid block the last one."""
    use_linear_projection: bool = False
    """SD 2.x projects into and out of the transformers with linear layers, SD 1.x with 1x1 convs."""
    upcast_attention: bool = False
    """Accepted (SD 2.1 sets it) with no effect, as in diffusers' default attention processor:
    the fused attention kernels accumulate in float32 anyway (see ``layers.Attention``)."""
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    sample_size: int | tuple[int, int] | None = None
    """The latent side the model was trained at (64 for SD 1.x at 512 px); informative only."""
    addition_embed_type: str | None = None
    """``"text_time"`` (SDXL): a vector condition (`UNet2DCondition.forward`'s ``vector``),
    lifted by ``add_embedding`` and added to the time embedding; None: no vector."""
    addition_time_embed_dim: int | None = None
    """Channels of each size/crop id's sinusoid (`time_ids_embedding`); 256 in SDXL."""
    projection_class_embeddings_input_dim: int | None = None
    """Width of the vector condition: pooled text width + ids x ``addition_time_embed_dim``
    (SDXL base: 1280 + 6 x 256 = 2816; refiner: 1280 + 5 x 256 = 2560)."""
    num_class_embeds: int | None = None
    """Class labels the UNet embeds (``class_embedding``, an ``nn.Embedding`` added to the
    time embedding; `UNet2DCondition.forward`'s ``class_labels``): the x4 upscaler's noise
    level, 0 to 999 (``num_class_embeds: 1000``); None: no class labels."""
    only_cross_attention: bool | tuple[bool, ...] = False
    """Per down block (one value for all): its transformers' first attention attends to the
    text instead of the image (the up blocks take the values reversed). The x4 upscaler
    sets it for its three high-resolution levels, where self-attention would be costly.
    The middle block always self-attends (diffusers' ``UNetMidBlock2DCrossAttn`` ignores
    ``mid_block_only_cross_attention``)."""

    def __post_init__(self) -> None:
        blocks = len(self.block_out_channels)
        keys = ["down_block_types", "up_block_types", "num_attention_heads"]
        if isinstance(self.transformer_layers_per_block, tuple):
            keys.append("transformer_layers_per_block")
        for key in keys:
            if len(getattr(self, key)) != blocks:
                raise InvalidArgumentError(
                    f"UNet config {key} has {len(getattr(self, key))} entries but block_out_channels has {blocks}"
                )
        if self.addition_embed_type is not None:
            if self.addition_embed_type not in ADDITION_EMBED_TYPES:
                raise _unsupported(
                    "addition_embed_type", self.addition_embed_type, "None or 'text_time'"
                )
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(self, key) is None:
                    raise InvalidArgumentError(
                        f"UNet config addition_embed_type={self.addition_embed_type!r} needs {key}"
                    )
        for i, kind in enumerate(self.down_block_types):
            if kind not in DOWN_BLOCK_TYPES:
                raise _unsupported(f"down_block_types[{i}]", kind, " or ".join(DOWN_BLOCK_TYPES))
        for i, kind in enumerate(self.up_block_types):
            if kind not in UP_BLOCK_TYPES:
                raise _unsupported(f"up_block_types[{i}]", kind, " or ".join(UP_BLOCK_TYPES))

    @property
    def cross_only(self) -> tuple[bool, ...]:
        """`only_cross_attention` as one flag per down block."""
        value = self.only_cross_attention
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        """`transformer_layers_per_block` as one number per down block."""
        depth = self.transformer_layers_per_block
        return depth if isinstance(depth, tuple) else (depth,) * len(self.block_out_channels)

    @property
    def vector_dim(self) -> int | None:
        """Width of the vector condition `UNet2DCondition.forward` takes, or None if it takes none."""
        return self.projection_class_embeddings_input_dim if self.addition_embed_type else None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Parse a diffusers UNet config, raising `UnsupportedModelError` for any setting
        that would make the network differ from a Stable Diffusion 1.x/2.x/XL UNet (LCM's
        ``time_cond_proj_dim``, Kandinsky's ``addition_embed_type``, other block types, ...)."""
        check_config("unet", d)  # types and ranges first: InvalidConfigError, not a TypeError
        for key, supported in _FIXED_KEYS.items():
            value = d.get(key, supported)
            # diffusers also takes the flags per block, e.g. `only_cross_attention: [false, ...]`
            per_block = isinstance(value, (list, tuple)) and isinstance(supported, bool)
            if any(v != supported for v in (value if per_block else [value])):
                raise _unsupported(key, value, repr(supported))
        if d.get("norm_num_groups", 32) is None:
            raise _unsupported("norm_num_groups", None, "GroupNorm before conv_out")
        if isinstance(d.get("cross_attention_dim"), (list, tuple)):
            raise _unsupported(
                "cross_attention_dim", d["cross_attention_dim"], "one width for every block"
            )

        down = tuple(d.get("down_block_types", cls.down_block_types))
        # The field named `attention_head_dim` in SD configs holds the number of heads: diffusers
        # kept the misnomer for compatibility and reads it as `num_attention_heads` when that is unset.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        if heads is None:
            raise _unsupported("attention_head_dim", None, "a number of heads")
        heads = (heads,) * len(down) if isinstance(heads, int) else tuple(heads)
        sample_size = d.get("sample_size")
        addition = d.get("addition_embed_type")
        if addition is not None and addition not in ADDITION_EMBED_TYPES:
            raise _unsupported("addition_embed_type", addition, "None or 'text_time'")

        def optional_int(key: str) -> int | None:
            # Read only with an addition embedding: diffusers ignores them otherwise.
            value = d.get(key)
            return None if value is None or addition is None else int(value)

        cross_only = d.get("only_cross_attention", False)
        if isinstance(cross_only, (list, tuple)):
            if len(cross_only) != len(down):
                raise InvalidArgumentError(
                    f"UNet config only_cross_attention has {len(cross_only)} entries but "
                    f"down_block_types has {len(down)}"
                )
            cross_only = tuple(bool(v) for v in cross_only)
        else:
            cross_only = bool(cross_only)
        classes = d.get("num_class_embeds")

        return cls(
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            block_out_channels=tuple(
                int(c) for c in d.get("block_out_channels", cls.block_out_channels)
            ),
            layers_per_block=_uniform_int(d, "layers_per_block", 2),
            down_block_types=down,
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            num_attention_heads=tuple(int(h) for h in heads),
            cross_attention_dim=int(d.get("cross_attention_dim", 1280)),
            transformer_layers_per_block=_transformer_depths(
                d.get("transformer_layers_per_block", 1), len(down)
            ),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention", False)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=float(d.get("freq_shift", 0)),
            downsample_padding=int(d.get("downsample_padding", 1)),
            mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
            dropout=float(d.get("dropout", 0.0)),
            sample_size=tuple(sample_size)
            if isinstance(sample_size, (list, tuple))
            else sample_size,
            addition_embed_type=addition,
            addition_time_embed_dim=optional_int("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=optional_int(
                "projection_class_embeddings_input_dim"
            ),
            num_class_embeds=None if classes is None else int(classes),
            only_cross_attention=cross_only,
        )

    def to_dict(self) -> dict[str, Any]:
        """This config as a diffusers ``unet/config.json`` (`from_dict` reads it back equal).

        The head counts are written as ``attention_head_dim``, the field SD configs use for
        them (diffusers refuses ``num_attention_heads`` for this model class).
        """
        sample_size = self.sample_size
        depth = self.transformer_layers_per_block
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "attention_head_dim": list(self.num_attention_heads),
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": list(depth) if isinstance(depth, tuple) else depth,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "dropout": self.dropout,
            "sample_size": list(sample_size) if isinstance(sample_size, tuple) else sample_size,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "num_class_embeds": self.num_class_embeds,
            "only_cross_attention": list(self.only_cross_attention)
            if isinstance(self.only_cross_attention, tuple)
            else self.only_cross_attention,
        }


class UpBlock(nn.Module):
    """ResNet blocks fed the matching skip connections (Ronneberger et al. 2015), each optionally
    followed by attention, then an optional `Upsample`."""

    def __init__(
        self,
        resnets: list[ResnetBlock],
        attentions: list[SpatialTransformer],
        upsample: Upsample | None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty for UpBlock2D: no keys
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(
        self,
        x: Tensor,
        skips: list[Tensor],
        temb: Tensor,
        context: Tensor,
        size: tuple[int, int] | None,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> Tensor:
        """``skips`` are this block's skip connections in the order the down path made them;
        ``size`` is the resolution to upsample to (that of the next skip connection).

        Only layers ``start`` to ``stop`` (default: all) run, and the upsampler only when the
        block runs to its end; layer ``i`` reads ``skips[len(self.resnets) - 1 - i]``, so a
        block entered part-way needs only the skips its remaining layers read (DeepCache's
        shallow path, `FeatureCache`)."""
        count = len(self.resnets)
        for i in range(start, count if stop is None else stop):
            x = self.resnets[i](torch.cat([x, skips[count - 1 - i]], dim=1), temb)
            if len(self.attentions):
                x = self.attentions[i](x, context)
        if stop is not None:
            return x
        if self.upsamplers is not None:
            if size is None:
                raise InvalidArgumentError("an upsampling block needs the size to upsample to")
            x = self.upsamplers[0](x, size)
        return x


def _resnet(config: UNetConfig, c_in: int, c_out: int, scale: float = 1.0) -> ResnetBlock:
    return ResnetBlock(
        c_in,
        c_out,
        temb_channels=4 * config.block_out_channels[0],
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
        output_scale_factor=scale,
    )


def _transformer(
    config: UNetConfig, c: int, heads: int, depth: int, only_cross: bool
) -> SpatialTransformer:
    return SpatialTransformer(
        c,
        heads=heads,
        head_dim=c // heads,
        context_dim=config.cross_attention_dim,
        depth=depth,
        groups=config.norm_num_groups,
        linear_projection=config.use_linear_projection,
        only_cross=only_cross,
    )


class UNetEncoder(nn.Module):
    """The UNet's first half: time (and vector) embedding, ``conv_in``, the down blocks and
    the middle block, with the module paths of diffusers' checkpoints.

    `UNet2DCondition` adds the up half; `latentkit.models.controlnet.ControlNet` is this half
    with a condition embedding and zero convolutions (Zhang et al. 2023, "a trainable copy"
    of the encoder), so both build it here, once.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        n = len(channels)
        temb_dim = 4 * channels[0]

        self.conv_in = Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        # SDXL's vector condition gets its own MLP into the time embedding's width (the
        # sinusoids of its ids are made by the caller, `time_ids_embedding`, as they have no
        # weights). Podell et al. 2023, sec. 2.2.
        self.add_embedding = (
            TimestepEmbedding(config.vector_dim, temb_dim)
            if config.vector_dim is not None
            else None
        )
        # Class labels (the x4 upscaler's noise level) look up a learned vector that is added
        # to the time embedding, as diffusers' class_embed_type=None with num_class_embeds.
        self.class_embedding = (
            nn.Embedding(config.num_class_embeds, temb_dim)
            if config.num_class_embeds is not None
            else None
        )
        depths = config.transformer_depths

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(config.down_block_types):
            c_in, c_out = channels[max(i - 1, 0)], channels[i]
            layers = range(config.layers_per_block)
            self.down_blocks.append(
                DownBlock(
                    [_resnet(config, c_in if j == 0 else c_out, c_out) for j in layers],
                    [
                        _transformer(
                            config,
                            c_out,
                            config.num_attention_heads[i],
                            depths[i],
                            config.cross_only[i],
                        )
                        for _ in layers
                    ]
                    if kind == "CrossAttnDownBlock2D"
                    else [],
                    Downsample(c_out, padding=config.downsample_padding) if i < n - 1 else None,
                )
            )

        c_mid, scale = channels[-1], config.mid_block_scale_factor
        self.mid_block = MidBlock(
            (_resnet(config, c_mid, c_mid, scale), _resnet(config, c_mid, c_mid, scale)),
            _transformer(
                config,
                c_mid,
                config.num_attention_heads[-1],
                depths[-1],
                False,  # diffusers' UNetMidBlock2DCrossAttn always self-attends
            ),
        )

    @property
    def skip_count(self) -> int:
        """How many skip connections the down half makes: ``conv_in``'s output, each layer
        of each down block, and each downsampler."""
        n = len(self.config.block_out_channels)
        return 1 + n * self.config.layers_per_block + (n - 1)

    def embed_time(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        vector: Tensor | None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """The time embedding (B, 4 x block_out_channels[0]) that every ResNet block adds,
        plus the lifted vector condition of a UNet with an ``addition_embed_type`` (SDXL) and
        the embedded ``class_labels`` (B,) of a UNet with ``num_class_embeds`` (the upscaler)."""
        classes = self.config.num_class_embeds
        if (class_labels is None) != (classes is None):
            raise InvalidArgumentError(
                "this UNet takes no class labels; pass class_labels=None"
                if classes is None
                else f"this UNet (num_class_embeds={classes}) needs class labels: one int in "
                f"[0, {classes}) per batch item"
            )
        # Shape and type only: a value check would synchronise with the device on every step
        # (and break CUDA graph capture); the pipeline checks the values it makes.
        if class_labels is not None and (
            tuple(class_labels.shape) != (sample.shape[0],) or class_labels.is_floating_point()
        ):
            raise InvalidArgumentError(
                f"class_labels must be {sample.shape[0]} ints in [0, {classes}), got "
                f"{class_labels.dtype} of shape {tuple(class_labels.shape)}"
            )
        expected = self.config.vector_dim
        if (vector is None) != (expected is None):
            raise InvalidArgumentError(
                "this UNet takes no vector condition; pass vector=None"
                if expected is None
                else f"this UNet (addition_embed_type={self.config.addition_embed_type!r}) needs "
                f"a vector condition of shape (batch, {expected}); pass vector="
            )
        if vector is not None and tuple(vector.shape) != (sample.shape[0], expected):
            raise InvalidArgumentError(
                f"vector has shape {tuple(vector.shape)}, expected {(sample.shape[0], expected)}"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t[None] if t.ndim == 0 else t).expand(sample.shape[0])
        # The sinusoids are float32 like the reference's; cast to the network's dtype after.
        t_features = timestep_embedding(
            t,
            self.config.block_out_channels[0],
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        ).to(sample.dtype)
        temb: Tensor = self.time_embedding(t_features)
        if self.class_embedding is not None and class_labels is not None:
            temb = temb + self.class_embedding(class_labels.to(temb.device)).to(temb.dtype)
        if self.add_embedding is not None and vector is not None:
            temb = temb + self.add_embedding(vector.to(temb.dtype))
        return temb

    def encode(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the down blocks on ``x`` (``conv_in``'s output): the lowest-resolution features
        and every skip connection, ``x`` itself first (Ronneberger et al. 2015)."""
        skips = [x]
        for down in self.down_blocks:
            x, outputs = down(x, temb, context)
            skips.extend(outputs)
        return x, skips


class UNet2DCondition(UNetEncoder):
    """The text-conditioned UNet ``eps_theta(z_t, t, tau(y))`` of Rombach et al. 2022 (eq. 3).

    Build it with ``UNet2DCondition(UNetConfig.from_dict(config_json))``; its ``state_dict()``
    keys equal those of diffusers' ``UNet2DConditionModel`` for the same config.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        channels = config.block_out_channels
        n = len(channels)
        depths = config.transformer_depths

        # Each up block has one more ResNet than its down block: it also takes the output of the
        # down block below's downsampler (or of conv_in, for the last block).
        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        for i, kind in enumerate(config.up_block_types):
            c_prev, c_out = reversed_channels[max(i - 1, 0)], reversed_channels[i]
            c_skip_last = reversed_channels[min(i + 1, n - 1)]
            layers = range(config.layers_per_block + 1)
            last = config.layers_per_block
            self.up_blocks.append(
                UpBlock(
                    [
                        _resnet(
                            config,
                            (c_prev if j == 0 else c_out) + (c_skip_last if j == last else c_out),
                            c_out,
                        )
                        for j in layers
                    ],
                    [
                        _transformer(
                            config,
                            c_out,
                            config.num_attention_heads[n - 1 - i],
                            depths[n - 1 - i],
                            config.cross_only[n - 1 - i],
                        )
                        for _ in layers
                    ]
                    if kind == "CrossAttnUpBlock2D"
                    else [],
                    Upsample(c_out) if i < n - 1 else None,
                )
            )

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        vector: Tensor | None = None,
        control: ControlResiduals | None = None,
        class_labels: Tensor | None = None,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """Predict for ``sample`` (B, in_channels, h, w) at ``timestep`` (a number, or a 0-d or
        (B,) tensor) given text ``encoder_hidden_states`` (B, tokens, cross_attention_dim).

        ``vector`` (B, `UNetConfig.vector_dim`) is the vector condition of a UNet with an
        ``addition_embed_type`` (SDXL: pooled text embedding, then `time_ids_embedding`), and
        must be None for one without. ``control`` (a ControlNet's `ControlResiduals`) is added
        to the skip connections and the middle block's output, where diffusers adds
        ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
        ``class_labels`` (B,) ints are required exactly when the config has
        ``num_class_embeds`` (the x4 upscaler: the noise level of its low-resolution input).

        ``cache`` (one sampling run's `FeatureCache`) turns on DeepCache: the whole network
        runs only when the cache asks for a refresh, and keeps its deep feature; the other
        evaluations run only the shallow layers on that feature (`FeatureCache`).
        """
        temb = self.embed_time(sample, timestep, vector, class_labels)
        context = encoder_hidden_states
        if cache is not None and not cache.refresh(sample):
            return self._shallow(sample, temb, context, control, cache)
        x, skips = self.encode(self.conv_in(sample), temb, context)
        if control is not None:
            if len(control.down) != len(skips):
                raise InvalidArgumentError(
                    f"control has {len(control.down)} skip residuals; this UNet makes "
                    f"{len(skips)} skip connections"
                )
            for i, (skip, extra) in enumerate(zip(skips, control.down, strict=True)):
                # A global-pool ControlNet (shuffle) gives (B, C, 1, 1): added to every pixel.
                if extra.shape[1] != skip.shape[1] or extra.shape[-2:] not in (
                    skip.shape[-2:],
                    (1, 1),
                ):
                    raise InvalidArgumentError(
                        f"control residual {i} has shape {tuple(extra.shape)}, the skip "
                        f"connection {tuple(skip.shape)}"
                    )
            skips = [skip + extra for skip, extra in zip(skips, control.down, strict=True)]

        x = self.mid_block(x, temb, context)
        if control is not None:
            x = x + control.mid

        per_block = self.config.layers_per_block + 1
        for up in self.up_blocks:
            mine, skips = skips[-per_block:], skips[:-per_block]
            # Upsample to the next skip's size, not 2x, so odd latent sides round-trip exactly.
            size = (skips[-1].shape[-2], skips[-1].shape[-1]) if skips else None
            if cache is not None and not skips:  # the last up block: keep DeepCache's feature
                enter = self._cache_entry
                x = up(x, mine, temb, context, size, stop=enter)
                cache.keep(x)
                x = up(x, mine, temb, context, size, start=enter)
            else:
                x = up(x, mine, temb, context, size)

        out: Tensor = self.conv_out(F.silu(self.conv_norm_out(x)))
        return out

    @property
    def _cache_entry(self) -> int:
        """The layer of the last up block that reads skip connection `CACHE_SKIP`: where
        DeepCache's shallow path re-enters the up half."""
        return self.config.layers_per_block - CACHE_SKIP

    def _shallow(
        self,
        sample: Tensor,
        temb: Tensor,
        context: Tensor,
        control: ControlResiduals | None,
        cache: FeatureCache,
    ) -> Tensor:
        """DeepCache's partial evaluation (Ma et al. 2024, sec. 3): ``conv_in`` and
        the first `CACHE_SKIP` layers of the first down block make the shallow skip
        connections; the last up block is entered at the layer that reads the deepest of
        them, with the cached deep feature in place of the output of everything below."""
        x = self.conv_in(sample)
        skips = [x]
        first = self.down_blocks[0]
        assert isinstance(first, DownBlock)
        for j in range(CACHE_SKIP):
            x = first.resnets[j](x, temb)
            if len(first.attentions):
                x = first.attentions[j](x, context)
            skips.append(x)
        if control is not None:
            if len(control.down) != self.skip_count:
                raise InvalidArgumentError(
                    f"control has {len(control.down)} skip residuals; this UNet makes "
                    f"{self.skip_count} skip connections"
                )
            # The residuals of the skip connections this path makes: the first ones.
            skips = [skip + extra for skip, extra in zip(skips, control.down, strict=False)]
        assert cache.feature is not None  # `refresh` said the cache holds one
        x = self.up_blocks[-1](cache.feature, skips, temb, context, None, start=self._cache_entry)
        out: Tensor = self.conv_out(F.silu(self.conv_norm_out(x)))
        return out


CACHE_SKIP = 1
"""DeepCache's skip branch: how many skip connections after ``conv_in``'s the shallow path
makes. 1 is the branch of the paper's Stable Diffusion results and its code's default
(``cache_layer_id=0, cache_block_id=0``): ``conv_in``, the first ResNet (and attention) of
the first down block, and the matching layers at the end of the last up block."""


@dataclass(eq=False)
class FeatureCache:
    """One sampling run's DeepCache state (Ma et al. 2024, "DeepCache: Accelerating Diffusion
    Models for Free"): the deep feature of the last full UNet evaluation and when to refresh it.

    Adjacent denoising steps change the UNet's deep features little (the paper's sec. 3), so
    a full evaluation every ``interval`` evaluations keeps the input of the last up block's
    layer at skip branch `CACHE_SKIP`, and the evaluations between run only the shallow
    layers on it (the paper's uniform 1:N strategy). ``interval=1`` refreshes at
    every evaluation: the plain network, bit for bit.

    Per call, never per pipeline: the loop of one ``generate`` makes one and passes it to
    every evaluation (pipelines are shared between threads, so nothing is kept on modules).
    An evaluation whose input differs in shape, dtype or device from the last full one (the
    guided batch halved outside a guidance interval) refreshes too.
    """

    interval: int
    """Evaluations per full UNet evaluation (N of the paper's 1:N)."""
    feature: Tensor | None = None
    """The kept deep feature (the last full evaluation's)."""
    full: int = 0
    """Full evaluations so far (the deep blocks ran)."""
    partial: int = 0
    """Shallow evaluations so far (they read `feature`)."""
    _since: int = 0
    _key: tuple[object, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int):
            raise InvalidArgumentError(f"feature_cache must be an int ≥ 1, got {self.interval!r}")
        if self.interval < 1:
            raise InvalidArgumentError(f"feature_cache must be an int ≥ 1, got {self.interval!r}")

    def refresh(self, sample: Tensor) -> bool:
        """Whether the evaluation of ``sample`` runs the whole network (counted either way)."""
        key = (tuple(sample.shape), sample.dtype, sample.device)
        if self.feature is None or key != self._key or self._since >= self.interval:
            self._key, self._since = key, 1
            self.full += 1
            return True
        self._since += 1
        self.partial += 1
        return False

    def keep(self, feature: Tensor) -> None:
        """Keep a full evaluation's deep feature for the shallow ones that follow."""
        self.feature = feature
