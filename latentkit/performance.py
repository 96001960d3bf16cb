"""How the networks run: attention kernels, memory layout, compilation, precision, memory savers.

None of these options changes what is computed, only how: every one is tested against the
plain path on the same weights (equal up to float rounding, or bit-equal where noted).
`Performance` is given to `latentkit.load_pipeline` (or `latentkit.generate`); `Runtime` is
what a pipeline does with it while it generates.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from latentkit.backends import (
    OPENVINO_PRECISIONS,
    SHOW_PROGRESS,
    CudaGraphs,
    OpenVINONetwork,
    default_cache_dir,
    import_nncf,
    import_openvino,
)
from latentkit.errors import InvalidArgumentError
from latentkit.models.autoencoder import AutoencoderKL, KLDecoder
from latentkit.models.layers import ATTENTION_BACKENDS, Attention, Conv2d, Upsample
from latentkit.protocols import ControlResiduals

if TYPE_CHECKING:
    from latentkit.models.autoencoder import Tiling
    from latentkit.models.unet import FeatureCache

UNetCall = Callable[..., Tensor]
"""``(x, t, context)``, ``(x, t, context, vector)``, ``(x, t, context, vector, control)`` or
``(x, t, context, vector, control, class_labels)``: the UNet, eager, compiled or replayed."""

BACKENDS = ("torch", "openvino")

_AUTOCAST_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True, kw_only=True)
class Performance:
    """Speed and memory options of a loaded pipeline.

    The defaults are the eager path with choices made per device (fused attention
    projections on CUDA; on a CPU, GEMM convolutions of small maps, upsampling by phases and
    an NHWC autoencoder). Its images equal diffusers' up to float rounding, and are 0.0 apart
    with those choices turned off.

    Example:
        >>> fast = latentkit.Performance(autocast="bf16")  # bf16 matmuls on a CPU with AVX-512 BF16
        >>> pipe = latentkit.load_pipeline(model, performance=fast)  # doctest: +SKIP
    """

    attention: str = "sdpa"
    """``"sdpa"``: PyTorch's fused attention (flash / memory-efficient kernels where the
    device has them, else its math fallback); ``"math"``: explicit matmul-softmax-matmul."""
    attention_slice_size: int | None = None
    """Attention slicing: compute at most this many (batch x head) slices at once, so the
    score matrices of only those are in memory. For the ``"math"`` backend on small GPUs."""
    channels_last: bool | None = None
    """Store conv weights and activations NHWC, a layout oneDNN (CPU) and cuDNN tensor cores
    run without reordering. ``None`` (default): the autoencoder on a CPU (SD 1.5's 512x512
    decode: 16.0-16.5 s NCHW, 14.0 s NHWC), not the UNet (slower NHWC on a CPU, 2.2 vs 2.9 s
    a step at 256x256) and nothing on CUDA (unmeasured); ``True``/``False``: every network."""
    fuse_qkv: bool | None = None
    """One GEMM for the q, k, v projections of self-attention (k, v of cross-attention).
    ``None`` (default): on CUDA, where one kernel launch beats three; not on a CPU, where the
    step time measured the same (SD 1.5, fp32 and bf16) and fusing copies those weights out
    of the memory-mapped files while loading (about 1 s for SD 1.5)."""
    conv_gemm: bool | None = None
    """Convolve feature maps of at most 8x8 pixels as one GEMM over unfolded patches
    (im2col) instead of the backend's direct kernel. ``None`` (default): on a CPU, where
    oneDNN's direct kernel is slow for these few-pixel, 1280-channel maps (SD 1.5 at 256x256,
    fp32 and bf16: about 15 % off each step, docs/performance.md); not on CUDA. Equal to the
    direct kernel up to float rounding."""
    upsample_phases: bool | None = None
    """Compute each nearest-2x upsampling followed by its 3x3 convolution (the UNet's and the
    decoder's upsamplers) as four 2x2 convolutions on the small map, one per output phase:
    16 instead of 36 multiply-adds per source pixel and channel pair. ``None`` (default): on a
    CPU; not on CUDA (unmeasured). Equal to upsample-then-convolve up to float rounding."""
    autocast: str | torch.dtype | None = None
    """``"bf16"`` / ``"fp16"``: run matmuls and convolutions in that precision under
    `torch.autocast`, keeping the weights and the sampler's arithmetic in the loaded dtype.
    On CPUs with AVX-512 BF16 or AMX this is the fast mode for float32 weights."""
    compile: bool = False
    """Run the UNet through `torch.compile` (compiled once per input shape, not per call)."""
    compile_backend: str = "inductor"
    """The `torch.compile` backend (``"inductor"`` generates kernels; ``"aot_eager"`` only
    traces, which is quick and useful for checking)."""
    cuda_graphs: bool = False
    """Replay the UNet from a captured CUDA graph per input shape (CUDA only): removes the
    per-kernel launch cost that dominates small batches on fast GPUs."""
    vae_tiling: bool | Tiling = False
    """Decode (and encode) large images tile by tile with blended seams, so a 2048x2048
    image needs the memory of a 512x512 one. ``True`` uses `Tiling()` defaults."""
    unet_tiling: bool | Tiling = False
    """Run the UNet on overlapping latent tiles whose predictions are blended at every
    evaluation (`latentkit.tiles`, MultiDiffusion), so its memory is that of one tile: the
    x4 upscaler's 512x512 -> 2048x2048 in the memory of 128x128 -> 512x512. A `Tiling`'s
    ``tile_size`` is in output pixels (None: the UNet's ``sample_size``); ``True`` uses
    `Tiling()` defaults. The images differ slightly from untiled ones (docs/upscaling.md)."""
    cpu_offload: bool = False
    """Keep the networks in CPU memory and move each to the accelerator only while it runs
    (text encoder, then UNet, then autoencoder): peak accelerator memory is the largest
    network instead of all of them."""
    backend: str = "torch"
    """What runs the UNet and the autoencoder's decoder. ``"torch"``: PyTorch, eager or
    compiled. ``"openvino"`` (CPU, float32 weights; ``pip install "latentkit-sdk[openvino]"``):
    latentkit's own modules converted by OpenVINO once per image size and run by it with
    static shapes, in float32, or in bf16/fp16 when `autocast` says so; the loop, samplers,
    seeds and the rest stay latentkit's. See docs/performance.md for speeds and differences."""
    quantize: str | None = None
    """``"int8"`` (``backend="openvino"`` only): the UNet in 8 bits. Convolutions are
    quantized statically (int8 weights and activations, ranges calibrated once when the
    network is converted), matrix products get 8-bit weights with float activations; the
    rest runs in the `autocast` precision (pair it with ``autocast="bf16"``). SD 1.5 in
    this mode: 2.2 GB peak RSS at 512x512 and 0.6-0.8x OpenVINO's own int8 step time on
    the CPU of docs/performance.md, with its measured image differences."""
    cache_dir: str | os.PathLike[str] | None = None
    """Where ``backend="openvino"`` keeps converted networks, keyed by the weight files,
    adapters, image size and options, so that a later load skips the conversion (a minute
    or two for SD 1.5). None: ``$LATENTKIT_CACHE/openvino``, else
    ``~/.cache/latentkit/openvino``."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise InvalidArgumentError(
                f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}"
            )
        slices = self.attention_slice_size
        if slices is not None and (
            isinstance(slices, bool) or not isinstance(slices, int) or slices < 1
        ):
            raise InvalidArgumentError(
                f"attention_slice_size must be a positive int or None, got {slices!r}"
            )
        if self.autocast is not None:
            autocast_dtype(self.autocast)  # raises for an unknown one
        if self.cuda_graphs and self.cpu_offload:
            raise InvalidArgumentError(
                "cuda_graphs and cpu_offload exclude each other: a captured graph needs its "
                "weights to stay at fixed device addresses"
            )
        for name in ("compile", "cuda_graphs", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be True or False")
        if self.backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.quantize not in (None, "int8"):
            raise InvalidArgumentError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.quantize is not None and self.backend != "openvino":
            raise InvalidArgumentError(
                'quantize="int8" runs on the OpenVINO backend: pass backend="openvino" too'
            )
        if self.backend == "openvino":
            for name in ("compile", "cuda_graphs", "cpu_offload"):
                if getattr(self, name):
                    raise InvalidArgumentError(
                        f'backend="openvino" compiles the networks itself; {name}=True is '
                        "for the torch backend"
                    )
        if self.cache_dir is not None and not isinstance(self.cache_dir, str | os.PathLike):
            raise InvalidArgumentError(f"cache_dir must be a path, got {self.cache_dir!r}")
        for name in ("channels_last", "fuse_qkv", "conv_gemm", "upsample_phases"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be True, False or None (automatic)")

    def tiling(self, network: str = "vae") -> Tiling | None:
        """The tiling of ``network`` (``"vae"``: `vae_tiling`, ``"unet"``: `unet_tiling`),
        or None."""
        from latentkit.models.autoencoder import Tiling

        name = f"{network}_tiling"
        value = getattr(self, name)
        if value is True:
            return Tiling()
        if value is False:
            return None
        if not isinstance(value, Tiling):
            raise InvalidArgumentError(f"{name} must be a bool or a latentkit Tiling")
        return value


def autocast_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in _AUTOCAST_DTYPES:
        return _AUTOCAST_DTYPES[value.lower()]
    raise InvalidArgumentError(
        f"autocast must be 'bf16' or 'fp16' (or the torch dtype), got {value!r}"
    )


class Runtime:
    """A pipeline's networks set up for `Performance`, and the calls the pipeline makes.

    Built once at load time (`prepare`); module changes (layout, fused projections,
    attention kernels) happen there, so the pipeline's hot loop only calls `unet`.
    """

    def __init__(self, performance: Performance, device: torch.device) -> None:
        self.performance = performance
        self.device = device
        self.tiling = performance.tiling()
        self.unet_tiling = performance.tiling("unet")
        self._unet_call: UNetCall | None = None
        self._unet_module: nn.Module | None = None  # eager, for calls with a FeatureCache
        self.identity: dict[str, str] = {}
        self._weights: dict[str, Callable[[], None]] = {}
        self._weights_lock = threading.Lock()
        # cpu_offload moves shared modules: one generate() at a time.
        self._lock = threading.Lock() if performance.cpu_offload else None

    def check(self, dtype: torch.dtype | None = None) -> None:
        """Refuse options the device (or the weights' ``dtype``) cannot honour, before any
        weights are read."""
        p, kind = self.performance, self.device.type
        if p.backend == "openvino":
            if kind != "cpu":
                raise InvalidArgumentError(
                    f'backend="openvino" runs on the CPU; this pipeline runs on {kind}'
                )
            if dtype is not None and dtype != torch.float32:
                raise InvalidArgumentError(
                    'backend="openvino" converts float32 weights (it lowers the precision '
                    "itself): load with dtype='fp32' and pick the precision with "
                    "autocast='bf16'"
                )
            import_openvino()  # MissingDependencyError now, not after loading
            if p.quantize is not None:
                import_nncf(check_only=True)
        if p.cuda_graphs and kind != "cuda":
            raise InvalidArgumentError(
                f"cuda_graphs needs a CUDA device, this pipeline runs on {kind}"
            )
        if p.cpu_offload and kind == "cpu":
            raise InvalidArgumentError(
                "cpu_offload moves networks between CPU memory and an accelerator; this "
                "pipeline already runs on the CPU"
            )

    def check_cache(self) -> None:
        """Refuse DeepCache (``generate(feature_cache=N)``) where the UNet does not run
        eagerly on the whole latents: its evaluations differ from call to call, which a
        compiled graph or a captured CUDA graph cannot follow, and tiles would need a cache
        each."""
        if self.performance.backend != "torch":
            raise InvalidArgumentError(
                f"feature_cache needs the eager torch backend, not "
                f"backend={self.performance.backend!r}: load the pipeline without it to use it"
            )
        for name in ("compile", "cuda_graphs"):
            if getattr(self.performance, name):
                raise InvalidArgumentError(
                    f"feature_cache does not go with Performance({name}=True): its shallow "
                    "evaluations run a different part of the UNet than the full ones; load "
                    f"the pipeline without {name} to use it"
                )
        if self.unet_tiling is not None:
            raise InvalidArgumentError(
                "feature_cache does not go with Performance(unet_tiling=...): each tile would "
                "need a cache of its own; load the pipeline without unet_tiling to use it"
            )

    @property
    def storage_device(self) -> torch.device:
        """Where the weights live between calls: the CPU with offloading, else the device."""
        return torch.device("cpu") if self.performance.cpu_offload else self.device

    def channels_last(self, network: str) -> bool:
        """Whether ``network`` ("unet", "vae", ...) runs NHWC (see `Performance.channels_last`)."""
        if self.performance.channels_last is not None:
            return self.performance.channels_last
        if self.performance.backend != "torch":
            return False  # the runtime picks its own layouts
        return self.device.type == "cpu" and network == "vae"

    def prepare(
        self,
        unet: nn.Module,
        vae: nn.Module,
        *,
        identity: Mapping[str, str] | None = None,
        weights: Mapping[str, Callable[[], None]] | None = None,
    ) -> None:
        """Apply the module-level options to the UNet and the autoencoder, in place.

        ``identity`` names each network's weights (``"unet"``, ``"vae"``: see
        `latentkit.backends.weight_identity`); the OpenVINO backend keys its disk cache on it.
        ``weights`` loads a network's weights (``"unet"``, ``"vae"``) into a module built
        without them (on the meta device). The torch backend reads them now; the OpenVINO
        backend only if a network has no converted copy on disk, else when torch needs
        them (`materialize`): a load from the disk cache then never holds SD 1.5's 3.4 GB
        of float32 UNet weights.
        """
        p = self.performance
        self.identity = dict(identity or {})
        self._weights = dict(weights or {})
        # Fusing projections and changing the memory layout rewrite weights: they need them.
        if p.backend != "openvino" or p.fuse_qkv or p.channels_last:
            self.materialize("unet", "vae")
        for name, module in (("unet", unet), ("vae", vae)):
            self.configure(module, name)
        call: UNetCall = unet
        if p.backend == "openvino":
            network = self._openvino(unet, "unet")
            call = network
            # Kept when set: pipelines made by with_lora share the autoencoder.
            if isinstance(vae, AutoencoderKL) and vae.decode_network is None:
                vae.decode_network = self._openvino(KLDecoder(vae), "vae")
            for name, net in (("unet", network), ("vae", vae.decode_network)):
                if not isinstance(net, OpenVINONetwork) or not net.converted():
                    self.materialize(name)  # the conversion needs them: read them at load
        elif p.compile:
            # dynamic=False: one graph per input shape; a new step, prompt or seed with the
            # same shapes reuses it (tests check that the second call compiles nothing).
            if p.cuda_graphs:
                call = torch.compile(
                    unet, backend=p.compile_backend, mode="reduce-overhead", dynamic=False
                )
            else:
                # Inductor's freezing treats the weights as constants: it folds them and
                # pre-packs convolution and GEMM weights once. Weights must not change after
                # compiling. (On the 2-core CPU of docs/performance.md the compiled UNet was
                # still slower than eager, with or without freezing.)
                options: dict[str, Any] | None = (
                    {"freezing": True} if p.compile_backend == "inductor" else None
                )
                call = torch.compile(
                    unet, backend=p.compile_backend, options=options, dynamic=False
                )
        elif p.cuda_graphs:
            call = CudaGraphs(unet)
        self._unet_call = call
        self._unet_module = unet

    def materialize(self, *names: str) -> None:
        """Put the weights of the networks ``names`` (``"unet"``, ``"vae"``) in place where
        the load left them out (`prepare`'s ``weights``): for whatever needs the torch
        network itself (a LoRA applied to the UNet, the autoencoder's encoder, a
        conversion). Idempotent and thread-safe."""
        with self._weights_lock:
            for name in names:
                load = self._weights.pop(name, None)
                if load is not None:
                    load()

    def _openvino(self, module: nn.Module, name: str) -> OpenVINONetwork:
        """``module`` (the UNet, "unet", or the autoencoder's decoder, "vae") on OpenVINO.

        ``quantize="int8"`` quantizes the UNet only. The decoder stays in the inference
        precision: it is 6 % of SD 1.5's weights, its int8 weights would be expanded at
        compile time anyway (measured: 345 MiB compiled as int8 weights against 135 MiB as
        bf16), and static int8 of its activations needs calibration latents of real images
        (with noise, the shapes model's images moved by 0.07 on average).
        """
        p = self.performance
        dtype = None if p.autocast is None else autocast_dtype(p.autocast)
        cache = default_cache_dir() if p.cache_dir is None else Path(p.cache_dir)
        return OpenVINONetwork(
            module,
            name=name,
            precision=OPENVINO_PRECISIONS[dtype],
            int8=p.quantize == "int8" and name == "unet",
            identity=self.identity.get(name),
            cache_dir=cache,
            weights=lambda: self.materialize(name),
        )

    def configure(self, module: nn.Module, name: str) -> None:
        """Apply the module-level options (GEMM convolutions, upsampling by phases, the
        attention kernel and slicing, fused projections, memory layout) to the network
        ``module`` called ``name``, in place: `prepare` does it for the UNet and the
        autoencoder, ``LatentDiffusion.with_controlnet`` for a ControlNet."""
        p = self.performance
        fuse = self.device.type == "cuda" if p.fuse_qkv is None else p.fuse_qkv
        # im2col GEMMs help PyTorch's CPU kernels; OpenVINO's own convolutions are faster.
        eager_cpu = self.device.type == "cpu" and p.backend == "torch"
        gemm = eager_cpu if p.conv_gemm is None else p.conv_gemm
        phases = self.device.type == "cpu" if p.upsample_phases is None else p.upsample_phases
        for layer in module.modules():
            if isinstance(layer, Conv2d):
                layer.gemm = gemm
            if isinstance(layer, Upsample):
                layer.phases = phases
            if isinstance(layer, Attention):
                layer.backend = p.attention
                layer.slice_size = p.attention_slice_size
                if fuse:
                    layer.fuse_projections()
        if self.channels_last(name):
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def unet(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        vector: Tensor | None = None,
        control: ControlResiduals | None = None,
        labels: Tensor | None = None,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """One UNet evaluation in the configured way, returned in ``x``'s dtype; ``vector``
        is added to the time embedding (SDXL), None for models without one; ``control``
        (ControlNet residuals) to the skip connections and middle block; ``labels`` (B,) are
        the class labels of a UNet with ``num_class_embeds`` (the x4 upscaler's noise level);
        ``cache`` is a run's DeepCache state (``generate(feature_cache=N)``)."""
        assert self._unet_call is not None, "Runtime.prepare was not called"
        if self.channels_last("unet"):
            x = x.contiguous(memory_format=torch.channels_last)
        # One dtype for every sampler (some pass integer timesteps, some float): a compiled
        # graph is specialised on input dtypes, so this keeps it to one graph per shape.
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        # Positional, and `vector` / `control` only when there are some: a compiled or
        # captured call then sees the same argument list on every step.
        args: tuple[Any, ...] = (x, t, context) if vector is None else (x, t, context, vector)
        if control is not None or labels is not None:
            args = (x, t, context, vector, control)
        if labels is not None:
            args = (*args, labels)
        if cache is not None:
            # DeepCache (`latentkit.models.unet.FeatureCache`) changes what each call runs:
            # the eager network (compile and CUDA graphs are refused with it, `check_cache`).
            assert self._unet_module is not None
            out: Tensor = self._unet_module(x, t, context, vector, control, labels, cache=cache)
        else:
            out = self._unet_call(*args)
        return out.to(x.dtype).contiguous()

    @contextlib.contextmanager
    def session(self, *, progress: bool = True) -> Iterator[None]:
        """One generate() call: autocast if asked, exclusive use with offloading, and
        ``progress`` for the bars of anything converted during it (`SHOW_PROGRESS`)."""
        token = SHOW_PROGRESS.set(progress)
        with contextlib.ExitStack() as stack:
            stack.callback(SHOW_PROGRESS.reset, token)
            if self._lock is not None:
                stack.enter_context(self._lock)
            if self.performance.autocast is not None:
                stack.enter_context(
                    torch.autocast(
                        self.device.type, dtype=autocast_dtype(self.performance.autocast)
                    )
                )
            yield

    @contextlib.contextmanager
    def stage(self, *modules: nn.Module | None) -> Iterator[None]:
        """Run ``modules`` on the device for the duration; with offloading, move them there
        first and back to the CPU after (Rombach et al.'s stages run one at a time)."""
        present = [m for m in modules if m is not None]
        if not self.performance.cpu_offload:
            yield
            return
        for module in present:
            module.to(self.device)
        try:
            yield
        finally:
            for module in present:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
