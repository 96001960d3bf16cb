"""ControlNet: generate a picture that follows the edges of another one.

The edges come from `latentkit.control.canny` (no extra model); a Canny ControlNet attached
with ``pipe.with_controlnet`` makes the new picture follow them. Without an input picture
the example first generates one with the model itself, so it runs offline on any model.

    python examples/controlnet.py house.png --prompt "a watercolor house"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Follow a picture's edges with a ControlNet.")
    parser.add_argument(
        "image", nargs="?", type=Path, default=None, help="picture (default: generate one)"
    )
    parser.add_argument("--prompt", default="a watercolor painting of a house by a lake")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--controlnet", default="lllyasviel/control_v11p_sd15_canny")
    parser.add_argument("--low", type=float, default=100, help="Canny's low threshold")
    parser.add_argument("--high", type=float, default=200, help="Canny's high threshold")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="size of the generated picture")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    pipe = latentkit.load_pipeline(args.model, device=args.device)
    if args.image is not None:
        picture = Image.open(args.image)
    else:
        source = pipe.generate(
            "a photo of a house by a lake",
            steps=args.steps,
            seed=args.seed,
            height=args.size,
            width=args.size,
        )
        print(*source.save(args.output / "controlnet-source.png", overwrite=True))
        picture = source.images[0]

    edges = latentkit.control.canny(picture, low=args.low, high=args.high)
    args.output.mkdir(parents=True, exist_ok=True)
    edges.save(args.output / "controlnet-edges.png")

    # A new pipeline with the ControlNet attached; `pipe` itself is unchanged. The output
    # takes the control image's size.
    controlled = pipe.with_controlnet(args.controlnet)
    result = controlled.generate(
        args.prompt, control_image=edges, control_scale=1.0, steps=args.steps, seed=args.seed
    )
    print(*result.save(args.output / "controlnet.png", overwrite=True))


if __name__ == "__main__":
    main()
