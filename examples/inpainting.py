"""Inpainting: repaint the white part of a mask, keep the rest.

An inpainting model (9 input channels) reads the mask and the masked picture itself; any
other model inpaints by blending the kept region back after every step. Same call for both.

    python examples/inpainting.py room.png mask.png --prompt "a red sofa"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from image_to_image import demo_picture
from PIL import Image

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Repaint the masked part of a picture.")
    parser.add_argument(
        "image", nargs="?", type=Path, default=None, help="input picture (default: a gradient)"
    )
    parser.add_argument(
        "mask", nargs="?", type=Path, default=None, help="white = repaint (default: left half)"
    )
    parser.add_argument("--prompt", default="a bowl of fruit")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-inpainting")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="size of the demo gradient")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    picture = Image.open(args.image) if args.image else demo_picture(args.size)
    if args.mask:
        mask = Image.open(args.mask)
    else:
        left = np.zeros((picture.height, picture.width), dtype=np.uint8)
        left[:, : picture.width // 2] = 255
        mask = Image.fromarray(left)

    result = latentkit.generate(
        args.prompt,
        model=args.model,
        image=picture,
        mask_image=mask,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
    )
    print(*result.save(args.output / "inpainting.png", overwrite=True))


if __name__ == "__main__":
    main()
