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
- ``controlnet.png``: a ControlNet for the shapes model, trained by this script with
  ``latentkit.lab.training.train_controlnet`` (about 10 minutes on one CPU thread, then
  cached: see `shapes_controlnet`): held-out scenes, their Canny edges, the shapes model's
  picture for the scene's caption without the ControlNet, and with it at two scales (same
  prompt and seed). The script also prints how well the drawn shapes cover the scene's.
- ``upscaling.png``: what ``Performance(unet_tiling=...)`` does, from ``latentkit.tiles``
  itself: where the latent windows go and each one's blend weight (their share of each
  latent), for the shapes model re-generating a 2x enlargement of its picture on 64-pixel
  windows; then that picture untiled and tiled and their difference. No x4 upscaler weights
  ship with latentkit, so no upscaled picture is shown.
- ``depth.png``: what a depth-to-image model reads: a picture, a depth map for it, and the
  map as the UNet's extra input channel (resized to the latents and scaled to [-1, 1] by
  ``latentkit.conditioners.DepthConditioner``). No depth model ships with latentkit, so the
  picture stops there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

import latentkit
from latentkit.conditioners.depth import DepthConditioner, DepthInput
from latentkit.control import canny
from latentkit.lab.shapes import ShapesDataset

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


def save(image: Image.Image, path: Path, description: str, *, colors: int = 64) -> None:
    """A small PNG that says what made it, in a palette of ``colors``."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", description)
    info.add_text("Software", "latentkit scripts/make_pictures.py")
    # A palette (64 colours unless asked): flat shapes lose nothing visible, the files
    # shrink about 3x.
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
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


# The ControlNet's recipe: its cache is keyed by these and the shapes UNet's weights.
CONTROL_RECIPE = {
    "images": 3000,  # training scenes (ShapesDataset, split "train")
    "data_seed": 1,  # not the shapes model's training seed (0): other scenes
    # Canny thresholds for flat shapes on white: yellow on white is a weak edge (a luma step
    # of 53 of 255, an L1 Sobel strength of 178 after smoothing), so at the model cards'
    # 100/200 yellow shapes vanish from the edges.
    "canny": [50, 100],
    "widths": [16, 32, 64],  # the control embedding: 3 levels, 64 pixels to 16 latents
    "steps": 500,
    "batch": 32,
    "lr": 1e-3,
    # The paper drops half the prompts (sec. 3.3) so the ControlNet learns to draw from the
    # control image alone; here colours come only from the prompt, and every picture has one.
    "p_uncond": 0.1,
    "seed": 0,
}
CONTROL_SCALES = (0.5, 1.0)
CONTROL_SCENES_SEED = 7  # the pictured scenes: the first four of the held-out split


def _scene_tensors(
    data: ShapesDataset, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images in [-1, 1] (n, 3, 64, 64), their Canny edges in [0, 1], their captions."""
    pictures, edges, captions = [], [], []
    for picture, text in data:
        pictures.append(np.asarray(picture.convert("RGB")))
        edges.append(np.asarray(canny(picture, low=low, high=high)))
        captions.append(text)

    def stack(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()

    return stack(pictures) / 127.5 - 1, stack(edges) / 255, captions


def _recipe_key(pipe: latentkit.Pipeline) -> str:
    digest = hashlib.sha256(json.dumps(CONTROL_RECIPE, sort_keys=True).encode())
    for name, tensor in sorted(pipe.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def shapes_controlnet(pipe: latentkit.Pipeline, cache: Path, *, quick: bool) -> Path:
    """A Canny ControlNet for the shapes model, as a folder in diffusers' layout.

    Trained on ``CONTROL_RECIPE["images"]`` training scenes and their edges: initialised
    from the shapes UNet's encoder with zero convolutions (`ControlNet.from_unet`, Zhang et
    al. 2023, sec. 3), then `train_controlnet` with the UNet frozen (v-prediction, AdamW,
    float32), deterministic on one machine from the recipe.
    The folder is cached under ``cache`` by a hash of the recipe and the UNet's weights, so
    a rerun reuses it and a changed model retrains. ``quick``: 2 steps on 64 scenes (checks
    the code, draws nothing useful); give a scratch folder as ``cache``.
    """
    from latentkit.lab.training import train_controlnet
    from latentkit.models.controlnet import ControlNet
    from latentkit.models.layers import Attention
    from latentkit.saving import save_controlnet

    recipe = dict(CONTROL_RECIPE)
    if quick:
        recipe.update(images=64, steps=2, batch=8)
    folder = cache / f"shapes-canny-controlnet-{_recipe_key(pipe)}"
    if not quick and (folder / "config.json").is_file():
        return folder
    started = time.perf_counter()
    low, high = recipe["canny"]
    data = ShapesDataset(int(recipe["images"]), seed=int(recipe["data_seed"]), split="train")
    pixels, edges, captions = _scene_tensors(data, low, high)
    cpu = torch.device("cpu")
    text = pipe.text[0]
    prompts = sorted(set(captions))
    with torch.no_grad():
        vae = pipe.vae
        # The posterior means, scaled: the latents the shapes UNet was trained on.
        latents = torch.cat(
            [vae.posterior(pixels[i : i + 256]).mean for i in range(0, len(pixels), 256)]
        )
        latents = latents * vae.scaling_factor
        table = text.encode(prompts, device=cpu, dtype=torch.float32)
        empty = text.encode([""], device=cpu, dtype=torch.float32)
    which = torch.tensor([prompts.index(c) for c in captions])

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(int(recipe["seed"]) + 1)
        size = int(recipe["batch"])
        while True:  # shuffled epochs
            order = torch.randperm(len(which), generator=generator)
            for start in range(0, len(order) - size + 1, size):
                index = order[start : start + size]
                yield latents[index], table[which[index]], edges[index]

    torch.manual_seed(int(recipe["seed"]))  # the control embedding's first layers
    controlnet = ControlNet.from_unet(
        pipe.unet, conditioning_embedding_out_channels=tuple(recipe["widths"])
    )
    attention = [
        m for m in (*pipe.unet.modules(), *controlnet.modules()) if isinstance(m, Attention)
    ]
    backends = [m.backend for m in attention]
    for module in attention:
        module.backend = "math"  # tiny heads: faster than the fused kernels' CPU backward

    losses: list[float] = []

    def report(step: int, loss: float) -> None:
        losses.append(loss)
        if step % 50 == 0 or step == recipe["steps"]:
            mean = sum(losses[-50:]) / len(losses[-50:])
            print(f"  ControlNet step {step}/{recipe['steps']}: loss {mean:.4f}", flush=True)

    try:
        # Float32: under a bfloat16 autocast around the whole loop (backward and AdamW's
        # updates included) the loss did not move in 100 steps, where in float32 it fell
        # from 0.069 to 0.036.
        train_controlnet(
            controlnet,
            pipe.unet,
            pipe.scheduler,
            batches(),
            steps=int(recipe["steps"]),
            lr=float(recipe["lr"]),
            empty_context=empty,
            p_uncond=float(recipe["p_uncond"]),
            seed=int(recipe["seed"]) + 2,
            progress=False,
            callback=report,
        )
    finally:
        for module, backend in zip(attention, backends, strict=True):
            module.backend = backend
    # Written beside, then moved: an interrupted run leaves no half-written cache.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_controlnet(partial, controlnet.eval().requires_grad_(False))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    minutes = (time.perf_counter() - started) / 60
    print(f"trained {folder} in {minutes:.1f} min", flush=True)
    return folder


def _ink(image: Image.Image) -> np.ndarray:
    """Where a picture is not paper: darker than halfway between any palette colour and
    white in its darkest channel."""
    return np.asarray(image.convert("RGB")).min(axis=-1) < 128


def _overlap(image: Image.Image, scene: Image.Image) -> float:
    """Intersection over union of the drawn and the scene's shape pixels."""
    drawn, wanted = _ink(image), _ink(scene)
    return float((drawn & wanted).sum() / max(1, (drawn | wanted).sum()))


def controlnet(pipe: latentkit.Pipeline, out: Path, *, quick: bool, cache: Path) -> None:
    steps = 5 if quick else 20
    low, high = CONTROL_RECIPE["canny"]
    with tempfile.TemporaryDirectory() as scratch:  # --quick's ControlNet is not kept
        folder = shapes_controlnet(pipe, Path(scratch) if quick else cache, quick=quick)
        controlled = pipe.with_controlnet(str(folder), progress=False)
    scenes = ShapesDataset(
        4 if quick else 32, seed=CONTROL_SCENES_SEED, split="held_out", two_shape_fraction=0.75
    )
    rows, labels = [], []
    overlaps: dict[str, list[float]] = {"without": [], **{f"{s}": [] for s in CONTROL_SCALES}}
    for i, (scene, prompt) in enumerate(scenes):
        edges = canny(scene, low=low, high=high)
        plain = pipe.generate(prompt, steps=steps, seed=SEED, progress=False).images[0]
        steered = [
            controlled.generate(
                prompt,
                control_image=edges,
                control_scale=scale,
                steps=steps,
                seed=SEED,
                progress=False,
            ).images[0]
            for scale in CONTROL_SCALES
        ]
        overlaps["without"].append(_overlap(plain, scene))
        for scale, image in zip(CONTROL_SCALES, steered, strict=True):
            overlaps[f"{scale}"].append(_overlap(image, scene))
        if i < 4:
            rows.append([scene, edges, plain, *steered])
            labels.append(prompt)
    print(
        f"shape pixels' overlap (IoU) with the scene's, mean of {len(scenes)} held-out scenes: "
        + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in overlaps.items())
    )
    columns = ["scene", "Canny edges", "without", *[f"scale {s:g}" for s in CONTROL_SCALES]]
    save(
        grid(rows, row_labels=labels, column_labels=columns),
        out / "controlnet.png",
        f"{MODEL} with a Canny ControlNet trained by make_pictures.py ({CONTROL_RECIPE['steps']} "
        f"steps), seed {SEED}, {steps} steps, held-out scenes {CONTROL_SCENES_SEED}/0-3",
    )


WINDOW_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 200, 200),
    (240, 50, 230),
    (150, 150, 0),
    (0, 0, 128),
]


def _windows(
    size: tuple[int, int], tile: int, overlap: int
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The windows `latentkit.tiles.map_tiles` cuts from a latent image of ``size`` (h, w)
    (their top-left corners, in its order) and each one's share of every latent, (n, h, w):
    what the blend makes of a function that is 1 on one window's output and 0 on the others'.
    """
    from latentkit.tiles import map_tiles

    rows, columns = torch.meshgrid(
        torch.arange(size[0], dtype=torch.float64),
        torch.arange(size[1], dtype=torch.float64),
        indexing="ij",
    )
    where = torch.stack([rows, columns])[None]  # each window sees its own coordinates
    corners: list[tuple[int, int]] = []
    most = 64  # output channels: room for this many windows

    def one_hot(window: torch.Tensor) -> torch.Tensor:
        corners.append((int(window[0, 0, 0, 0]), int(window[0, 1, 0, 0])))
        out = torch.zeros(1, most, *window.shape[-2:], dtype=torch.float64)
        out[:, len(corners) - 1] = 1
        return out

    shares = map_tiles(one_hot, where, tile=tile, overlap=overlap)[0, : len(corners)]
    return corners, shares


def upscaling(pipe: latentkit.Pipeline, out: Path, *, quick: bool) -> None:
    steps = 5 if quick else 20
    side, tile_px = 128, 64  # a 2x enlargement of the 64-pixel picture, 64-pixel windows
    factor = pipe.vae.scale_factor
    tiling = latentkit.Tiling(tile_size=tile_px)
    tiled_pipe = latentkit.load_pipeline(
        MODEL, device="cpu", progress=False, performance=latentkit.Performance(unet_tiling=tiling)
    )
    # The window size and overlap (in latents) the pipeline passes to latentkit.tiles.
    latent_tiles = tiled_pipe._latent_tiles()
    assert latent_tiles is not None
    tile, overlap = latent_tiles
    corners, shares = _windows((side // factor, side // factor), tile, overlap)

    source = pipe.generate(PROMPT, steps=steps, seed=SEED, progress=False).images[0]
    big = source.resize((side, side), Image.Resampling.BICUBIC)
    options = dict(image=big, strength=0.5, steps=steps, seed=SEED, progress=False)
    whole = pipe.generate(PROMPT, **options).images[0]
    tiled = tiled_pipe.generate(PROMPT, **options).images[0]
    diff = np.abs(np.asarray(tiled, dtype=np.float32) - np.asarray(whole, dtype=np.float32)).mean(
        axis=-1
    )
    print(
        f"unet_tiling {tile}-latent windows, overlap {overlap}, {len(corners)} windows; "
        f"tiled vs untiled: mean |diff| {diff.mean() / 255:.4f}, max {diff.max() / 255:.3f}"
    )

    colours = [WINDOW_COLOURS[k % len(WINDOW_COLOURS)] for k in range(len(corners))]
    # Each latent as a factor x factor block: the panels line up with the pictures below.
    outlines = Image.new("RGB", (side, side), WHITE)
    pen = ImageDraw.Draw(outlines)
    for k, ((top, left), colour) in enumerate(zip(corners, colours, strict=True)):
        inset = k % 3  # windows that share an edge stay apart
        box = (left * factor + inset, top * factor + inset)
        pen.rectangle(
            (*box, (left + tile) * factor - 1 - inset, (top + tile) * factor - 1 - inset),
            outline=colour,
        )
    mix = torch.einsum("nhw,nc->hwc", shares, torch.tensor(colours, dtype=torch.float64))
    blend = Image.fromarray(mix.round().to(torch.uint8).numpy())
    centre = len(corners) // 2
    one = Image.fromarray((shares[centre] * 255).round().to(torch.uint8).numpy())
    # One row of windows alone (a 1-latent-high image): the ramps along the x axis.
    line_corners, line_shares = _windows((1, side // factor), tile, overlap)
    profile = _profile(line_shares[:, 0], colours, factor=factor)
    shown = Image.fromarray(np.clip(diff * 4, 0, 255).astype(np.uint8))

    panels = [
        [
            (outlines, f"{len(corners)} latent windows"),
            (blend.resize((side, side), Image.Resampling.NEAREST), "their weights"),
            (one.resize((side, side), Image.Resampling.NEAREST), f"window {centre + 1}'s"),
            (profile, f"{len(line_corners)} windows along x"),
        ],
        [
            (source, "picture"),
            (big, "2x (bicubic)"),
            (whole, "untiled"),
            (tiled, "tiled"),
            (shown, "|difference| x4"),
        ],
    ]
    face = font()
    top = 16
    width = PAD + 5 * (side + PAD)
    sheet = Image.new("RGB", (width, 2 * (top + side + PAD) + PAD), WHITE)
    pen = ImageDraw.Draw(sheet)
    y = PAD
    for row in panels:
        x = PAD
        for image, label in row:
            pen.text((x + 2, y), label, fill=INK, font=face)
            offset = (side - image.height) // 2
            sheet.paste(image.convert("RGB"), (x, y + top + offset))
            pen.rectangle(
                (x - 1, y + top + offset - 1, x + image.width, y + top + offset + image.height),
                outline=FRAME,
            )
            x += side + PAD
        y += top + side + PAD
    save(
        sheet,
        out / "upscaling.png",
        f"{MODEL}: {PROMPT!r}, seed {SEED}, 2x image-to-image at strength 0.5, {steps} steps, "
        f"UNet whole and on {tile_px}-pixel windows (latentkit.tiles)",
        colors=256,  # the weights' gradients
    )


def _profile(
    shares: torch.Tensor, colours: list[tuple[int, int, int]], *, factor: int
) -> Image.Image:
    """A line chart of each window's weight (n, w) along x: 0 at the bottom, 1 at the top."""
    width = shares.shape[-1] * factor
    chart = Image.new("RGB", (width, width), WHITE)
    pen = ImageDraw.Draw(chart)
    low, high = width - 8, 8  # y of weight 0 and 1
    for level in (0.0, 0.5, 1.0):
        y = low + (high - low) * level
        pen.line((0, y, width - 1, y), fill=FRAME)
    for weights, colour in zip(shares, colours, strict=False):
        points = [
            (i * factor + factor // 2, low + (high - low) * float(w)) for i, w in enumerate(weights)
        ]
        pen.line(points, fill=colour, width=2)
    return chart


PICTURES: dict[str, Callable[..., None]] = {
    "samplers": samplers,
    "image-to-image": image_to_image,
    "inpainting": inpainting,
    "outpainting": outpainting,
    "depth": depth,
    "controlnet": controlnet,
    "upscaling": upscaling,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make the docs' pictures (docs/images).")
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--output", type=Path, default=here / "docs" / "images")
    parser.add_argument("--quick", action="store_true", help="few steps and samplers: a check")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    parser.add_argument(
        "--cache",
        type=Path,
        default=cache / "latentkit" / "pictures",
        help="where the trained ControlNet is kept between runs",
    )
    parser.add_argument("only", nargs="*", help=f"some of {', '.join(PICTURES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.only if name not in PICTURES]
    if unknown:
        parser.error(f"unknown pictures {unknown}; choose from {', '.join(PICTURES)}")
    args.output.mkdir(parents=True, exist_ok=True)
    pipe = latentkit.load_pipeline(MODEL, device="cpu", progress=False)
    for name in args.only or PICTURES:
        extra = {"cache": args.cache} if name == "controlnet" else {}
        PICTURES[name](pipe, args.output, quick=args.quick, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
