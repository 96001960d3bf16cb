"""Follow sampling step by step with a callback instead of a progress bar.

The callback gets a ``latentkit.SamplerStep`` after every network evaluation: its
``index``, the ``total`` number of evaluations, the ``timestep`` just evaluated and the
latents (``sample``) after the step. This example records a few numbers per step, prints
them, and writes them to ``steps.json`` next to the image.

    python examples/progress_callback.py --steps 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Record per-step information with a callback.")
    parser.add_argument("prompt", nargs="?", default="a bowl of ramen, studio lighting")
    parser.add_argument(
        "--model",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="Hub repo id or local diffusers folder",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--size", type=int, default=None, help="width and height in pixels (default: the model's)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    records: list[dict[str, Any]] = []

    def on_step(step: latentkit.SamplerStep) -> None:
        latents = step.sample.float()
        record = {
            "index": step.index,
            "total": step.total,
            "timestep": float(step.timestep),
            "latent_std": float(latents.std()),
        }
        records.append(record)
        print(
            f"step {step.index + 1}/{step.total}  t={record['timestep']:7.2f}  std={record['latent_std']:.3f}"
        )

    result = latentkit.generate(
        args.prompt,
        model=args.model,
        steps=args.steps,
        seed=args.seed,
        height=args.size,
        width=args.size,
        device=args.device,
        callback=on_step,
        progress=False,  # the callback reports progress; no bars on stderr
    )
    [path] = result.save(args.output / "progress_callback.png", overwrite=True)
    (args.output / "steps.json").write_text(json.dumps(records, indent=2))
    print(path)


if __name__ == "__main__":
    main()
