"""Speed and memory options: the same image through the plain path and a faster one.

`latentkit.Performance` picks how the networks run (see docs/performance.md). This example
loads the model twice and generates the same seed with both:

- "plain": every per-device choice off, so the arithmetic is diffusers' own (no GEMM
  convolutions, no upsampling by phases, NCHW, separate q/k/v projections);
- "fast": latentkit's defaults for the device plus the options given on the command line
  (by default bfloat16 autocast, the fast mode of CPUs with AVX-512 BF16).

It prints the time of each and the largest pixel difference between the two images.

    python examples/fast_generation.py "a red circle left of a blue square"
    python examples/fast_generation.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --compile
    python examples/fast_generation.py --backend openvino --autocast none   # pip install "latentkit-sdk[openvino]"
    python examples/fast_generation.py --backend openvino --quantize int8   # the UNet in 8 bits
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare the plain path with faster options.")
    parser.add_argument("prompt", nargs="?", default="a red circle left of a blue square")
    parser.add_argument("--model", default="latentkit/shapes", help="Hub repo id or folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="width and height in pixels")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    parser.add_argument("--autocast", default="bf16", help="bf16, fp16 or none")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--tile-vae", action="store_true", help="decode in tiles")
    parser.add_argument("--backend", default="torch", help="torch or openvino (CPU)")
    parser.add_argument("--quantize", default=None, help="int8 (with --backend openvino)")
    args = parser.parse_args()

    plain = latentkit.Performance(
        conv_gemm=False, upsample_phases=False, channels_last=False, fuse_qkv=False
    )
    fast = latentkit.Performance(
        autocast=None if args.autocast == "none" else args.autocast,
        compile=args.compile,
        vae_tiling=args.tile_vae,
        backend=args.backend,
        quantize=args.quantize,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    pixels = {}
    for label, performance in (("plain", plain), ("fast", fast)):
        pipe = latentkit.load_pipeline(
            args.model, device=args.device, performance=performance, progress=False
        )
        kwargs = dict(steps=args.steps, seed=args.seed, height=args.size, width=args.size)
        pipe.generate(args.prompt, progress=False, **kwargs)  # warm-up (and compilation)
        start = time.perf_counter()
        result = pipe.generate(args.prompt, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        image = result.images[0]
        pixels[label] = np.asarray(image, dtype=np.int16)
        path = result.save(args.output / f"fast_generation-{label}.png", overwrite=True)[0]
        print(f"{label:5s} {seconds:6.2f} s  {path}")
    diff = np.abs(pixels["fast"] - pixels["plain"])
    print(f"largest pixel difference: {diff.max()} / 255, mean {diff.mean():.2f} / 255")


if __name__ == "__main__":
    main()
