"""Make the pictures of the docs (docs/images/*.png) with latentkit's built-in shapes model.

    OMP_NUM_THREADS=1 python scripts/make_pictures.py            # all of them, into docs/images
    python scripts/make_pictures.py --quick --output /tmp/pics   # every picture, few steps, 2 samplers

Every picture comes from the model latentkit ships (``latentkit/shapes``, 64×64, offline), with
fixed seeds on the CPU, so rerunning the script after a change to a sampler or a pipeline
shows what the change did. Labels are drawn with Pillow's built-in font.

- ``samplers.png``: every registered scheduler (rows) at 2–50 steps (columns), one prompt
  and seed: what a step count buys with each sampler.
- ``image-to-image.png``: a picture and the same picture re-generated under another prompt
  at rising ``strength``.
- ``inpainting.png``: a picture, the mask, and the masked part repainted under another
  prompt (the shapes model is not an inpainting model: it inpaints by blending).
- ``outpainting.png``: a picture, the canvas outpainting starts from (the picture's edges
  repeated into 32-pixel margins left and right, the repainted area outlined), and the
  margins generated for three seeds (by blending: the picture's pixels come back unchanged
  apart from an 8-pixel seam).
- ``depth.png``: what a depth-to-image model reads: a picture, a depth map for it, and the
  map as the UNet's extra input channel (resized to the latents and scaled to [-1, 1] by
  ``latentkit.conditioners.DepthConditioner``). No depth model ships with latentkit, so the
  picture stops there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

import latentkit
from latentkit.conditioners.depth import DepthConditioner, DepthInput

MODEL = "latentkit/shapes"
PROMPT = "a red circle left of a blue square"
SEED = 3
STEPS = (2, 5, 10, 20, 50)
CELL = 64  # the shapes model's image size: pictures are shown 1:1
PAD = 4
WHITE = (255, 255, 255)
INK = (40, 40, 40)
FRAME = (200, 200, 200)


def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def grid(
    rows: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
) -> Image.Image:
    """Images in rows and columns on white, with a label left of each row and above each
    column (either may be empty)."""
    face = font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str) -> int:
        return int(draw.textlength(text, font=face))

    left = max((width(t) for t in row_labels), default=0) + (2 * PAD if row_labels else 0)
    top = 16 if column_labels else 0
    columns = max(len(r) for r in rows)
    canvas = Image.new(
        "RGB",
        (left + columns * (CELL + PAD) + PAD, top + len(rows) * (CELL + PAD) + PAD),
        WHITE,
    )
    pen = ImageDraw.Draw(canvas)
    for j, text in enumerate(column_labels):
        x = left + PAD + j * (CELL + PAD) + (CELL - width(text)) // 2
        pen.text((x, 3), text, fill=INK, font=face)
    for i, row in enumerate(rows):
        y = top + PAD + i * (CELL + PAD)
        if i < len(row_labels):
            pen.text((PAD, y + CELL // 2 - 6), row_labels[i], fill=INK, font=face)
        for j, image in enumerate(row):
            x = left + PAD + j * (CELL + PAD)
            canvas.paste(image.convert("RGB").resize((CELL, CELL)), (x, y))
            # A frame, so that white pictures (and masks) stand out from the page.
            pen.rectangle((x - 1, y - 1, x + CELL, y + CELL), outline=FRAME)
    return canvas


def save(image: Image.Image, path: Path, description: str) -> None:
    """A small PNG that says what made it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", description)
    info.add_text("Software", "latentkit scripts/make_pictures.py")
    # A 64-colour palette: flat shapes lose nothing visible, the files shrink about 3x.
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True, pnginfo=info
    )
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def samplers(pipe: latentkit.Pipeline, out: Path, *, quick: bool) -> None:
    names = latentkit.schedulers.names()[:2] if quick else latentkit.schedulers.names()
    steps = (1, 2) if quick else STEPS
    rows = [
        [
            pipe.generate(PROMPT, scheduler=name, steps=n, seed=SEED, progress=False).images[0]
            for n in steps
        ]
        for name in names
    ]
    save(
        grid(rows, row_labels=names, column_labels=[f"{n} steps" for n in steps]),
        out / "samplers.png",
        f"{MODEL}, {PROMPT!r}, seed {SEED}: schedulers x steps",
    )


def image_to_image(pipe: latentkit.Pipeline, out: Path, *, quick: bool) -> None:
    steps = 5 if quick else 20
    source = pipe.generate(PROMPT, steps=steps, seed=SEED, progress=False).images[0]
    # Another relation: low strengths keep the layout, high ones follow the new prompt.
    prompt = "a red circle above a blue square"
    strengths = (0.2, 0.4, 0.6, 0.8, 1.0)
    row = [source] + [
        pipe.generate(
            prompt, image=source, strength=s, steps=steps, seed=SEED, progress=False
        ).images[0]
        for s in strengths
    ]
    labels = ["picture"] + [f"strength {s}" for s in strengths]
    save(
        grid([row], column_labels=labels),
        out / "image-to-image.png",
        f"{MODEL}: {PROMPT!r} re-generated as {prompt!r}, seed {SEED}, {steps} steps",
    )


def inpainting(pipe: latentkit.Pipeline, out: Path, *, quick: bool) -> None:
    steps = 5 if quick else 20
    source = pipe.generate(PROMPT, steps=steps, seed=SEED, progress=False).images[0]
    mask = Image.new("L", source.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, source.width // 2 - 1, source.height - 1), fill=255)
    prompt = "a green triangle left of a blue square"
    results = [
        pipe.generate(
            prompt, image=source, mask_image=mask, steps=steps, seed=seed, progress=False
        ).images[0]
        for seed in (SEED, SEED + 1, SEED + 2)
    ]
    save(
        grid([[source, mask, *results]], column_labels=["picture", "mask", "seed 3", "4", "5"]),
        out / "inpainting.png",
        f"{MODEL}: the white half of the mask repainted as {prompt!r}, {steps} steps",
    )


def depth(pipe: latentkit.Pipeline, out: Path, *, quick: bool) -> None:
    steps = 5 if quick else 20
    source = pipe.generate(PROMPT, steps=steps, seed=SEED, progress=False).images[0]
    pixels = np.asarray(source.convert("RGB"), dtype=np.float32) / 255
    # A depth map for the picture: the shapes stand near (1), the floor recedes upwards.
    floor = np.linspace(0.1, 0.6, source.height, dtype=np.float32)[:, None]
    shapes = pixels.min(axis=-1) < 0.8
    depth_map = np.where(shapes, 1.0, np.broadcast_to(floor, shapes.shape)).astype(np.float32)
    factor = 8  # Stable Diffusion's autoencoder: latents are 8× smaller along each side
    latent = (source.height // factor, source.width // factor)
    channel = DepthConditioner().encode(
        DepthInput(latent_size=latent, depth_map=torch.from_numpy(depth_map)),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )[0, 0]
    shown = ((channel.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    save(
        grid(
            [
                [
                    source,
                    Image.fromarray((depth_map * 255).round().astype(np.uint8)),
                    Image.fromarray(shown).resize(source.size, Image.Resampling.NEAREST),
                ]
            ],
            column_labels=["picture", "depth map", "UNet input"],
        ),
        out / "depth.png",
        f"a depth map and the {latent[0]}x{latent[1]} channel DepthConditioner makes of it",
    )


def outpainting(pipe: latentkit.Pipeline, out: Path, *, quick: bool) -> None:
    from latentkit.outpainting import extend

    steps = 5 if quick else 20
    source = pipe.generate(PROMPT, steps=steps, seed=SEED, progress=False).images[0]
    margins = (32, 0, 32, 0)
    pixels = torch.from_numpy(np.asarray(source.convert("RGB"), dtype=np.float32) / 127.5 - 1)
    grown = extend(pixels.permute(2, 0, 1)[None], margins)
    canvas = ((grown.canvas[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    start = Image.fromarray(canvas)
    # Outline the repainted area: the margins and the seam (the mask's columns).
    columns = np.flatnonzero(grown.mask[0, 0, 0].numpy() > 0)
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    outline = ImageDraw.Draw(start)
    for run in runs:
        outline.rectangle((run[0], 0, run[-1], start.height - 1), outline=(255, 160, 0))
    results = [
        pipe.generate(
            PROMPT, image=source, outpaint=margins, steps=steps, seed=seed, progress=False
        ).images[0]
        for seed in (SEED, SEED + 1, SEED + 2)
    ]
    wide = (start.width, start.height)
    face = font()
    top, gap = 16, PAD
    width = PAD + CELL + 2 * gap + len([start, *results]) * (wide[0] + gap)
    sheet = Image.new("RGB", (width, top + CELL + 2 * PAD), WHITE)
    pen = ImageDraw.Draw(sheet)
    x = PAD
    labels = ["picture", "start", f"seed {SEED}", str(SEED + 1), str(SEED + 2)]
    for image, label in zip([source, start, *results], labels, strict=True):
        sheet.paste(image.convert("RGB"), (x, top + PAD))
        pen.rectangle(
            (x - 1, top + PAD - 1, x + image.width, top + PAD + image.height), outline=FRAME
        )
        pen.text((x + 2, 3), label, fill=INK, font=face)
        x += image.width + gap + (gap if image is source else 0)
    save(
        sheet,
        out / "outpainting.png",
        f"{MODEL}: {PROMPT!r} outpainted by {margins} (left, top, right, bottom), {steps} steps",
    )


PICTURES: dict[str, Callable[..., None]] = {
    "samplers": samplers,
    "image-to-image": image_to_image,
    "inpainting": inpainting,
    "outpainting": outpainting,
    "depth": depth,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make the docs' pictures (docs/images).")
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--output", type=Path, default=here / "docs" / "images")
    parser.add_argument("--quick", action="store_true", help="few steps and samplers: a check")
    parser.add_argument("only", nargs="*", help=f"some of {', '.join(PICTURES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.only if name not in PICTURES]
    if unknown:
        parser.error(f"unknown pictures {unknown}; choose from {', '.join(PICTURES)}")
    args.output.mkdir(parents=True, exist_ok=True)
    pipe = latentkit.load_pipeline(MODEL, device="cpu", progress=False)
    for name in args.only or PICTURES:
        PICTURES[name](pipe, args.output, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
