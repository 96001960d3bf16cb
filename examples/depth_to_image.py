"""Depth-to-image: a new picture that keeps the depth layout of an input picture.

A depth-to-image model (Stable Diffusion 2 depth, 5 input channels) conditions on a depth
map: pass ``depth_map=`` yourself, or only ``image=`` and the model's own depth estimator
(the repo's DPT model) measures it.

    python examples/depth_to_image.py photo.png --prompt "a marble statue"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from image_to_image import demo_picture
from PIL import Image

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Repaint a picture, keeping its depth.")
    parser.add_argument(
        "image", nargs="?", type=Path, default=None, help="input picture (default: a gradient)"
    )
    parser.add_argument("--prompt", default="a marble statue in a museum")
    parser.add_argument("--model", default="stabilityai/stable-diffusion-2-depth")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="size of the demo gradient")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    picture = Image.open(args.image) if args.image else demo_picture(args.size)
    pipe = latentkit.load_pipeline(args.model, device=args.device)

    # The model's estimator reads the picture.
    result = pipe.generate(
        args.prompt, image=picture, strength=args.strength, steps=args.steps, seed=args.seed
    )
    print(*result.save(args.output / "depth_estimated.png", overwrite=True))

    # Or give the depth yourself (nearer = larger), here a ramp from left to right.
    ramp = np.tile(np.linspace(0.0, 1.0, picture.width, dtype=np.float32), (picture.height, 1))
    result = pipe.generate(
        args.prompt,
        image=picture,
        depth_map=ramp,
        strength=args.strength,
        steps=args.steps,
        seed=args.seed,
    )
    print(*result.save(args.output / "depth_given.png", overwrite=True))


if __name__ == "__main__":
    main()
