"""Distil a TAESD-structured tiny autoencoder for the built-in shapes model.

The published TAESD weights decode Stable Diffusion's latents, not the shapes model's
(another autoencoder, factor 4), so docs/performance.md's tiny-autoencoder row on the shapes
model needs one of its own: a `latentkit.models.autoencoder_tiny.AutoencoderTiny` (three
stages, factor 4) trained to reproduce the shapes KL autoencoder, as TAESD was distilled
from Stable Diffusion's:

- the decoder maps the pipeline's (scaled) latents to what the KL decoder makes of them (L1),
- the encoder maps images to the KL posterior's mean, scaled (MSE),

on latents of the shapes training data. Its latents are the pipeline's scaled ones, so its
``scaling_factor`` is 1.0. Deterministic from ``--seed``; written with diffusers' layout
(``config.json`` + ``diffusion_pytorch_model.safetensors``), loadable as
``latentkit.load_pipeline("latentkit/shapes", vae=<folder>)``.

    python benchmarks/distill_shapes_taesd.py --output benchmarks/.cache/shapes-taesd
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import latentkit
from latentkit.lab.shapes import ShapesDataset
from latentkit.models.autoencoder import AutoencoderKL
from latentkit.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig

CONFIG = AutoencoderTinyConfig(
    encoder_block_out_channels=(16, 16, 16),
    decoder_block_out_channels=(16, 16, 16),
    num_encoder_blocks=(1, 2, 2),
    num_decoder_blocks=(2, 2, 1),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    pipe = latentkit.load_pipeline("latentkit/shapes", device="cpu", dtype="fp32", progress=False)
    kl = pipe.vae
    assert isinstance(kl, AutoencoderKL)  # the shapes model's own
    data = ShapesDataset(args.images, seed=args.seed + 1000)
    start = time.perf_counter()
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            for im, _ in data
        ]
    )
    generator = torch.Generator().manual_seed(args.seed)
    means, samples, decoded = [], [], []
    with torch.inference_mode():
        for chunk in torch.split(pixels, 256):
            posterior = kl.posterior(chunk)
            z = posterior.sample(generator) * kl.scaling_factor
            means.append(posterior.mean * kl.scaling_factor)
            samples.append(z)
            decoded.append(kl.decode(z))
    mean, latents, teacher = torch.cat(means), torch.cat(samples), torch.cat(decoded)
    print(
        f"data: {len(pixels)} images, latents std {latents.std():.3f}, "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )

    tiny = AutoencoderTiny(CONFIG)
    params = sum(p.numel() for p in tiny.parameters())
    print(f"tiny autoencoder: {params / 1e6:.3f} M parameters", flush=True)
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    for step in range(args.steps):
        lr = (
            args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(pixels), (args.batch,), generator=order)
        decode_loss = F.l1_loss(tiny.decode(latents[index]), teacher[index])
        encode_loss = F.mse_loss(tiny.encode(pixels[index]), mean[index])
        loss = decode_loss + encode_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step}: decode L1 {decode_loss.item():.4f}, encode MSE "
                f"{encode_loss.item():.4f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    with torch.inference_mode():
        held = ShapesDataset(256, seed=args.seed + 2000, split="held_out")
        test = torch.stack(
            [
                torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                for im, _ in held
            ]
        )
        z = kl.posterior(test).mean * kl.scaling_factor
        err_decode = (tiny.decode(z) - kl.decode(z)).abs().mean().item()
        err_encode = (tiny.encode(test) - z).abs().mean().item()
    print(
        f"held-out: decode L1 vs the KL decoder {err_decode:.4f} (on [-1, 1]), "
        f"encode L1 vs the KL mean {err_encode:.4f}"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "config.json").write_text(json.dumps(CONFIG.to_dict(), indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in tiny.state_dict().items()},
        str(args.output / "diffusion_pytorch_model.safetensors"),
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
