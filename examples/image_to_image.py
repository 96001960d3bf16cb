"""Image-to-image with the same `generate()` call.

``image=`` starts sampling from a picture instead of pure noise; ``strength`` says how much
of the schedule runs (1 ignores the picture, small values stay close to it).

    python examples/image_to_image.py photo.png --prompt "a watercolor painting" --strength 0.6
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import latentkit


def demo_picture(size: int) -> Image.Image:
    """A smooth colour gradient, for running the example without an input file."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    rgb = np.stack([x, y, 1 - x * y], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Repaint a picture from a prompt (image-to-image)."
    )
    parser.add_argument(
        "image", nargs="?", type=Path, default=None, help="input picture (default: a gradient)"
    )
    parser.add_argument("--prompt", default="a watercolor painting of mountains")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="size of the demo gradient")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    picture = Image.open(args.image) if args.image else demo_picture(args.size)
    pipe = latentkit.load_pipeline(args.model, device=args.device)

    # Image-to-image: the output has the picture's size (rounded down to a multiple of 8).
    result = pipe.generate(
        args.prompt, image=picture, strength=args.strength, steps=args.steps, seed=args.seed
    )
    print(*result.save(args.output / "image_to_image.png", overwrite=True))


if __name__ == "__main__":
    main()
