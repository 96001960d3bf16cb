"""Outpainting: extend a picture's canvas and let the model continue it.

``outpaint=(left, top, right, bottom)`` adds that many pixels (multiples of 8) on each side;
the new area is generated to continue the picture and the picture's own pixels come back
unchanged, apart from an 8-pixel seam where old and new are blended. An inpainting model
(9 input channels) reads the canvas and its mask; any other model fills it by blending.

    python examples/outpaint.py photo.png --right 256 --prompt "a beach at sunset"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from image_to_image import demo_picture
from PIL import Image

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Extend a picture beyond its borders.")
    parser.add_argument(
        "image", nargs="?", type=Path, default=None, help="input picture (default: a gradient)"
    )
    parser.add_argument("--prompt", default="a landscape with mountains")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-inpainting")
    for side in ("left", "top", "right", "bottom"):
        parser.add_argument(f"--{side}", type=int, default=None, help=f"pixels to add {side}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="output size for the gradient")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    picture: Image.Image
    if args.image:
        picture = Image.open(args.image)
    else:  # the middle half of a square gradient, to be widened back to a square
        full = demo_picture(args.size)
        picture = full.crop((args.size // 4, 0, args.size - args.size // 4, args.size))
    given = (args.left, args.top, args.right, args.bottom)
    if all(m is None for m in given):
        quarter = args.size // 4
        given = (quarter, 0, quarter, 0)  # as wide again, half on each side
    margins = tuple(m or 0 for m in given)

    result = latentkit.generate(
        args.prompt,
        model=args.model,
        image=picture,
        outpaint=margins,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
    )
    print(f"{picture.width}x{picture.height} -> {result.images[0].width}x{result.images[0].height}")
    print(*result.save(args.output / "outpaint.png", overwrite=True))


if __name__ == "__main__":
    main()
