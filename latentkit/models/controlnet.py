"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models"): a trainable copy of the UNet's encoder that reads a control image.

`ControlNetConfig` reads a diffusers ``ControlNetModel`` ``config.json``; `ControlNet` is the
network, with module paths equal to that model's state-dict keys, so weights load by name.
It is the UNet's encoder half (`latentkit.models.unet.UNetEncoder`, built once for both) plus
the control image's embedding network and one "zero convolution" per skip connection and for
the middle block (sec. 3.1, eq. 2: ``y_c = F(x) + Z(F_c(x + Z(c)))``); its output,
`ControlResiduals`, is added to the frozen UNet's skip connections and middle block (sec. 3.2).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError, InvalidConfigError, UnsupportedModelError
from latentkit.models.config_checks import MAX_BLOCKS, MAX_CHANNELS
from latentkit.models.layers import Conv2d
from latentkit.models.unet import UNetConfig, UNetEncoder
from latentkit.protocols import ControlResiduals

ChannelOrder = Literal["rgb", "bgr"]

_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_CLASS_NAMES = ("ControlNetModel",)


@dataclass(frozen=True)
class ControlNetConfig:
    """The settings of a ControlNet, read from diffusers' ``ControlNetModel`` ``config.json``."""

    unet: UNetConfig
    """The encoder's settings, as those of the UNet it copies (its up half is the mirror of
    the down half and is not built; ``out_channels`` equals ``in_channels``)."""
    conditioning_channels: int = 3
    """Channels of the control image (3: an RGB picture of edges, depth, pose...)."""
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    """Widths of the control image's embedding network; each step after the first halves the
    resolution, so ``2 ** (len - 1)`` must equal the autoencoder's factor (8 for SD)."""
    channel_order: ChannelOrder = "rgb"
    """``"bgr"``: the network was trained on BGR images; the RGB input is flipped."""
    global_pool_conditions: bool = False
    """The residuals are averaged over the image (the "shuffle" ControlNet); the pipeline then
    runs in guess mode, as diffusers does."""

    @property
    def downscale(self) -> int:
        """Pixels of the control image per latent pixel along each side."""
        return int(2 ** (len(self.conditioning_embedding_out_channels) - 1))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ControlNetConfig:
        """Parse a diffusers ControlNet config; `InvalidConfigError` for a value of the wrong
        type or range, `UnsupportedModelError` for a setting latentkit does not implement
        (ControlNet-XS, union ControlNets, a mid block without attention, ...)."""
        if not isinstance(d, Mapping):
            raise InvalidConfigError(
                f"a ControlNet config must be a JSON object, got {type(d).__name__}"
            )
        name = d.get("_class_name", "ControlNetModel")
        if name not in _CLASS_NAMES:
            raise UnsupportedModelError(
                f"ControlNet config _class_name={name!r} is not supported; latentkit loads "
                f"diffusers' {' / '.join(_CLASS_NAMES)}"
            )
        down = d.get("down_block_types", UNetConfig.down_block_types)
        if not isinstance(down, (list, tuple)):
            raise InvalidConfigError(f"ControlNet config down_block_types={down!r} is not a list")
        # The encoder is a UNet's: parse it as one (the same checks and refusals), with the
        # up half a mirror of the down half, which a ControlNet config does not describe.
        unet = UNetConfig.from_dict(
            {
                **d,
                "out_channels": d.get("in_channels", 4),
                "up_block_types": [_UP_OF_DOWN.get(str(k), "UpBlock2D") for k in down][::-1],
            }
        )
        channels = d.get("conditioning_channels", 3)
        if not _is_int(channels) or not 1 <= channels <= 64:
            raise InvalidConfigError(
                f"ControlNet config conditioning_channels={channels!r} must be an int from 1 to 64"
            )
        widths = d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        if (
            not isinstance(widths, (list, tuple))
            or not 1 <= len(widths) <= MAX_BLOCKS
            or not all(_is_int(w) and 1 <= w <= MAX_CHANNELS for w in widths)
        ):
            raise InvalidConfigError(
                f"ControlNet config conditioning_embedding_out_channels={widths!r} must be a "
                f"list of 1 to {MAX_BLOCKS} ints from 1 to {MAX_CHANNELS}"
            )
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise UnsupportedModelError(
                f"ControlNet config controlnet_conditioning_channel_order={order!r} is not "
                "supported; latentkit reads 'rgb' and 'bgr'"
            )
        pool = d.get("global_pool_conditions", False)
        if not isinstance(pool, bool):
            raise InvalidConfigError(
                f"ControlNet config global_pool_conditions={pool!r} must be true or false"
            )
        return cls(
            unet=unet,
            conditioning_channels=int(channels),
            conditioning_embedding_out_channels=tuple(int(w) for w in widths),
            channel_order=order,
            global_pool_conditions=pool,
        )

    def to_dict(self) -> dict[str, Any]:
        """This config as a diffusers ``config.json`` (`from_dict` reads it back equal)."""
        unet = self.unet.to_dict()
        for key in ("out_channels", "up_block_types"):
            del unet[key]
        return {
            **unet,
            "_class_name": "ControlNetModel",
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": self.channel_order,
            "global_pool_conditions": self.global_pool_conditions,
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ConditioningEmbedding(nn.Module):
    """The control image's encoder E(·) of sec. 3.2: a 3x3 convolution, then per step a 3x3
    convolution and a stride-2 3x3 convolution (SiLU after each), and a zero-initialised 3x3
    convolution to the UNet's first width: image space to latent resolution."""

    def __init__(self, channels_in: int, widths: tuple[int, ...], channels_out: int) -> None:
        super().__init__()
        self.conv_in = Conv2d(channels_in, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in itertools.pairwise(widths):
            self.blocks.append(Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = Conv2d(widths[-1], channels_out, kernel_size=3, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        x = F.silu(self.conv_in(image))
        for block in self.blocks:
            x = F.silu(block(x))
        out: Tensor = self.conv_out(x)
        return out


class ControlNet(UNetEncoder):
    """A ControlNet: the UNet's encoder (``conv_in``, ``time_embedding``, ``add_embedding``,
    ``down_blocks``, ``mid_block``), ``controlnet_cond_embedding`` for the control image, and
    the 1x1 zero convolutions ``controlnet_down_blocks`` (one per skip connection) and
    ``controlnet_mid_block``.

    Build it with ``ControlNet(ControlNetConfig.from_dict(config_json))``; its
    ``state_dict()`` keys equal those of diffusers' ``ControlNetModel`` for the same config.
    """

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__(config.unet)
        self.control_config = config
        channels = config.unet.block_out_channels
        self.controlnet_cond_embedding = ConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_out_channels, channels[0]
        )
        # One zero convolution per skip connection, at that skip's width: conv_in's output,
        # each layer of each level, and each level's downsampler (all but the last level's).
        widths = [channels[0]]
        for i, c in enumerate(channels):
            widths += [c] * config.unet.layers_per_block
            if i < len(channels) - 1:
                widths.append(c)
        self.controlnet_down_blocks = nn.ModuleList(Conv2d(c, c, kernel_size=1) for c in widths)
        self.controlnet_mid_block = Conv2d(channels[-1], channels[-1], kernel_size=1)

    @classmethod
    def from_unet(
        cls,
        unet: UNetEncoder,
        *,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> ControlNet:
        """A ControlNet to train for ``unet``: its encoder a copy of the UNet's (``conv_in``,
        the time, vector and class embeddings, the down blocks and the middle block, weights
        copied), and every zero convolution (``controlnet_down_blocks``,
        ``controlnet_mid_block`` and the control embedding's ``conv_out``) zero, so that
        before training it adds nothing and the UNet draws as before (Zhang et al. 2023,
        sec. 3.1 and 3.3; diffusers' ``ControlNetModel.from_unet``). The rest of the control
        embedding is initialised from torch's global generator, as any new module.

        ``conditioning_embedding_out_channels`` needs ``2 ** (len - 1)`` equal to the
        autoencoder's factor (8 for Stable Diffusion, 4 for the built-in shapes model).
        Raises `InvalidConfigError` for values `ControlNetConfig.from_dict` refuses.
        """
        base = unet.config.to_dict()
        # A ControlNet config has no sample size (diffusers' ``ControlNetModel`` takes none).
        del base["sample_size"]
        config = ControlNetConfig.from_dict(
            {
                **base,
                "_class_name": "ControlNetModel",
                "conditioning_channels": conditioning_channels,
                "conditioning_embedding_out_channels": list(conditioning_embedding_out_channels),
            }
        )
        controlnet = cls(config)
        mine = controlnet.state_dict()
        # The encoder's keys are the UNet's own (the same `UNetEncoder` builds both halves).
        copied = {k: v for k, v in unet.state_dict().items() if k in mine}
        controlnet.load_state_dict(copied, strict=False)
        zero = [
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out,
        ]
        with torch.no_grad():
            for conv in zero:
                for p in conv.parameters():
                    p.zero_()
        return controlnet.to(next(unet.parameters()).device, next(unet.parameters()).dtype)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        image: Tensor,
        vector: Tensor | None = None,
        *,
        scale: float = 1.0,
        ramp: bool = False,
    ) -> ControlResiduals:
        """The residuals for ``sample`` (B, in_channels, h, w) at ``timestep`` given the text
        ``encoder_hidden_states``, the control ``image`` (B, conditioning_channels, H, W) in
        [0, 1] at the output size, and ``vector`` (SDXL's, as for the UNet), times ``scale``.

        ``ramp`` (diffusers' ``guess_mode``): the skip residuals are scaled from 0.1 (the
        first) up to 1 (the middle block's) on a log scale, so the control steers the coarse
        features more than the fine ones.
        """
        factor = self.control_config.downscale
        expected = (sample.shape[-2] * factor, sample.shape[-1] * factor)
        if image.ndim != 4 or tuple(image.shape[-2:]) != expected:
            raise InvalidArgumentError(
                f"the control image has shape {tuple(image.shape)}; this ControlNet needs "
                f"(batch, {self.control_config.conditioning_channels}, {expected[0]}, "
                f"{expected[1]}) for latents of shape {tuple(sample.shape)}"
            )
        if image.shape[1] != self.control_config.conditioning_channels:
            raise InvalidArgumentError(
                f"the control image has {image.shape[1]} channels; this ControlNet reads "
                f"{self.control_config.conditioning_channels}"
            )
        if self.control_config.channel_order == "bgr":
            image = torch.flip(image, dims=[1])
        temb = self.embed_time(sample, timestep, vector)
        context = encoder_hidden_states
        # Sec. 3.2: the control image's features join the encoder's input.
        x = self.conv_in(sample) + self.controlnet_cond_embedding(image)
        x, skips = self.encode(x, temb, context)
        x = self.mid_block(x, temb, context)
        down = [zero(skip) for zero, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid: Tensor = self.controlnet_mid_block(x)
        if ramp and not self.control_config.global_pool_conditions:
            # diffusers' guess mode: 10^-1 ... 10^0 over the skips and the middle block.
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * scale
            down = [r * s for r, s in zip(down, scales, strict=False)]
            mid = mid * scales[-1]
        else:
            down = [r * scale for r in down]
            mid = mid * scale
        if self.control_config.global_pool_conditions:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlResiduals(tuple(down), mid)
