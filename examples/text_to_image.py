"""Text to image in one call.

``latentkit.generate`` loads the model (once; later calls reuse it), samples with the
model's own scheduler and decodes; ``result.save`` writes a PNG that carries the settings
in its ``parameters`` text chunk.

    python examples/text_to_image.py "a watercolor fox in the snow" --seed 7
"""

from __future__ import annotations

import argparse
from pathlib import Path

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate one image from a prompt.")
    parser.add_argument("prompt", nargs="?", default="a photo of an astronaut riding a horse")
    parser.add_argument(
        "--model",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="Hub repo id or local diffusers folder",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--size", type=int, default=None, help="width and height in pixels (default: the model's)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    result = latentkit.generate(
        args.prompt,
        model=args.model,
        steps=args.steps,
        seed=args.seed,
        height=args.size,
        width=args.size,
        device=args.device,
    )
    # overwrite=True so the example can be rerun; by default save() refuses to replace files.
    [path] = result.save(args.output / "text_to_image.png", overwrite=True)
    print(path)
    print(result.parameters[0].a1111())


if __name__ == "__main__":
    main()
