"""TAESD, the tiny autoencoder for fast previews and decodes (diffusers' ``AutoencoderTiny``).

Ollin Boer Bohan's TAESD ("Tiny AutoEncoder for Stable Diffusion", github.com/madebyollin/taesd)
is a plain convolutional encoder and decoder, distilled to map images to the latents of
Stable Diffusion's KL autoencoder (Rombach et al. 2022, sec. 3.1) and back: no attention, no
normalisation, no posterior to sample, about 1 M parameters per half against the KL
decoder's 50 M. Its latents are Stable Diffusion's *unscaled* ones, so its ``scaling_factor``
is 1.0. Module paths equal diffusers' ``AutoencoderTiny`` checkpoint keys
(``encoder.layers.*``, ``decoder.layers.*``), so the published ``madebyollin/taesd`` and
``madebyollin/taesdxl`` folders load by name.

`autoencoder_config` is the one place that chooses the autoencoder class of a config, by its
``_class_name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError, InvalidConfigError, UnsupportedModelError
from latentkit.models.layers import Conv2d
from latentkit.protocols import Generators

if TYPE_CHECKING:
    from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig, Tiling

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
}
"""The activations diffusers' ``get_activation`` names (TAESD uses ``relu``)."""


def _ints(d: Mapping[str, Any], key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = d.get(key, default)
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in value)
    ):
        raise InvalidConfigError(
            f"AutoencoderTiny config {key}={value!r} is invalid; it must be a non-empty list "
            "of ints in [1, 4096]"
        )
    return tuple(value)


def _number(d: Mapping[str, Any], key: str, default: float, *, low: float, high: float) -> float:
    value = d.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not low <= float(value) <= high
    ):
        raise InvalidConfigError(
            f"AutoencoderTiny config {key}={value!r} is invalid; it must be a number in "
            f"[{low:g}, {high:g}]"
        )
    return float(value)


@dataclass(frozen=True)
class AutoencoderTinyConfig:
    """The settings of an ``AutoencoderTiny``, read from diffusers' ``config.json``
    (``_class_name: AutoencoderTiny``). Defaults are diffusers' own (TAESD's)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    """`TinyBlock`s per encoder stage; every stage after the first starts with a stride-2
    convolution."""
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    """`TinyBlock`s per decoder stage; every stage but the last ends with an upsampling."""
    act_fn: str = "relu"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    latent_magnitude: float = 3.0
    """Only for storing latents as bytes (diffusers' ``scale_latents``): ``[-m, m]`` → [0, 1]."""
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    """Multiplies the encoder's output into the denoiser's latents (TAESD's are already SD's
    unscaled latents' scale: 1.0), as diffusers' pipelines multiply ``vae.config.scaling_factor``."""
    force_upcast: bool = False
    """diffusers forces it to False: TAESD runs in half precision."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AutoencoderTinyConfig:
        """Parse a diffusers AutoencoderTiny config: `InvalidConfigError` for a wrong value,
        `UnsupportedModelError` for a setting Stable Diffusion pipelines do not use."""
        name = d.get("_class_name", "AutoencoderTiny")
        if name != "AutoencoderTiny":
            raise InvalidConfigError(f"an AutoencoderTiny config has _class_name {name!r}")
        enc = _ints(d, "encoder_block_out_channels", cls.encoder_block_out_channels)
        dec = _ints(d, "decoder_block_out_channels", cls.decoder_block_out_channels)
        n_enc = _ints(d, "num_encoder_blocks", cls.num_encoder_blocks)
        n_dec = _ints(d, "num_decoder_blocks", cls.num_decoder_blocks)
        for what, channels, counts in (("encoder", enc, n_enc), ("decoder", dec, n_dec)):
            if len(channels) != len(counts):
                raise InvalidConfigError(
                    f"AutoencoderTiny config: {what}_block_out_channels has {len(channels)} "
                    f"entries but num_{what}_blocks has {len(counts)}"
                )
        act = d.get("act_fn", "relu")
        if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"AutoencoderTiny config act_fn={act!r} is not supported; use one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        upsample = d.get("upsample_fn", "nearest")
        if upsample != "nearest":
            raise UnsupportedModelError(
                f"AutoencoderTiny config upsample_fn={upsample!r} is not supported; TAESD "
                "upsamples with 'nearest'"
            )
        shift = d.get("shift_factor", 0.0)
        if shift not in (None, 0, 0.0):
            raise UnsupportedModelError(
                f"AutoencoderTiny config shift_factor={shift!r} is not supported: Stable "
                "Diffusion pipelines do not shift latents"
            )
        factor = d.get("upsampling_scaling_factor", 2)
        if isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= 8:
            raise InvalidConfigError(
                f"AutoencoderTiny config upsampling_scaling_factor={factor!r} is invalid; it "
                "must be an int in [1, 8]"
            )
        if factor ** (len(dec) - 1) != 2 ** (len(enc) - 1):
            raise UnsupportedModelError(
                f"AutoencoderTiny config: the encoder downsamples by {2 ** (len(enc) - 1)} but "
                f"the decoder upsamples by {factor ** (len(dec) - 1)}"
            )
        widths: dict[str, int] = {}
        for key in ("in_channels", "out_channels", "latent_channels"):
            value = d.get(key, 4 if key == "latent_channels" else 3)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise InvalidConfigError(
                    f"AutoencoderTiny config {key}={value!r} is invalid; it must be an int in "
                    "[1, 64]"
                )
            widths[key] = value
        return cls(
            in_channels=widths["in_channels"],
            out_channels=widths["out_channels"],
            latent_channels=widths["latent_channels"],
            encoder_block_out_channels=enc,
            decoder_block_out_channels=dec,
            num_encoder_blocks=n_enc,
            num_decoder_blocks=n_dec,
            act_fn=act.lower(),
            upsampling_scaling_factor=factor,
            latent_magnitude=_number(d, "latent_magnitude", 3.0, low=1e-6, high=1e6),
            latent_shift=_number(d, "latent_shift", 0.5, low=-1e6, high=1e6),
            scaling_factor=_number(d, "scaling_factor", 1.0, low=1e-6, high=1e6),
        )

    def to_dict(self) -> dict[str, Any]:
        """This config as a diffusers ``config.json`` (`from_dict` reads it back equal)."""
        return {
            "_class_name": "AutoencoderTiny",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "encoder_block_out_channels": list(self.encoder_block_out_channels),
            "decoder_block_out_channels": list(self.decoder_block_out_channels),
            "num_encoder_blocks": list(self.num_encoder_blocks),
            "num_decoder_blocks": list(self.num_decoder_blocks),
            "act_fn": self.act_fn,
            "upsample_fn": "nearest",
            "latent_channels": self.latent_channels,
            "upsampling_scaling_factor": self.upsampling_scaling_factor,
            "latent_magnitude": self.latent_magnitude,
            "latent_shift": self.latent_shift,
            "scaling_factor": self.scaling_factor,
            "shift_factor": 0.0,
            "force_upcast": False,
        }


class TinyBlock(nn.Module):
    """TAESD's residual block: three 3x3 convolutions with the activation between them,
    plus the input (through a 1x1 convolution where the width changes), then a ReLU
    (diffusers' ``AutoencoderTinyBlock``; ``fuse`` is always a ReLU there too)."""

    def __init__(self, c_in: int, c_out: int, act: str) -> None:
        super().__init__()
        activation = ACTIVATIONS[act]
        self.conv = nn.Sequential(
            Conv2d(c_in, c_out, kernel_size=3, padding=1),
            activation(),
            Conv2d(c_out, c_out, kernel_size=3, padding=1),
            activation(),
            Conv2d(c_out, c_out, kernel_size=3, padding=1),
        )
        self.skip: nn.Module = (
            Conv2d(c_in, c_out, kernel_size=1, bias=False) if c_in != c_out else nn.Identity()
        )
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fuse(self.conv(x) + self.skip(x))
        return out


class TinyEncoder(nn.Module):
    """Images in [-1, 1] to latents: per stage a convolution (stride 2 after the first) and
    its `TinyBlock`s, then a 3x3 convolution to the latent channels."""

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        channels = config.encoder_block_out_channels
        layers: list[nn.Module] = []
        for i, (c, count) in enumerate(zip(channels, config.num_encoder_blocks, strict=True)):
            if i == 0:
                layers.append(Conv2d(config.in_channels, c, kernel_size=3, padding=1))
            else:
                layers.append(Conv2d(c, c, kernel_size=3, padding=1, stride=2, bias=False))
            layers += [TinyBlock(c, c, config.act_fn) for _ in range(count)]
        layers.append(Conv2d(channels[-1], config.latent_channels, kernel_size=3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        # TAESD works on [0, 1] images; diffusers' convention is [-1, 1].
        out: Tensor = self.layers(images.add(1).div(2))
        return out


class TinyDecoder(nn.Module):
    """Latents to images in [-1, 1]: a soft clamp of the latents to (-3, 3), a convolution,
    then per stage its `TinyBlock`s, an upsampling (all stages but the last) and a
    convolution (to the output channels in the last stage)."""

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        channels = config.decoder_block_out_channels
        act = ACTIVATIONS[config.act_fn]
        layers: list[nn.Module] = [
            Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1),
            act(),
        ]
        last = len(channels) - 1
        for i, (c, count) in enumerate(zip(channels, config.num_decoder_blocks, strict=True)):
            layers += [TinyBlock(c, c, config.act_fn) for _ in range(count)]
            if i < last:
                layers.append(nn.Upsample(scale_factor=config.upsampling_scaling_factor))
            out = config.out_channels if i == last else c
            layers.append(Conv2d(c, out, kernel_size=3, padding=1, bias=i == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        # TAESD's soft clamp: tanh(z / 3) * 3 keeps outliers in the range it was trained on.
        out: Tensor = self.layers(torch.tanh(z / 3) * 3)
        return out.mul(2).sub(1)  # [0, 1] → [-1, 1]


class AutoencoderTiny(nn.Module):
    """TAESD. Implements `latentkit.protocols.Autoencoder`, and the keyword ``tiling`` of
    `AutoencoderKL`'s methods (None only: `Performance.vae_tiling` is for the KL autoencoder).

    Build it with ``AutoencoderTiny(AutoencoderTinyConfig.from_dict(config_json))``; its
    ``state_dict()`` keys equal those of diffusers' ``AutoencoderTiny`` for the same config.
    """

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        self.config = config
        self.scale_factor: int = 2 ** (len(config.encoder_block_out_channels) - 1)
        """Pixels per latent along each side (8 for TAESD)."""
        self.latent_channels: int = config.latent_channels
        self.scaling_factor: float = config.scaling_factor
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    def encode(
        self, images: Tensor, *, generator: Generators = None, tiling: Tiling | None = None
    ) -> Tensor:
        """Latents for ``images`` (B, 3, H, W) in [-1, 1], times ``scaling_factor``.

        Deterministic: there is no posterior, so ``generator`` is not drawn from (as
        diffusers' ``retrieve_latents`` reads ``AutoencoderTinyOutput.latents``)."""
        _no_tiling(tiling)
        latents: Tensor = self.encoder(images)
        return latents * self.scaling_factor

    def decode(self, latents: Tensor, *, tiling: Tiling | None = None) -> Tensor:
        """Images (about [-1, 1]) for scaled ``latents``: diffusers' ``decode(latents /
        scaling_factor)``."""
        _no_tiling(tiling)
        out: Tensor = self.decoder(latents / self.scaling_factor)
        return out


def _no_tiling(tiling: object) -> None:
    if tiling is not None:
        raise InvalidArgumentError(
            "vae_tiling works with the KL autoencoder only; AutoencoderTiny decodes large "
            "images in little memory without it: load the pipeline without vae_tiling"
        )


def autoencoder_config(d: Mapping[str, Any]) -> AutoencoderKLConfig | AutoencoderTinyConfig:
    """The parsed config of an autoencoder ``config.json``, of the class its ``_class_name``
    names: ``AutoencoderTiny`` (TAESD) or, for anything else, ``AutoencoderKL`` (whose parser
    refuses what it does not implement). The one place the class is chosen."""
    from latentkit.models.autoencoder import AutoencoderKLConfig

    if is_tiny(d):
        return AutoencoderTinyConfig.from_dict(d)
    return AutoencoderKLConfig.from_dict(d)


def is_tiny(d: Mapping[str, Any]) -> bool:
    """Whether the autoencoder config ``d`` is a TAESD's (``_class_name: AutoencoderTiny``)."""
    return d.get("_class_name") == "AutoencoderTiny"


def build_autoencoder(
    config: AutoencoderKLConfig | AutoencoderTinyConfig,
) -> AutoencoderKL | AutoencoderTiny:
    """The network of a parsed autoencoder config (on the current default device)."""
    from latentkit.models.autoencoder import AutoencoderKL

    if isinstance(config, AutoencoderTinyConfig):
        return AutoencoderTiny(config)
    return AutoencoderKL(config)
