"""LoRA unfused vs fused: time per denoising step, extra memory, and how far the images differ.

Loads a diffusers folder (default: SD 1.5's architecture with random weights, which
``benchmarks/compare.py`` builds in ``benchmarks/.cache/sd15-random``), writes a random
rank-``--rank`` kohya LoRA on every attention projection of the UNet (``to_q``, ``to_k``,
``to_v``, ``to_out.0`` of self- and cross-attention), and runs the base pipeline, the LoRA
unfused (``pipe.with_lora(path)``) and fused (``fuse=True``) at ``--size``², ``--repeats``
rounds that alternate the three. The time per step is ``(t(steps) - t(1)) / (steps - 1)``,
so text encoding and decoding cancel; the extra memory is the bytes of the adapted pipeline's
tensors that the base pipeline does not hold.

    python benchmarks/lora.py --size 256 --steps 4
    python benchmarks/lora.py --model-dir path/to/tiny --size 32   # a smoke test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import latentkit

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(unet: torch.nn.Module, path: Path, *, rank: int, seed: int = 0) -> int:
    """A random kohya LoRA of ``rank`` on every attention projection; returns its layer count."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, layer in unet.named_modules():
        if not (".attn1." in name or ".attn2." in name) or not name.endswith(PROJECTIONS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        state[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.02
        state[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.02
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return len(state) // 3


def tensors(pipe: Any) -> dict[int, int]:
    """Storage address -> bytes of every parameter and buffer of the pipeline's networks."""
    found: dict[int, int] = {}
    for module in (pipe.unet, pipe.vae, *(t.text_encoder for t in pipe.text)):
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def seconds(pipe: Any, *, steps: int, size: int) -> tuple[float, np.ndarray]:
    began = time.perf_counter()
    result = pipe.generate(
        "a photo of a cat",
        steps=steps,
        seed=0,
        height=size,
        width=size,
        output_type="np",
        progress=False,
    )
    return time.perf_counter() - began, np.asarray(result.images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "benchmarks/.cache/sd15-random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (the median is shown)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # OMP_NUM_THREADS decides
    base = latentkit.load_pipeline(
        args.model_dir, device="cpu", dtype=torch.float32, progress=False
    )
    # The file must outlive the runs: the PNG parameters' "Lora hashes" read it at generate().
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "lora.safetensors"
    layers = write_lora(base.unet, path, rank=args.rank)
    pipes = {
        "base": base,
        "unfused": base.with_lora(path),
        "fused": base.with_lora(path, fuse=True),
    }
    held = tensors(base)
    images: dict[str, np.ndarray] = {}
    for pipe in pipes.values():
        seconds(pipe, steps=1, size=args.size)  # warm-up
    # Rounds alternate the pipelines, so that a change in the machine's load hits all three;
    # the table gives each one's median.
    per_step: dict[str, list[float]] = {name: [] for name in pipes}
    for round_ in range(args.repeats):
        for name, pipe in pipes.items():
            one, _ = seconds(pipe, steps=1, size=args.size)
            many, images[name] = seconds(pipe, steps=args.steps, size=args.size)
            per_step[name].append((many - one) / (args.steps - 1))
            print(f"round {round_ + 1}: {name} {per_step[name][-1]:.2f} s/step", flush=True)
    rows = [
        (
            name,
            float(np.median(per_step[name])),
            sum(n for p, n in tensors(pipe).items() if p not in held),
        )
        for name, pipe in pipes.items()
    ]
    print(
        f"\n{args.model_dir.name}, {args.size}x{args.size}, rank {args.rank} on {layers} "
        f"attention projections, {torch.get_num_threads()} thread(s), fp32 CPU\n"
    )
    print("| pipeline | s/step, median (all rounds) | vs base | extra memory |")
    print("|---|---|---|---|")
    for name, step, extra in rows:
        runs = ", ".join(f"{t:.2f}" for t in per_step[name])
        print(
            f"| {name} | {step:.2f} ({runs}) | {step / rows[0][1]:.2f}x | {extra / 2**20:.1f} MiB |"
        )
    difference = float(np.abs(images["unfused"] - images["fused"]).max())
    print(f"\nlargest pixel difference, unfused vs fused: {difference:.2e}")
    change = float(np.abs(images["unfused"] - images["base"]).max())
    print(f"largest pixel difference, LoRA vs base: {change:.2e}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
