"""SDXL base and refiner as an ensemble of experts (Podell et al. 2023, sec. 2.5).

The base model runs the first 80% of the schedule (the high noise levels, where the layout
is decided) and hands its latents over without decoding them; the refiner, trained on the
low noise levels only, runs the rest and decodes. Both calls name the same ``steps``, so
together they run one schedule.

    python examples/sdxl.py "a majestic lion jumping from a big stone at night" --seed 7

Both models download several GB of fp16 weights on first use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate with SDXL base + refiner.")
    parser.add_argument("prompt", nargs="?", default="a majestic lion jumping from a big stone")
    parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
    parser.add_argument("--refiner", default="stabilityai/stable-diffusion-xl-refiner-1.0")
    parser.add_argument(
        "--handoff", type=float, default=0.8, help="fraction of the schedule the base runs"
    )
    parser.add_argument("--steps", type=int, default=40, help="steps of the whole schedule")
    parser.add_argument(
        "--size", type=int, default=None, help="pixels a side (default: the model's, 1024)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    # The fp16 files halve the download; dtype="auto" computes in fp16 on a GPU (the VAE
    # in fp32: SDXL's overflows in fp16) and in fp32 on a CPU.
    base = latentkit.load_pipeline(args.model, variant="fp16", device=args.device)
    refiner = latentkit.load_pipeline(args.refiner, variant="fp16", device=args.device)
    print(f"{base.family}: {args.model} + {args.refiner}")

    # The base stops at the handoff and returns latents, not pixels.
    handed = base.generate(
        args.prompt,
        steps=args.steps,
        denoising_end=args.handoff,
        output_type="latent",
        height=args.size,
        width=args.size,
        seed=args.seed,
    )
    # The refiner starts where the base stopped, from those latents as they are.
    result = refiner.generate(
        args.prompt,
        steps=args.steps,
        denoising_start=args.handoff,
        image=handed.images,
        seed=args.seed,
    )
    # overwrite=True so the example can be rerun; by default save() refuses to replace files.
    [path] = result.save(args.output / "sdxl.png", overwrite=True)
    print(path)
    print(result.parameters[0].a1111())


if __name__ == "__main__":
    main()
