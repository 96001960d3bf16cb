"""The KL-regularised autoencoder that maps images to Stable Diffusion's latents and back.

Rombach et al. 2022, sec. 3.1: an encoder ``E`` gives a diagonal Gaussian posterior over
latents ``z`` (downsampled by ``2 ** (len(block_out_channels) - 1)``, 8 in SD), a decoder ``D``
maps ``z`` back to pixels. Module paths equal diffusers' ``AutoencoderKL`` checkpoint keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
    SpatialSelfAttention,
    Upsample,
)
from latentkit.noise import randn
from latentkit.protocols import Generators

# Checkpoints saved before diffusers 0.14 name the mid-block attention's projections
# `query/key/value/proj_attn`; today's names are `to_q/to_k/to_v/to_out.0`. Shapes are the same.
LEGACY_KEY_RENAMES: dict[str, str] = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}
_LEGACY_KEY = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.("
    + "|".join(LEGACY_KEY_RENAMES)
    + r")\.(weight|bias)$"
)

_VAE_EPS = 1e-6  # every norm in the LDM autoencoder uses 1e-6, not GroupNorm's default 1e-5


def rename_legacy_key(key: str) -> str:
    """The current name of an autoencoder state-dict ``key``; keys already current come back unchanged.

    >>> rename_legacy_key("decoder.mid_block.attentions.0.proj_attn.weight")
    'decoder.mid_block.attentions.0.to_out.0.weight'
    """
    match = _LEGACY_KEY.match(key)
    if match is None:
        return key
    path, old, kind = match.groups()
    return f"{path}.{LEGACY_KEY_RENAMES[old]}.{kind}"


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """The settings of an ``AutoencoderKL``, read from diffusers' ``vae/config.json``.

    Defaults are diffusers' own, so a config file that omits a key means the same here.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    """Multiplies the posterior sample so latents have roughly unit variance (Rombach et al. 2022, app. G)."""
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    """Whether diffusers runs this VAE in float32 even when the rest is half precision."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AutoencoderKLConfig:
        """Parse a diffusers AutoencoderKL config, raising `UnsupportedModelError` for any
        setting latentkit does not implement (other block types, ``shift_factor``, ...)."""
        check_config("vae", d)  # types and ranges first: InvalidConfigError, not a TypeError
        channels = tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels))
        for key, supported in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            kinds = d.get(key, (supported,))
            for i, kind in enumerate(kinds):
                if kind != supported:
                    raise UnsupportedModelError(
                        f"VAE config {key}[{i}]={kind!r} is not supported; use {supported!r}"
                    )
            if len(kinds) != len(channels):
                raise InvalidArgumentError(
                    f"VAE config {key} has {len(kinds)} entries but block_out_channels has {len(channels)}"
                )
        # Each of these changes what encode/decode compute; Stable Diffusion's VAEs leave them unset.
        fixed: dict[str, object] = {
            "act_fn": "silu",
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, value in fixed.items():
            if d.get(key, value) != value:
                raise UnsupportedModelError(
                    f"VAE config {key}={d[key]!r} is not supported; Stable Diffusion's VAEs use {value!r}"
                )
        sample_size = d.get("sample_size", 32)
        return cls(
            in_channels=int(d.get("in_channels", 3)),
            out_channels=int(d.get("out_channels", 3)),
            block_out_channels=channels,
            layers_per_block=int(d.get("layers_per_block", 1)),
            latent_channels=int(d.get("latent_channels", 4)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            sample_size=tuple(sample_size)
            if isinstance(sample_size, (list, tuple))
            else int(sample_size),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
            force_upcast=bool(d.get("force_upcast", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """This config as a diffusers ``vae/config.json`` (`from_dict` reads it back equal)."""
        blocks = len(self.block_out_channels)
        sample_size = self.sample_size
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * blocks,
            "up_block_types": ["UpDecoderBlock2D"] * blocks,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": list(sample_size) if isinstance(sample_size, tuple) else sample_size,
            "scaling_factor": self.scaling_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
            "force_upcast": self.force_upcast,
        }


@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior ``q(z | x) = N(mean, exp(logvar))``, independent per element."""

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split (B, 2C, h, w) encoder moments into mean and log-variance, clamping the latter
        to [-30, 20] so ``exp`` stays finite, as the LDM reference does."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: Generators = None) -> Tensor:
        """``mean + std * eps`` with ``eps`` drawn by `latentkit.noise.randn`, so a seeded
        generator gives the same draw as diffusers' ``latent_dist.sample(generator)``."""
        noise = randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean


@dataclass(frozen=True, kw_only=True)
class Tiling:
    """Run the autoencoder on overlapping square tiles, so memory stays bounded for large images.

    Pass it as ``tiling=`` to `AutoencoderKL.decode`, `AutoencoderKL.posterior` or
    `AutoencoderKL.encode`. Tiles are cut as in diffusers' ``enable_tiling()``.
    """

    tile_size: int | None = None
    """Side of a tile in pixels, a multiple of the model's ``scale_factor``; None means the
    config's ``sample_size`` (diffusers' ``tile_sample_min_size``)."""
    overlap: float = 0.25
    """Fraction of a tile shared with each neighbour, in [0, 1) (diffusers' ``tile_overlap_factor``)."""

    def __post_init__(self) -> None:
        size = self.tile_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise InvalidArgumentError(
                f"Tiling tile_size must be a positive int or None, not {size!r}"
            )
        if not 0.0 <= self.overlap < 1.0:
            raise InvalidArgumentError(f"Tiling overlap must be in [0, 1), not {self.overlap!r}")


def _blend_into(previous: Tensor, tile: Tensor, extent: int, dim: int) -> Tensor:
    """``tile`` with its first ``extent`` slices along ``dim`` faded linearly from the last ones
    of ``previous`` (weight 1 on ``previous`` at the edge, falling by ``1 / extent`` per slice)."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return tile
    shape = [1] * tile.dim()
    shape[dim] = extent
    # float64 weights, then cast: the same numbers as diffusers' Python-float `y / blend_extent`.
    weight = (torch.arange(extent, dtype=torch.float64, device=tile.device) / extent).view(shape)
    fading_out = previous.narrow(dim, previous.shape[dim] - extent, extent)
    fading_in, rest = torch.split(tile, [extent, tile.shape[dim] - extent], dim=dim)
    head = fading_out * (1 - weight).to(tile.dtype) + fading_in * weight.to(tile.dtype)
    return torch.cat([head, rest], dim=dim)


def _map_tiles(
    x: Tensor, fn: Callable[[Tensor], Tensor], *, tile: int, stride: int, blend: int, keep: int
) -> Tensor:
    """``fn`` applied to ``x`` (B, C, H, W) one ``tile`` x ``tile`` square at a time, stitched.

    Tiles start every ``stride`` input pixels (the last ones in a row or column are cut short
    by the border). Each output tile's first ``blend`` rows and columns are blended linearly
    with the already-blended tile above and to its left, then its first ``keep`` rows and
    columns go into the result, the algorithm of diffusers' ``tiled_decode``/``_tiled_encode``.
    Since ``fn``'s GroupNorms see one tile, not the whole input, the result differs slightly
    from ``fn(x)``, most near the seams. Only one row of output tiles is held at a time.
    """
    height, width = x.shape[-2:]
    result_rows: list[Tensor] = []
    above: list[Tensor] = []
    for top in range(0, height, stride):
        row: list[Tensor] = []
        for j, left in enumerate(range(0, width, stride)):
            out = fn(x[..., top : top + tile, left : left + tile])
            if above:
                out = _blend_into(above[j], out, blend, dim=-2)
            if row:
                out = _blend_into(row[-1], out, blend, dim=-1)
            row.append(out)
        result_rows.append(torch.cat([out[..., :keep, :keep] for out in row], dim=-1))
        above = row
    return torch.cat(result_rows, dim=-2)


class DecoderBlock(nn.Module):
    """ResNet blocks, then an optional `Upsample` doubling the resolution."""

    def __init__(self, resnets: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, (2 * x.shape[-2], 2 * x.shape[-1]))
        return x


def _resnet(c_in: int, c_out: int, groups: int) -> ResnetBlock:
    return ResnetBlock(c_in, c_out, temb_channels=None, groups=groups, eps=_VAE_EPS)


def _mid_block(config: AutoencoderKLConfig) -> MidBlock:
    c, groups = config.block_out_channels[-1], config.norm_num_groups
    attention = (
        SpatialSelfAttention(c, groups=groups, eps=_VAE_EPS)
        if config.mid_block_add_attention
        else None
    )
    return MidBlock((_resnet(c, c, groups), _resnet(c, c, groups)), attention)


class Encoder(nn.Module):
    """``E``: images (B, 3, H, W) to posterior moments (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                [
                    _resnet(channels[max(i - 1, 0)] if j == 0 else c, c, groups)
                    for j in range(config.layers_per_block)
                ],
                [],
                Downsample(c, padding=0) if i < len(channels) - 1 else None,
            )
            for i, c in enumerate(channels)
        )
        self.mid_block = _mid_block(config)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_VAE_EPS)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x = self.mid_block(x)
        out: Tensor = self.conv_out(F.silu(self.conv_norm_out(x)))
        return out


class Decoder(nn.Module):
    """``D``: latents (B, latent_channels, h, w) to images (B, 3, h*f, w*f) in about [-1, 1]."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = _mid_block(config)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                [
                    _resnet(channels[max(i - 1, 0)] if j == 0 else c, c, groups)
                    for j in range(config.layers_per_block + 1)
                ],
                Upsample(c) if i < len(channels) - 1 else None,
            )
            for i, c in enumerate(channels)
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_VAE_EPS)
        self.conv_out = Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        out: Tensor = self.conv_out(F.silu(self.conv_norm_out(x)))
        return out


class KLDecoder(nn.Module):
    """An `AutoencoderKL`'s decoding of unscaled latents (``post_quant_conv``, then the
    decoder) as a module of its own, for a backend that converts modules."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae._decode_eager(z)


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE. Implements `latentkit.protocols.Autoencoder`.

    Build it with ``AutoencoderKL(AutoencoderKLConfig.from_dict(config_json))``; its
    ``state_dict()`` keys equal those of diffusers' ``AutoencoderKL`` for the same config.
    """

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        self.config = config
        # Plain attributes, not properties: `protocols.Autoencoder` declares them as attributes.
        self.scale_factor: int = 2 ** (len(config.block_out_channels) - 1)
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        self.latent_channels: int = config.latent_channels
        self.scaling_factor: float = config.scaling_factor
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * c, 2 * c, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, kernel_size=1) if config.use_post_quant_conv else None
        self.decode_network: Callable[[Tensor], Tensor] | None = None
        """What decodes unscaled latents in place of `KLDecoder`'s eager forward: set by
        `latentkit.performance.Runtime` for another backend (OpenVINO), else None."""

    def posterior(self, images: Tensor, *, tiling: Tiling | None = None) -> DiagonalGaussian:
        """The posterior ``q(z | x)`` for ``images`` (B, 3, H, W) in [-1, 1], before scaling.

        With ``tiling``, images larger than one tile are encoded tile by tile (see `Tiling`).
        """
        if tiling is not None:
            latent_tile, latent_blend = self._tile_geometry(tiling)
            pixel_tile = latent_tile * self.scale_factor
            if images.shape[-2] > pixel_tile or images.shape[-1] > pixel_tile:
                moments = _map_tiles(
                    images,
                    self._moments,
                    tile=pixel_tile,
                    stride=(latent_tile - latent_blend) * self.scale_factor,
                    blend=latent_blend,
                    keep=latent_tile - latent_blend,
                )
                return DiagonalGaussian.from_moments(moments)
        return DiagonalGaussian.from_moments(self._moments(images))

    def encode(
        self, images: Tensor, *, generator: Generators = None, tiling: Tiling | None = None
    ) -> Tensor:
        """Latents for ``images``: a posterior sample times ``scaling_factor``."""
        return self.posterior(images, tiling=tiling).sample(generator) * self.scaling_factor

    def decode(self, latents: Tensor, *, tiling: Tiling | None = None) -> Tensor:
        """Images (unclamped, about [-1, 1]) for scaled ``latents``: the inverse of `encode`.

        With ``tiling``, latents larger than one tile are decoded tile by tile (see `Tiling`).
        """
        z = latents / self.scaling_factor
        if tiling is not None:
            latent_tile, latent_blend = self._tile_geometry(tiling)
            if z.shape[-2] > latent_tile or z.shape[-1] > latent_tile:
                return _map_tiles(
                    z,
                    self._decode_unscaled,
                    tile=latent_tile,
                    stride=latent_tile - latent_blend,
                    blend=latent_blend * self.scale_factor,
                    keep=(latent_tile - latent_blend) * self.scale_factor,
                )
        return self._decode_unscaled(z)

    def _moments(self, images: Tensor) -> Tensor:
        moments: Tensor = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def _decode_unscaled(self, z: Tensor) -> Tensor:
        if self.decode_network is not None:
            return self.decode_network(z)
        return self._decode_eager(z)

    def _decode_eager(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        images: Tensor = self.decoder(z)
        return images

    def _tile_geometry(self, tiling: Tiling) -> tuple[int, int]:
        """A tile's side and its overlap with each neighbour, both in latents.

        Computed in whole latents so pixel and latent strides always agree; this equals
        diffusers' geometry whenever ``tile_size / scale_factor * overlap`` is whole (the
        only case where diffusers' tiled output has the untiled shape).
        """
        size = tiling.tile_size
        if size is None:  # diffusers tiles squares of the first side of a (h, w) sample_size
            sample = self.config.sample_size
            size = sample[0] if isinstance(sample, tuple) else sample
            what = f"the config's sample_size {sample!r}"
        else:
            what = f"Tiling tile_size {size}"
        if size % self.scale_factor != 0:
            raise InvalidArgumentError(
                f"{what} is not a multiple of the VAE's scale factor {self.scale_factor}; "
                "pass a Tiling(tile_size=...) that is"
            )
        latent_tile = size // self.scale_factor
        return latent_tile, min(int(latent_tile * tiling.overlap), latent_tile - 1)
