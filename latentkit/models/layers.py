"""The building blocks the UNet and the autoencoder share, each written once.

Attribute names equal the keys of published diffusers checkpoints (``to_q``, ``to_out.0``,
``ff.net.0.proj``, ...), so a state dict loads by name with no conversion table. No module
registers a buffer and nothing in ``__init__`` reads data, so every block can be built on
the ``meta`` device and receive its weights with ``load_state_dict(..., assign=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError

ATTENTION_BACKENDS = ("sdpa", "math")
"""How `Attention` computes ``softmax(Q K^T / sqrt(d)) V``: ``"sdpa"`` is PyTorch's fused
kernel (flash / memory-efficient / math, picked per device and shape); ``"math"`` is the
explicit matmul-softmax-matmul, which is faster for the tiny heads of small models on CPU
(the fused CPU backward has a large fixed cost per call) and runs anywhere."""


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, backend: str = "sdpa", slice_size: int | None = None
) -> Tensor:
    """Scaled dot-product attention of (B, H, N, D) queries over (B, H, M, D) keys and values.

    ``slice_size`` computes at most that many (batch x head) slices at a time, so the
    (N, M) score matrix of only those slices is in memory at once (attention slicing);
    the result is the same as unsliced.
    """
    if slice_size is not None:
        b, h = q.shape[:2]
        q2, k2, v2 = (t.reshape(b * h, *t.shape[2:]) for t in (q, k, v))
        parts = [
            attend(
                q2[i : i + slice_size],
                k2[i : i + slice_size],
                v2[i : i + slice_size],
                backend=backend,
            )
            for i in range(0, b * h, slice_size)
        ]
        return torch.cat(parts).reshape(b, h, q.shape[2], v.shape[-1])
    if backend == "math":
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        return torch.matmul(scores.softmax(dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v)


GEMM_CONV_MAX_PIXELS = 64
"""Feature maps of at most this many pixels (8x8) are convolved as one GEMM when a
`Conv2d`'s ``gemm`` is on: on a CPU, oneDNN's direct kernel reaches a third of GEMM speed
for the few-pixel, many-channel convolutions at the bottom of a UNet (docs/performance.md)."""


def conv2d_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, *, padding: int) -> Tensor:
    """A stride-1 convolution of (N, C, H, W) ``x`` as one matrix product (im2col): the
    (K, C*kh*kw) weight times the (C*kh*kw, N*H*W) unfolded patches of the whole batch.

    Folding the batch into the product's columns reads the weight once per call; for the
    few-pixel maps this is used on, the weight (59 MB for SD's 1280-wide 3x3) dominates.
    """
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    if kh == kw == 1 and padding == 0:
        cols = x.transpose(0, 1).reshape(c, n * h * w)
    else:
        patches = F.unfold(x, (kh, kw), padding=padding)  # (N, C*kh*kw, H'*W')
        h, w = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
        cols = patches.transpose(0, 1).reshape(c * kh * kw, n * h * w)
    flat = weight.reshape(k, -1)
    out = flat @ cols if bias is None else torch.addmm(bias[:, None], flat, cols)
    return out.reshape(k, n, h, w).transpose(0, 1)


class Conv2d(nn.Conv2d):
    """`torch.nn.Conv2d` (same parameters and checkpoint keys) that, with ``gemm`` on,
    convolves feature maps of at most `GEMM_CONV_MAX_PIXELS` pixels with `conv2d_gemm`.

    The result equals the direct kernel's up to float rounding (a different summation
    order); ``gemm`` is off unless `latentkit.Performance.conv_gemm` turns it on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gemm = False

    def forward(self, input: Tensor) -> Tensor:
        if (
            self.gemm
            and input.shape[-1] * input.shape[-2] <= GEMM_CONV_MAX_PIXELS
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and self.padding[0] == self.padding[1]
            and input.ndim == 4
        ):
            return conv2d_gemm(input, self.weight, self.bias, padding=self.padding[0])
        return super().forward(input)


def timestep_embedding(
    timesteps: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal embedding (B, dim) of the (B,) diffusion ``timesteps`` (Ho et al. 2020, app. B).

    The frequencies are those of the Transformer's position encoding (Vaswani et al. 2017,
    sec. 3.5): ``max_period ** (-i / (dim / 2 - freq_shift))``. Stable Diffusion puts the
    cosines first (``flip_sin_to_cos``) with ``freq_shift = 0``. Computed in float32, as the
    reference does, whatever the dtype of the network.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]
    parts = (
        [torch.cos(angles), torch.sin(angles)]
        if flip_sin_to_cos
        else [torch.sin(angles), torch.cos(angles)]
    )
    embedding = torch.cat(parts, dim=-1)
    if dim % 2 == 1:  # an odd width gets one zero column, so the shape is what was asked for
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """The MLP that lifts the sinusoidal embedding to the width the ResNet blocks add in."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear_2(F.silu(self.linear_1(x)))
        return out


class ResnetBlock(nn.Module):
    """A pre-activation residual block, optionally shifted by the time embedding.

    ``GroupNorm -> SiLU -> conv -> (+ time) -> GroupNorm -> SiLU -> dropout -> conv``, added to
    the input (through a 1x1 ``conv_shortcut`` when the width changes). The UNet passes
    ``temb_channels``; the autoencoder, which has no time, passes ``None`` (and eps 1e-6).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = (
            nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        )
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        # Without autograd the block's own intermediates are updated in place (same values):
        # each new map is fresh memory, and at 512x512 a decoder map is 134 MB whose page
        # faults cost about as much as the elementwise op itself (docs/performance.md).
        inplace = not torch.is_grad_enabled()
        h: Tensor = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.time_emb_proj is not None:
            if temb is None:
                raise InvalidArgumentError("this ResnetBlock takes a time embedding; pass temb")
            shift = self.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = h.add_(shift) if inplace else h + shift
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        skip: Tensor = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = h.add_(skip) if inplace else skip + h
        if self.output_scale_factor != 1.0:
            out = out.div_(self.output_scale_factor) if inplace else out / self.output_scale_factor
        return out


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, sec. 3.2.2).

    ``softmax(Q K^T / sqrt(head_dim)) V`` over ``heads`` heads, with queries from ``x``
    (B, N, query_dim) and keys/values from ``context`` (B, M, context_dim), or from ``x``
    itself when ``context`` is ``None``. ``to_out`` is a list so the output projection's key
    is ``to_out.0``, as in the checkpoints.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        kv_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias)])
        self.cross = context_dim is not None
        self.to_qkv: nn.Linear | None = None
        """Set by `fuse_projections`: q, k and v of self-attention in one layer."""
        self.to_kv: nn.Linear | None = None
        """Set by `fuse_projections`: k and v of cross-attention in one layer."""
        self.backend = "sdpa"
        """One of `ATTENTION_BACKENDS`."""
        self.slice_size: int | None = None
        """Attention slicing (see `attend`); None computes all heads at once."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        batch = x.shape[0]

        def split_heads(t: Tensor) -> Tensor:  # (B, N, H*D) -> (B, H, N, D)
            return t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        if self.to_qkv is not None and context is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        elif self.to_kv is not None and context is not None:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)
        else:
            source = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        # No explicit float32 upcast (`upcast_attention` / `upcast_softmax` in configs): the fused
        # SDPA kernels accumulate in float32 already, and diffusers' default processor does the same.
        out = attend(
            split_heads(q),
            split_heads(k),
            split_heads(v),
            backend=self.backend,
            slice_size=self.slice_size,
        )  # (B, H, N, D)
        merged = out.transpose(1, 2).reshape(batch, -1, self.heads * out.shape[-1])
        projected: Tensor = self.to_out[0](merged)
        return projected

    def fuse_projections(self) -> None:
        """Compute q, k, v (self-attention) or k, v (cross-attention) with one matrix product.

        One larger GEMM instead of three small ones; the result is the same up to float
        rounding. The separate layers are replaced by ``to_qkv`` / ``to_kv``, but
        ``state_dict()`` still has the checkpoint keys (``to_q``, ``to_k``, ``to_v``), so a
        fused model saves like an unfused one. Fuse after loading.
        """
        if self.to_qkv is not None or self.to_kv is not None:
            return
        parts = ["to_k", "to_v"] if self.cross else ["to_q", "to_k", "to_v"]
        layers = [getattr(self, name) for name in parts]
        if any(type(layer) is not nn.Linear for layer in layers):
            # An adapted projection (a LoRA side path, `latentkit.adapters.lora`) computes more
            # than its weight: fusing would drop the side path, so leave this attention unfused.
            return
        first = layers[0]
        # Built on the meta device (no random init to throw away), then given the weights.
        fused = nn.Linear(
            first.in_features,
            sum(layer.out_features for layer in layers),
            bias=first.bias is not None,
            device="meta",
        )
        grad = first.weight.requires_grad
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), grad)
            if first.bias is not None:
                fused.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), grad)
        for name in parts:
            delattr(self, name)
        if self.cross:
            self.to_kv = fused
        else:
            self.to_qkv = fused
        self._register_state_dict_hook(_unfused_keys)  # type: ignore[no-untyped-call]


def _unfused_keys(
    module: nn.Module, state: dict[str, Tensor], prefix: str, metadata: object
) -> dict[str, Tensor]:
    """State-dict hook of a fused `Attention`: split ``to_qkv`` / ``to_kv`` back into the
    checkpoint's ``to_q`` / ``to_k`` / ``to_v`` entries."""
    for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
        for kind in ("weight", "bias"):
            tensor = state.pop(f"{prefix}{fused}.{kind}", None)
            if tensor is not None:
                for part, piece in zip(parts, tensor.chunk(len(parts)), strict=True):
                    state[f"{prefix}{part}.{kind}"] = piece
    return state


class SpatialSelfAttention(Attention):
    """The autoencoder's mid-block attention: one head over all pixels, GroupNorm first, residual.

    It is `Attention` with a ``group_norm`` beside the projections, so the keys stay flat
    (``attentions.0.group_norm``, ``attentions.0.to_q``, ...) as in the checkpoints.
    """

    def __init__(self, channels: int, *, groups: int, eps: float) -> None:
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        # `context` is accepted so MidBlock can call every attention alike; this one is self-attention.
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        out = super().forward(tokens)
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class GEGLU(nn.Module):
    """``a * GELU(b)`` for ``[a, b] = proj(x)``: the gated unit of Shazeer 2020 (GLU variants)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        out: Tensor = value * F.gelu(gate)
        return out


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width; ``net.1`` is an (empty) dropout so the keys are ``net.0``/``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and feed-forward, each residual.

    The conditioning mechanism of latent diffusion (Rombach et al. 2022, sec. 3.3): queries come
    from the image tokens, keys and values from the text encoder's output ``context``. With
    ``only_cross``, the first attention attends to the text too instead of to the image
    (diffusers' ``only_cross_attention``; the x4 upscaler's high-resolution levels).
    """

    def __init__(
        self, dim: int, *, heads: int, head_dim: int, context_dim: int, only_cross: bool = False
    ) -> None:
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(
            dim, heads=heads, head_dim=head_dim, context_dim=context_dim if only_cross else None
        )
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x), context if self.only_cross else None) + x
        x = self.attn2(self.norm2(x), context) + x
        out: Tensor = self.ff(self.norm3(x)) + x
        return out


class SpatialTransformer(nn.Module):
    """Cross-attention over an image: diffusers' ``Transformer2DModel`` as Stable Diffusion uses it.

    GroupNorm, a projection to ``heads * head_dim`` wide tokens (a 1x1 conv in SD 1.x, a linear
    layer in SD 2.x), ``depth`` transformer blocks, the projection back, plus the input
    (Rombach et al. 2022, sec. 3.3).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int,
        groups: int,
        linear_projection: bool,
        only_cross: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in: nn.Module
        self.proj_out: nn.Module
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in = Conv2d(channels, inner, kernel_size=1)
            self.proj_out = Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                inner,
                heads=heads,
                head_dim=head_dim,
                context_dim=context_dim,
                only_cross=only_cross,
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape

        def to_tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, H*W, C)
            return t.permute(0, 2, 3, 1).reshape(b, h * w, t.shape[1])

        # In channels-last mode the tokens already are the image's memory layout: keep it.
        layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )

        def to_image(t: Tensor) -> Tensor:  # (B, H*W, C) -> (B, C, H, W)
            return (
                t.reshape(b, h, w, t.shape[-1]).permute(0, 3, 1, 2).contiguous(memory_format=layout)
            )

        tokens = self.norm(x)
        # The two projections are the same map; they differ in whether they act before or after
        # the reshape to tokens, which is where each checkpoint family trained them.
        tokens = (
            to_tokens(self.proj_in(tokens))
            if not self.linear_projection
            else self.proj_in(to_tokens(tokens))
        )
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out: Tensor = (
            self.proj_out(to_image(tokens))
            if not self.linear_projection
            else to_image(self.proj_out(tokens))
        )
        return out + x


class Downsample(nn.Module):
    """A stride-2 3x3 convolution that halves the resolution.

    ``padding=0`` means the autoencoder's asymmetric padding: one zero row and column on the
    bottom and right only, as the original LDM encoder was trained with.
    """

    def __init__(self, channels: int, *, padding: int) -> None:
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        out: Tensor = self.conv(x)
        return out


UPSAMPLE_PHASES_MIN_PIXELS = 256
"""`Upsample` with ``phases`` on computes by phases from 16x16 input maps up: on smaller
ones one convolution of the upsampled map measured as fast (SD's 1280-channel 8x8 maps)."""


def _taps(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    # Along one axis of a 3x3 kernel, the output pixel 2i sees source pixels i-1 (tap 0)
    # and i (taps 1, 2); 2i+1 sees i (taps 0, 1) and i+1 (tap 2).
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def upsample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` with padding 1, as four 2x2 convolutions of ``x``.

    Upsampling repeats each pixel twice per axis, so of the 3x3 taps of an output pixel
    several land on the same source pixel; summing their weights first leaves, for each of
    the four output phases (row and column parity), a 2x2 kernel on the small map: 16
    multiply-adds per source pixel and channel pair instead of 36. The result equals the
    direct computation up to float rounding. Keeps ``x``'s memory format (NCHW or NHWC).
    """
    n, _, h, w = x.shape
    k = weight.shape[0]
    rows = _taps(weight, 2)  # per row phase: (K, C, 2, 3)
    kernels = [col for row in rows for col in _taps(row, 3)]  # phases (0,0), (0,1), (1,0), (1,1)
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    stacked = torch.cat(kernels)
    if nhwc:
        stacked = stacked.contiguous(memory_format=torch.channels_last)
    # One convolution for all phases; output (N, 4K, H+1, W+1), where phase (a, b) of
    # output pixel (2i+a, 2j+b) is at (i+a, j+b).
    y = F.conv2d(x, stacked, None if bias is None else bias.repeat(4), padding=1)
    y = y.view(n, 2, 2, k, h + 1, w + 1)
    if nhwc:
        out = x.new_empty(n, h, 2, w, 2, k)
        for a in range(2):
            for b in range(2):
                out[:, :, a, :, b] = y[:, a, b, :, a : a + h, b : b + w].permute(0, 2, 3, 1)
        return out.view(n, 2 * h, 2 * w, k).permute(0, 3, 1, 2)
    # Interleave the phases by stacking and one reshape (a depth-to-space), not by writes
    # into slices: traced for another runtime (OpenVINO), slice writes become scatters with
    # an index constant per element (hundreds of MB at 512x512).
    phases = [y[:, a, b, :, a : a + h, b : b + w] for a in range(2) for b in range(2)]
    out = torch.stack(phases, dim=-1).view(n, k, h, w, 2, 2)
    return out.permute(0, 1, 2, 4, 3, 5).reshape(n, k, 2 * h, 2 * w)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to ``size``, then a 3x3 convolution.

    Callers pass the size of the matching skip connection rather than doubling, so a latent
    with an odd side (e.g. 9x11) comes back to exactly the size it had on the way down.
    With ``phases`` on (`latentkit.Performance.upsample_phases`), an exact doubling of a
    map of at least `UPSAMPLE_PHASES_MIN_PIXELS` runs as `upsample_conv2d`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)
        self.phases = False

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        h, w = x.shape[-2:]
        # Phases read the convolution's weight, so only a plain `Conv2d` (not one carrying a
        # LoRA side path, `latentkit.adapters.lora`) may run by phases.
        if (
            self.phases
            and type(self.conv) is Conv2d
            and tuple(size) == (2 * h, 2 * w)
            and h * w >= UPSAMPLE_PHASES_MIN_PIXELS
        ):
            return upsample_conv2d(x, self.conv.weight, self.conv.bias)
        out: Tensor = self.conv(F.interpolate(x, size=size, mode="nearest"))
        return out


class DownBlock(nn.Module):
    """ResNet blocks, each optionally followed by attention, then an optional `Downsample`.

    `forward` also returns every intermediate output: the UNet keeps them as skip
    connections (Rombach et al. 2022, fig. 3); the autoencoder's encoder ignores them.
    """

    def __init__(
        self,
        resnets: list[ResnetBlock],
        attentions: list[SpatialTransformer],
        downsample: Downsample | None,
    ) -> None:
        super().__init__()
        if attentions and len(attentions) != len(resnets):
            raise InvalidArgumentError(
                f"{len(resnets)} resnets need as many attentions, got {len(attentions)}"
            )
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty for a block without attention: no keys
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(
        self, x: Tensor, temb: Tensor | None = None, context: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        outputs: list[Tensor] = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[i](x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution; the attention is optional (some VAEs drop it)."""

    def __init__(
        self, resnets: tuple[ResnetBlock, ResnetBlock], attention: nn.Module | None
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention] if attention is not None else [])

    def forward(
        self, x: Tensor, temb: Tensor | None = None, context: Tensor | None = None
    ) -> Tensor:
        x = self.resnets[0](x, temb)
        for attention in self.attentions:
            x = attention(x, context)
        out: Tensor = self.resnets[1](x, temb)
        return out
