"""`latentkit.Performance`: every speed/memory option against the plain path on the same weights.

Tolerances are max abs differences on fp32 images in [0, 1]. Options that only re-associate
float sums (fused projections, another attention kernel, NHWC convolutions) are held to
1e-5; bf16 autocast computes in 8-bit mantissas and is held to what it measured plus margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import latentkit
from latentkit.models.layers import Attention, attend, conv2d_gemm, upsample_conv2d
from latentkit.performance import Performance

SIZE = 32
REORDER_TOL = 1e-5  # float re-association only


def load(path: Path, **options: Any) -> latentkit.LatentDiffusion:
    return latentkit.load_pipeline(
        path, device="cpu", dtype="fp32", progress=False, performance=Performance(**options)
    )


def images(pipe: latentkit.LatentDiffusion, **kw: Any) -> np.ndarray:
    kw = {"steps": 4, "seed": 3, "height": SIZE, "width": SIZE, **kw}
    result = pipe.generate(
        ["a red circle", "a blue square"], output_type="np", progress=False, **kw
    )
    return np.stack(result.images)


@pytest.fixture(scope="module")
def plain(sd1_path: Path) -> np.ndarray:
    return images(load(sd1_path))


@pytest.mark.parametrize(
    "options",
    [
        {"attention": "math"},
        {"attention_slice_size": 1},
        {"attention": "math", "attention_slice_size": 3},
        {"fuse_qkv": False},
        {"conv_gemm": False},
        {"upsample_phases": False},
        {"channels_last": False},
        {"channels_last": True},
        {"channels_last": True, "conv_gemm": False},
        {"channels_last": True, "fuse_qkv": False, "attention": "math"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_reordering_options_match_the_plain_path(
    sd1_path: Path, plain: np.ndarray, options: dict[str, Any]
) -> None:
    assert np.abs(images(load(sd1_path, **options)) - plain).max() <= REORDER_TOL


def test_sd2_linear_projections_with_every_reordering_option(sd2_path: Path) -> None:
    fast = load(
        sd2_path, channels_last=True, fuse_qkv=True, attention="math", attention_slice_size=2
    )
    diff = np.abs(images(fast) - images(load(sd2_path))).max()
    assert diff <= REORDER_TOL


def test_bf16_autocast_is_close_to_fp32(sd1_path: Path, plain: np.ndarray) -> None:
    fast = load(sd1_path, autocast="bf16")
    out = images(fast)
    assert out.dtype == plain.dtype
    # Measured on these random tiny weights (4 steps): mean 6.4e-3, max 4.5e-2. bf16 keeps 8
    # mantissa bits, and random weights amplify rounding more than trained ones do.
    diff = np.abs(out - plain)
    assert diff.mean() < 1.2e-2
    assert diff.max() < 8e-2
    assert fast.dtype == torch.float32  # the weights stay as loaded


def test_compile_matches_and_does_not_recompile_per_call(sd1_path: Path, plain: np.ndarray) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = load(sd1_path, compile=True, compile_backend="aot_eager")
    assert np.abs(images(pipe) - plain).max() <= REORDER_TOL
    frames = counters["stats"]["unique_graphs"]
    assert frames >= 1
    # Another prompt, seed, scheduler and step count with the same shapes: no new graphs.
    images(pipe, seed=9, steps=3, scheduler="euler")
    assert counters["stats"]["unique_graphs"] == frames


def test_vae_tiling_decodes_tile_by_tile(sd1_path: Path) -> None:
    tiled = load(sd1_path, vae_tiling=latentkit.Tiling(tile_size=16, overlap=0.25))
    plain = load(sd1_path)
    latents = plain.generate(
        "a red circle", steps=2, seed=1, height=48, width=64, output_type="latent", progress=False
    ).images[0][None]
    ours = tiled.generate(
        "a red circle", steps=2, seed=1, height=48, width=64, output_type="pt", progress=False
    ).images[0]
    direct = tiled.vae.decode(latents, tiling=latentkit.Tiling(tile_size=16, overlap=0.25))
    expected = (direct[0] / 2 + 0.5).clamp(0, 1)
    assert torch.equal(ours, expected)
    # ...and it is not the untiled image (the tiles really were used).
    untiled = plain.generate(
        "a red circle", steps=2, seed=1, height=48, width=64, output_type="pt", progress=False
    ).images[0]
    assert (ours - untiled).abs().max() > 1e-3


def test_vae_tiling_is_exact_within_one_tile(sd1_path: Path) -> None:
    tiled = load(sd1_path, vae_tiling=True)  # the tiny VAE's tile is its sample_size, 16 px
    out = tiled.generate(
        "a red circle", steps=2, seed=1, height=16, width=16, output_type="np", progress=False
    ).images[0]
    ref = (
        load(sd1_path)
        .generate(
            "a red circle", steps=2, seed=1, height=16, width=16, output_type="np", progress=False
        )
        .images[0]
    )
    assert np.array_equal(out, ref)


def test_fused_projections_replace_the_separate_layers() -> None:
    torch.manual_seed(0)
    self_attn = Attention(16, heads=2, head_dim=8)
    cross = Attention(16, heads=2, head_dim=8, context_dim=12)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    before = self_attn(x), cross(x, ctx)
    for module in (self_attn, cross):
        module.fuse_projections()
        module.fuse_projections()  # idempotent
    # Computed fused, saved as the checkpoints have it.
    assert hasattr(self_attn, "to_qkv") and not hasattr(self_attn, "to_q")
    assert hasattr(cross, "to_kv") and not hasattr(cross, "to_k")
    for module in (self_attn, cross):
        assert {k.split(".")[0] for k in module.state_dict()} == {"to_q", "to_k", "to_v", "to_out"}
    fresh = Attention(16, heads=2, head_dim=8)
    fresh.load_state_dict(self_attn.state_dict())
    torch.testing.assert_close(fresh(x), before[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(self_attn(x), before[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cross(x, ctx), before[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("slice_size", [None, 1, 2, 5, 100])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attend_backends_and_slices_agree(backend: str, slice_size: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (11, 6, 6))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    out = attend(q, k, v, backend=backend, slice_size=slice_size)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attention": "flash3"}, "attention must be one of"),
        ({"attention_slice_size": 0}, "attention_slice_size"),
        ({"autocast": "int8"}, "autocast must be"),
        ({"cuda_graphs": True, "cpu_offload": True}, "exclude each other"),
        ({"compile": "yes"}, "compile must be True or False"),
        ({"fuse_qkv": "auto"}, "fuse_qkv must be True, False or None"),
        ({"conv_gemm": 1}, "conv_gemm must be True, False or None"),
        ({"upsample_phases": "on"}, "upsample_phases must be True, False or None"),
        ({"channels_last": "yes"}, "channels_last must be True, False or None"),
    ],
)
def test_bad_options_are_typed_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(latentkit.InvalidArgumentError, match=message):
        Performance(**options)


@pytest.mark.parametrize(("fuse_qkv", "fused"), [(None, False), (True, True), (False, False)])
def test_projections_are_fused_on_cuda_only_unless_asked(
    sd1_path: Path, fuse_qkv: bool | None, fused: bool
) -> None:
    from latentkit.models.layers import Attention

    pipe = load(sd1_path, fuse_qkv=fuse_qkv)  # a CPU pipeline: the default does not fuse
    layers = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    assert layers and all((m.to_qkv is not None or m.to_kv is not None) == fused for m in layers)


@pytest.mark.parametrize(("value", "on"), [(None, True), (True, True), (False, False)])
@pytest.mark.parametrize(
    ("option", "layer", "flag"),
    [("conv_gemm", "Conv2d", "gemm"), ("upsample_phases", "Upsample", "phases")],
)
def test_cpu_algorithms_are_on_by_default_unless_asked(
    sd1_path: Path, option: str, layer: str, flag: str, value: bool | None, on: bool
) -> None:
    from latentkit.models import layers as blocks

    pipe = load(sd1_path, **{option: value})  # a CPU pipeline: the default is on
    kind = getattr(blocks, layer)
    found = [m for net in (pipe.unet, pipe.vae) for m in net.modules() if isinstance(m, kind)]
    assert found and all(getattr(m, flag) == on for m in found)


@pytest.mark.parametrize(
    ("channels_last", "unet_nhwc", "vae_nhwc"),
    [(None, False, True), (True, True, True), (False, False, False)],
)
def test_channels_last_is_the_cpu_autoencoders_layout_unless_asked(
    sd1_path: Path, channels_last: bool | None, unet_nhwc: bool, vae_nhwc: bool
) -> None:
    pipe = load(sd1_path, channels_last=channels_last)  # a CPU pipeline

    def nhwc(net: torch.nn.Module) -> bool:
        # 3x3 kernels: a 1x1 kernel is contiguous in both layouts
        weights = [
            m.weight
            for m in net.modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
        ]
        layouts = {w.is_contiguous(memory_format=torch.channels_last) for w in weights}
        assert len(layouts) == 1
        return layouts.pop()

    assert (nhwc(pipe.unet), nhwc(pipe.vae)) == (unet_nhwc, vae_nhwc)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cuda_graphs": True}, "needs a CUDA device"),
        ({"cpu_offload": True}, "already runs on the CPU"),
    ],
)
def test_device_options_are_refused_before_loading(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    # The folder does not exist: the option check must come first.
    with pytest.raises(latentkit.InvalidArgumentError, match=message):
        latentkit.load_pipeline(
            tmp_path / "missing", device="cpu", performance=Performance(**options)
        )


def test_generate_keeps_one_pipeline_per_performance(sd1_path: Path) -> None:
    latentkit.clear_cache()
    kw: dict[str, Any] = {
        "model": sd1_path,
        "steps": 1,
        "seed": 0,
        "height": SIZE,
        "width": SIZE,
        "progress": False,
        "device": "cpu",
    }
    latentkit.generate("a red circle", **kw)
    from latentkit import api

    first = next(iter(api._cache.values()))
    latentkit.generate("a red circle", performance=Performance(fuse_qkv=False), **kw)
    second = next(iter(api._cache.values()))
    assert second is not first and not second.performance.fuse_qkv
    latentkit.clear_cache()
    with pytest.raises(latentkit.InvalidArgumentError, match="performance"):
        latentkit.generate("x", model=first, performance=Performance())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("options", [{"cuda_graphs": True}, {"cpu_offload": True}])
def test_cuda_options_match_the_plain_cuda_path(sd1_path: Path, options: dict[str, Any]) -> None:
    def run(**o: Any) -> np.ndarray:
        pipe = latentkit.load_pipeline(
            sd1_path, device="cuda", dtype="fp32", progress=False, performance=Performance(**o)
        )
        return images(pipe)

    assert np.abs(run(**options) - run()).max() <= REORDER_TOL


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 9),
    out=st.integers(1, 7),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel_padding=st.sampled_from([(1, 0), (3, 1), (3, 0), (5, 2), (1, 1)]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_gemm_is_the_convolution(
    batch: int,
    channels: int,
    out: int,
    size: tuple[int, int],
    kernel_padding: tuple[int, int],
    bias: bool,
    seed: int,
) -> None:
    kernel, padding = kernel_padding
    h, w = size
    if h + 2 * padding < kernel or w + 2 * padding < kernel:
        return  # no output pixel: torch refuses these too
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(out, channels, kernel, kernel, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    got = conv2d_gemm(x, weight, b, padding=padding)
    want = torch.nn.functional.conv2d(x, weight, b, padding=padding)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64: rounding only


def test_conv2d_uses_the_gemm_only_for_small_stride_1_maps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from latentkit.models import layers

    calls: list[tuple[int, ...]] = []

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return conv2d_gemm(x, *args, **kwargs)

    monkeypatch.setattr(layers, "conv2d_gemm", spy)
    torch.manual_seed(0)
    conv = layers.Conv2d(4, 6, kernel_size=3, padding=1)
    down = layers.Conv2d(4, 6, kernel_size=3, stride=2, padding=1)
    small, large = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 9, 8)  # 64 and 72 pixels
    direct = {
        id(x): torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        for x in (small, large)
    }
    with torch.no_grad():
        assert torch.equal(conv(small), direct[id(small)])  # gemm is off by default
        conv.gemm = down.gemm = True
        torch.testing.assert_close(conv(small), direct[id(small)], rtol=1e-5, atol=1e-5)
        assert torch.equal(conv(large), direct[id(large)])
        down(small)
    assert calls == [(2, 4, 8, 8)]
    assert layers.GEMM_CONV_MAX_PIXELS == 64


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 6),
    out=st.integers(1, 5),
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    nhwc=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_upsample_conv2d_is_upsample_then_convolve(
    batch: int,
    channels: int,
    out: int,
    size: tuple[int, int],
    nhwc: bool,
    bias: bool,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=g, dtype=torch.float64)
    weight = torch.randn(out, channels, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    got = upsample_conv2d(x, weight, b)
    big = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    want = torch.nn.functional.conv2d(big, weight, b, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64: rounding only
    # NHWC in, NHWC out (a one-channel or one-pixel map is both; it comes back NCHW)
    if nhwc and not x.is_contiguous():
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


def test_upsample_uses_phases_only_for_exact_doubling_of_large_maps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from latentkit.models import layers

    calls: list[tuple[int, ...]] = []

    def spy(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return upsample_conv2d(x, *args)

    monkeypatch.setattr(layers, "upsample_conv2d", spy)
    torch.manual_seed(0)
    up = layers.Upsample(3)
    large, small = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 15, 16)  # 256 and 240 pixels
    with torch.no_grad():
        plain = up(large, (32, 32))
        up.phases = True
        torch.testing.assert_close(up(large, (32, 32)), plain, rtol=1e-5, atol=1e-5)
        up(large, (31, 32))  # not a doubling (an odd skip size)
        up(small, (30, 32))
    assert calls == [(1, 3, 16, 16)]
    assert layers.UPSAMPLE_PHASES_MIN_PIXELS == 256


def test_resnet_block_in_place_without_autograd_changes_nothing() -> None:
    from latentkit.models.layers import ResnetBlock

    torch.manual_seed(0)
    block = ResnetBlock(4, 6, temb_channels=5, groups=2, eps=1e-6, output_scale_factor=2.0).eval()
    x, temb = torch.randn(2, 4, 5, 5), torch.randn(2, 5)
    before = x.clone()
    with_grad = block(x, temb)
    with torch.no_grad():
        without = block(x, temb)
    assert torch.equal(with_grad, without)  # the same arithmetic, bit for bit
    assert torch.equal(x, before)  # the caller's input is never written
    with_grad.sum().backward()  # and the autograd path still differentiates
    assert block.conv1.weight.grad is not None
