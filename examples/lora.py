"""Apply a LoRA, unfused and fused, and check that both give the same image.

``pipe.with_lora(path, scale=...)`` returns a new pipeline with the LoRA (kohya/A1111 or
diffusers/PEFT keys) and leaves ``pipe`` as it was. Unfused (default), each adapted layer
adds a low-rank side path; ``fuse=True`` adds the change into private copies of the adapted
weights (see docs/lora.md for the speed and memory of each).

Without ``--lora``, the example writes a small random LoRA in kohya's format (rank 4 on
every attention projection of the UNet) so that it runs anywhere. It saves the unfused
image as ``lora.png`` (its PNG parameters name the LoRA with its hash, as A1111 writes them)
and prints the largest pixel differences fused vs unfused and LoRA vs base.

    python examples/lora.py --lora path/to/lora.safetensors --scale 0.8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import latentkit


def write_random_lora(unet: torch.nn.Module, path: Path, *, rank: int = 4) -> None:
    """A random kohya LoRA on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention."""
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, layer in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")) or (
            name.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))
        ):
            # kohya's names: "lora_unet_" and the module path with "_" for ".".
            key = "lora_unet_" + name.replace(".", "_")
            out_features, in_features = layer.weight.shape
            state[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator)
            state[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator)
            state[f"{key}.lora_up.weight"] *= 0.1 / rank
            state[f"{key}.alpha"] = torch.tensor(float(rank))  # alpha / rank = 1
    save_file(state, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate with a LoRA, unfused and fused.")
    parser.add_argument("prompt", nargs="?", default="a photo of an astronaut riding a horse")
    parser.add_argument(
        "--model",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="Hub repo id or folder",
    )
    parser.add_argument(
        "--lora", type=Path, default=None, help="a LoRA file (default: a random one)"
    )
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=None, help="width and height in pixels")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    settings = {"steps": args.steps, "seed": args.seed, "height": args.size, "width": args.size}

    pipe = latentkit.load_pipeline(args.model, device=args.device)
    lora = args.lora
    if lora is None:
        lora = args.output / "random_lora.safetensors"
        write_random_lora(pipe.unet, lora)

    unfused = pipe.with_lora(lora, scale=args.scale)
    fused = pipe.with_lora(lora, scale=args.scale, fuse=True)
    result = unfused.generate(args.prompt, **settings)
    # overwrite=True so the example can be rerun; by default save() refuses to replace files.
    [path] = result.save(args.output / "lora.png", overwrite=True)
    print(path)
    print(result.parameters[0].a1111())

    def image(p: latentkit.LatentDiffusion) -> np.ndarray:
        return np.asarray(p.generate(args.prompt, output_type="np", **settings).images)

    a, b, base = image(unfused), image(fused), image(pipe)
    print(f"largest pixel difference, fused vs unfused: {np.abs(a - b).max():.2e}")
    print(f"largest pixel difference, LoRA vs base: {np.abs(a - base).max():.2e}")


if __name__ == "__main__":
    main()
