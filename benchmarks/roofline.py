"""How close to this CPU's peak each engine runs SD 1.5's UNet: the ceiling on any speed-up
that keeps the arithmetic (and so the picture) the same.

    python benchmarks/roofline.py                       # FLOPs and the GEMM peak only
    python benchmarks/roofline.py benchmarks/results/2026-12-07-cpu-fp32-256+....json ...

It counts the floating-point operations of one guided step (the UNet on a batch of 2) with
``torch.utils.flop_counter`` on latentkit's own UNet built on the meta device (no weights,
no time), measures the machine's peak for the same precision as the best of square
matrix products (1024, 2048, 4096) run by OpenVINO (the runtime both engines use) and by
PyTorch, and, given `compare.py` result files, divides each engine's median s/step into
the step's FLOPs.

The count is diffusers' arithmetic: convolutions as direct convolutions (2·k²·C_in·C_out
per output pixel, what OpenVINO's and oneDNN's CPU kernels compute), attention's two
matrix products included, every upsampler's convolution at the upsampled size (latentkit's
upsampling by phases does 16 instead of 36 multiply-adds there, so its rate reads a few
per cent high). Elementwise work (normalisation, activations) is not counted: it is
memory-bound and small next to the products.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def unet_step_flops(size: int, *, model: Path) -> float:
    """FLOPs of one guided step at ``size``² pixels: the UNet on a batch of 2."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentkit.models.unet import UNet2DCondition, UNetConfig

    config = UNetConfig.from_dict(json.loads((model / "unet" / "config.json").read_text()))
    with torch.device("meta"):
        unet = UNet2DCondition(config)
        latent = size // 8
        x = torch.empty(2, config.in_channels, latent, latent)
        t = torch.empty(2)
        context = torch.empty(2, 77, config.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, context)
    return float(counter.get_total_flops())


def gemm_peak(precision: str) -> dict[str, float]:
    """Best GFLOP/s of square matrix products of 1024, 2048 and 4096, by OpenVINO and by
    PyTorch."""
    best: dict[str, float] = {}
    for n in (1024, 2048, 4096):
        for engine, rate in _gemm_rates(precision, n=n).items():
            best[engine] = max(best.get(engine, 0.0), rate)
    return best


def _gemm_rates(precision: str, *, n: int, repeats: int = 8) -> dict[str, float]:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    import torch

    out: dict[str, float] = {}
    a = ops.parameter([n, n], ov.Type.f32)
    b = ops.constant(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a])
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        },
    )
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer([x])
        best = min(best, time.perf_counter() - start)
    out["openvino"] = 2 * n**3 / best / 1e9
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    p, q = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(p, q)
        best = min(best, time.perf_counter() - start)
    out["torch"] = 2 * n**3 / best / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="compare.py JSON files")
    parser.add_argument("--sizes", default="256,512", help="image sizes to count FLOPs at")
    parser.add_argument("--model", type=Path, default=HERE / ".cache" / "sd15-random")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s})
    results: list[dict[str, Any]] = [json.loads(p.read_text()) for p in args.results]
    for data in results:
        sizes = sorted(set(sizes) | {v["size"] for v in data["results"].values()})
    flops = {size: unet_step_flops(size, model=args.model) for size in sizes}
    peaks = {precision: gemm_peak(precision) for precision in ("fp32", "bf16")}

    print("| size | GFLOP per guided step (UNet, batch 2) |\n|---:|---:|")
    for size, f in flops.items():
        print(f"| {size}² | {f / 1e9:,.0f} |")
    print("\n| precision | GEMM peak, OpenVINO (GFLOP/s) | GEMM peak, PyTorch (GFLOP/s) |")
    print("|---|---:|---:|")
    for precision, peak in peaks.items():
        print(f"| {precision} | {peak['openvino']:.0f} | {peak['torch']:.0f} |")
    if results:
        print("\n| setting | engine | s / step | GFLOP/s | of the OpenVINO GEMM peak |")
        print("|---|---|---:|---:|---:|")
    for data in results:
        for name, setting in data["results"].items():
            for engine, median in setting["median"].items():
                if "step_s" not in median:
                    continue
                precision = setting["precision"][engine]
                rate = flops[setting["size"]] / median["step_s"] / 1e9
                peak = peaks.get(precision, {}).get("openvino")
                share = f"{rate / peak:.0%}" if peak else "–"
                row = f"| {name} | {engine} ({precision}) | {median['step_s']:.3f} | {rate:.0f}"
                print(f"{row} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
