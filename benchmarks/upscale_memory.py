"""Memory of the x4 upscaler with and without tiling, and how visible the tiles' seams are.

    OMP_NUM_THREADS=1 python benchmarks/upscale_memory.py                  # x4 layout, narrow UNet
    OMP_NUM_THREADS=1 python benchmarks/upscale_memory.py --cases 32,128,128t,256t
    OMP_NUM_THREADS=1 python benchmarks/upscale_memory.py --seams-only     # the seam check only

Memory: each case runs in a fresh process that loads the pipeline, resets the kernel's peak
RSS counter (``/proc/self/clear_refs``, Linux), upscales, and reports the peak resident memory
above what it held before the call: the activations of the UNet and the autoencoder, not the
weights. A case ``N`` upscales an N x N picture untiled; ``Nt`` tiles the UNet
(``Performance.unet_tiling``) and the autoencoder (``vae_tiling``) with ``--tile`` output
pixels. The model has the x4 upscaler's layout and its autoencoder at full size, random
weights; ``--arch x4-narrow`` (default) gives its UNet a quarter of the channels so a CPU
runs it in minutes (activation memory scales with the picture the same way).

Seams: how far tiled output is from untiled, in the bands where windows overlap and
elsewhere: on the random-weight model for the tiled cases, and on trained weights with the
built-in shapes model re-generating a 2x enlargement of its own picture (image-to-image at
strength 0.5, so the input anchors the content as it does for an upscaler) with its UNet
on 64-pixel windows and whole; another seed's distance is printed for scale.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the tokenizer and text encoder


def build(arch: str, folder: Path) -> Path:
    """A random-weight x4-upscaler-layout pipeline written by diffusers (once)."""
    if (folder / "model_index.json").is_file():
        return folder
    import tiny_models
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    width = 1 if arch == "x4" else 4
    unet = UNet2DConditionModel(
        block_out_channels=tuple(c // width for c in (256, 512, 512, 1024)),
        layers_per_block=2,
        sample_size=128,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        cross_attention_dim=1024,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, True, False),
        num_class_embeds=1000,
    )
    vae = AutoencoderKL(  # stabilityai/stable-diffusion-x4-upscaler vae/config.json
        block_out_channels=(128, 256, 512),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=2,
        sample_size=256,
        scaling_factor=0.08333,
    )
    tmp = folder.parent / "tokenizer-tmp"
    vocab = tiny_models.write_tokenizer(tmp, pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp))
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            hidden_size=1024,
            intermediate_size=1024,
            num_attention_heads=16,
            num_hidden_layers=1,
            vocab_size=vocab,
            hidden_act="gelu",
        )
    )
    StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(tiny_models.UPSCALE_LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler.from_config(tiny_models.UPSCALE_SCHEDULER),
        max_noise_level=350,
    ).save_pretrained(str(folder), safe_serialization=True)
    return folder


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(model: Path, case: str, tile: int, steps: int, out: Path) -> None:
    """One case in this (fresh) process; prints a JSON line."""
    import latentkit

    tiled = case.endswith("t")
    side = int(case.rstrip("t"))
    tiling = latentkit.Tiling(tile_size=tile) if tiled else False
    performance = latentkit.Performance(unet_tiling=tiling, vae_tiling=tiling)
    pipe = latentkit.load_pipeline(model, device="cpu", progress=False, performance=performance)
    y, x = np.mgrid[0:side, 0:side] / side
    picture = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x * y)], axis=-1).astype(np.float32)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    result = pipe.generate(
        "a photo", image=picture, steps=steps, seed=0, output_type="np", progress=False
    )
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    np.save(out / f"{case}.npy", result.images[0])
    print(json.dumps({"case": case, "mib": (peak - before) / 1024, "seconds": seconds}))


def overlap_bands(side: int, tile: int, factor: int) -> np.ndarray:
    """(side, side) True on the output pixels where two latent windows overlap (blended)."""
    from latentkit.tiles import tile_starts

    latent, window = side // factor, tile // factor
    starts = tile_starts(latent, window, window - int(window * 0.25))
    line = np.zeros(side, dtype=bool)
    for a, b in itertools.pairwise(starts):
        line[b * factor : (a + window) * factor] = True
    return line[:, None] | line[None, :]


def compare(a: np.ndarray, b: np.ndarray, bands: np.ndarray) -> str:
    diff = np.abs(a - b).mean(axis=-1)
    return (
        f"mean |diff| {diff.mean():.4f} (in the overlaps {diff[bands].mean():.4f}, "
        f"elsewhere {diff[~bands].mean():.4f}), max {diff.max():.3f}"
    )


def seams() -> str:
    """Tiled against untiled on trained weights: the shapes model re-generating a 2x
    enlargement of its own picture (image-to-image at strength 0.5: content anchored by the
    input, as an upscaler's is), its UNet on 64-pixel windows or whole."""
    from PIL import Image

    import latentkit

    prompt = "a red circle left of a blue square"
    plain = latentkit.load_pipeline("latentkit/shapes", device="cpu", progress=False)
    small = plain.generate(prompt, steps=20, seed=3, progress=False).images[0]
    big = small.resize((128, 128), Image.Resampling.BICUBIC)
    kw: dict[str, Any] = dict(image=big, strength=0.5, steps=20, seed=3, output_type="np")
    tiled = latentkit.load_pipeline(
        "latentkit/shapes",
        device="cpu",
        progress=False,
        performance=latentkit.Performance(unet_tiling=latentkit.Tiling(tile_size=64)),
    )
    a = tiled.generate(prompt, progress=False, **kw).images[0]
    b = plain.generate(prompt, progress=False, **kw).images[0]
    other = plain.generate(prompt, progress=False, **{**kw, "seed": 4}).images[0]
    bands = overlap_bands(128, 64, plain.vae.scale_factor)
    return (
        f"shapes 128² (64 px windows) tiled vs untiled: {compare(a, b, bands)}; "
        f"untiled, seed 4 vs 3: mean |diff| {np.abs(other - b).mean():.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["x4-narrow", "x4"], default="x4-narrow")
    parser.add_argument("--cases", default="32,128,128t", help="N (untiled) or Nt (tiled)")
    parser.add_argument("--tile", type=int, default=128, help="tile side in output pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--seams-only", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model_dir or ROOT / "benchmarks" / ".cache" / f"{args.arch}-random"
    if args.worker:
        worker(model, args.worker, args.tile, args.steps, args.out)
        return
    if not args.seams_only:
        build(args.arch, model)
        out = model.parent / f"{args.arch}-outputs"
        out.mkdir(exist_ok=True)
        print(
            f"| input -> output | tiled | peak memory above the loaded model | time ({args.steps} steps) |"
        )
        print("|---|---|---|---|")
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--worker", case, "--arch", args.arch]
            cmd += ["--tile", str(args.tile), "--steps", str(args.steps), "--out", str(out)]
            cmd += ["--model-dir", str(model)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            side = int(case.rstrip("t"))
            tiled = f"{args.tile} px tiles" if case.endswith("t") else "no"
            print(
                f"| {side}² -> {4 * side}² | {tiled} | {row['mib']:.0f} MiB | {row['seconds']:.1f} s |"
            )
        for case in args.cases.split(","):
            if case.endswith("t") and (out / f"{case[:-1]}.npy").is_file():
                a, b = np.load(out / f"{case}.npy"), np.load(out / f"{case[:-1]}.npy")
                bands = overlap_bands(a.shape[0], args.tile, 4)
                print(f"{case} vs {case[:-1]} (random weights): {compare(a, b, bands)}")
    print(seams())


if __name__ == "__main__":
    main()
