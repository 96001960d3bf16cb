"""Upscale a picture 4x with the Stable Diffusion x4 upscaler, in tiles if it is large.

The upscaler is a latent diffusion model of its own family: the low-resolution picture,
noised to ``noise_level``, is read by the UNet beside the latents, which have the picture's
size; its autoencoder decodes them 4x larger. With ``--tile``, the UNet and the autoencoder
run on overlapping tiles, so a 512x512 picture becomes 2048x2048 in the memory a 128x128
one needs.

    python examples/upscale.py photo.png --prompt "a cat on a sofa"
    python examples/upscale.py big.png --tile 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

from image_to_image import demo_picture
from PIL import Image

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Upscale a picture 4x.")
    parser.add_argument(
        "image", nargs="?", type=Path, default=None, help="input picture (default: a gradient)"
    )
    parser.add_argument("--prompt", default="a photo", help="what the picture shows")
    parser.add_argument("--model", default="stabilityai/stable-diffusion-x4-upscaler")
    parser.add_argument("--noise-level", type=int, default=20, help="0-350: more invents more")
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--size", type=int, default=512, help="output size for the gradient")
    parser.add_argument("--tile", type=int, default=None, help="tile side in output pixels")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    picture = Image.open(args.image) if args.image else demo_picture(args.size // 4)
    tiling = latentkit.Tiling(tile_size=args.tile) if args.tile else False
    pipe = latentkit.load_pipeline(
        args.model,
        device=args.device,
        performance=latentkit.Performance(unet_tiling=tiling, vae_tiling=tiling),
    )
    result = pipe.generate(
        args.prompt, image=picture, noise_level=args.noise_level, steps=args.steps, seed=args.seed
    )
    print(f"{picture.width}x{picture.height} -> {result.images[0].width}x{result.images[0].height}")
    print(*result.save(args.output / "upscale.png", overwrite=True))


if __name__ == "__main__":
    main()
