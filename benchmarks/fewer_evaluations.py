"""Speed (and closeness to the plain path) of the "fewer evaluations" options.

    python benchmarks/fewer_evaluations.py shapes --rounds 5
    python benchmarks/fewer_evaluations.py sd15 --rounds 3

``shapes``: seconds per image of the built-in shapes model (20 DPM-Solver++ steps, guidance
2, batches of 16 prompts), plain against each option, the options alternating within each
round; adherence is measured separately with ``latentkit-lab eval`` (docs/performance.md).

``sd15``: Stable Diffusion 1.5's architecture with random weights (the folder
``benchmarks/compare.py`` writes, ``benchmarks/.cache/sd15-random``) at 256x256 with
DPM-Solver++, CFG 7.5: seconds per denoising step (the loop's time over its steps, from the
first UNet call to the last step), the decode, and how far each option moves the result
from the plain one (relative L2 distance of the final latents, mean/max pixel difference).
Random weights make random pictures: the distances say how much an option changes the
computation, not how a trained model's picture looks. The LCM-LoRA row is a random rank-64
LoRA on the layers LCM-LoRA adapts, fused, with the ``lcm`` scheduler at 4 steps and no
guidance: its speed only.

One process, every option alternating with the plain path in each round; medians over the
rounds. Results are printed and written as JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import latentkit

HERE = Path(__file__).resolve().parent
SHAPES_PROMPTS = 16
INTERVAL = (0.28, 5.42)  # Kynkäänniemi et al. 2024's interval for SDXL (same noise schedule)

# LCM-LoRA (Luo et al. 2023) adapts these layers of the UNet (diffusers' LCM distillation
# script's target modules), at rank 64.
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def shapes(args: argparse.Namespace) -> dict[str, Any]:
    from latentkit.lab.shapes import held_out_prompts

    prompts = held_out_prompts(0, n_single=SHAPES_PROMPTS // 4, n_two=SHAPES_PROMPTS * 3 // 4)
    base = latentkit.load_pipeline("latentkit/shapes", device="cpu", progress=False)
    pipes = {"plain": base}
    if args.taesd is not None:
        pipes["taesd"] = latentkit.load_pipeline(
            "latentkit/shapes", device="cpu", progress=False, vae=args.taesd
        )
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "plain": ("plain", {}),
        "guidance_interval": ("plain", {"guidance_interval": INTERVAL}),
        "feature_cache=2": ("plain", {"feature_cache": 2}),
        "feature_cache=3": ("plain", {"feature_cache": 3}),
        "feature_cache=5": ("plain", {"feature_cache": 5}),
        "feature_cache=3 + guidance_interval": (
            "plain",
            {"feature_cache": 3, "guidance_interval": INTERVAL},
        ),
    }
    if "taesd" in pipes:
        variants["vae=TAESD (distilled)"] = ("taesd", {})
    times: dict[str, list[float]] = {name: [] for name in variants}
    decode: dict[str, list[float]] = {name: [] for name in ("plain", *pipes)}
    seeds = list(range(len(prompts)))
    for pipe in pipes.values():  # warm-up
        pipe.generate(prompts, seed=seeds, progress=False)
    for r in range(args.rounds):
        for name, (which, options) in variants.items():
            start = time.perf_counter()
            pipes[which].generate(prompts, seed=seeds, progress=False, **options)
            times[name].append((time.perf_counter() - start) / len(prompts))
        for which, pipe in pipes.items():
            latents = torch.randn(len(prompts), 4, 16, 16)
            with torch.inference_mode():
                start = time.perf_counter()
                pipe.vae.decode(latents)
                decode[which].append((time.perf_counter() - start) / len(prompts))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in times.items()))
    rows = {
        name: {
            "s_per_image": _median(v),
            "speed_up": _median(times["plain"]) / _median(v),
            "runs": v,
        }
        for name, v in times.items()
    }
    return {
        "setting": "shapes model, 64x64, dpm-solver++ 20 steps, guidance 2, batch 16, fp32 CPU",
        "rows": rows,
        "decode_s_per_image": {k: {"median": _median(v), "runs": v} for k, v in decode.items()},
    }


def _random_lcm_lora(unet: torch.nn.Module, path: Path, rank: int = 64) -> None:
    """A kohya-format LoRA with small random matrices on LCM-LoRA's layers."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, layer in unet.named_modules():
        if not name.endswith(LCM_LORA_TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(layer, torch.nn.Linear):
            down = torch.randn(rank, layer.in_features, generator=generator)
            up = torch.randn(layer.out_features, rank, generator=generator)
        elif isinstance(layer, torch.nn.Conv2d):
            k = layer.kernel_size
            down = torch.randn(rank, layer.in_channels, *k, generator=generator)
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
        else:
            continue
        state[f"{key}.lora_down.weight"] = down * 1e-3
        state[f"{key}.lora_up.weight"] = up * 1e-3
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))


def _taesd_random(folder: Path) -> Path:
    """TAESD's published configuration (diffusers' AutoencoderTiny defaults), random weights."""
    from safetensors.torch import save_file

    from latentkit.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig

    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        config = AutoencoderTinyConfig()
        tiny = AutoencoderTiny(config)
        save_file(tiny.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def sd15(args: argparse.Namespace) -> dict[str, Any]:
    folder = HERE / ".cache" / "sd15-random"
    if not (folder / "model_index.json").exists():
        sys.exit(f"{folder} is missing: write it with benchmarks/compare.py (--arch sd15) first")
    size, steps = args.size, args.steps
    plain_pipe = latentkit.load_pipeline(folder, device="cpu", dtype="fp32", progress=False)
    pipes = {"plain": plain_pipe}
    pipes["taesd"] = latentkit.load_pipeline(
        folder,
        device="cpu",
        dtype="fp32",
        progress=False,
        vae=_taesd_random(HERE / ".cache" / "taesd-random"),
    )
    lora = HERE / ".cache" / "lcm-lora-random.safetensors"
    if args.lcm:
        if not lora.exists():
            _random_lcm_lora(plain_pipe.unet, lora)
        pipes["lcm"] = plain_pipe.with_lora(lora, fuse=True)
    base: dict[str, Any] = {"steps": steps, "scheduler": "dpm-solver++", "guidance_scale": 7.5}
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "plain": ("plain", base),
        "guidance_interval": ("plain", {**base, "guidance_interval": INTERVAL}),
        "feature_cache=3": ("plain", {**base, "feature_cache": 3}),
        "feature_cache=3 + guidance_interval": (
            "plain",
            {**base, "feature_cache": 3, "guidance_interval": INTERVAL},
        ),
        "vae=TAESD": ("taesd", base),
    }
    if args.lcm:
        variants["LCM-LoRA, lcm 4 steps, no guidance"] = (
            "lcm",
            {"steps": 4, "scheduler": "lcm", "guidance_scale": 1.0},
        )
    results: dict[str, dict[str, list[float]]] = {
        n: {"s_per_step": [], "loop_s": [], "decode_s": [], "total_s": []} for n in variants
    }
    latents: dict[str, torch.Tensor] = {}
    pixels: dict[str, np.ndarray] = {}

    def timed(name: str, pipe: latentkit.LatentDiffusion, options: dict[str, Any]) -> None:
        marks: dict[str, float] = {}

        def first(module: Any, inputs: Any) -> None:
            marks.setdefault("loop", time.perf_counter())

        def each(step: Any) -> None:
            marks["last"] = time.perf_counter()

        hook = pipe.unet.register_forward_pre_hook(first)
        try:
            start = time.perf_counter()
            result = pipe.generate(
                "a photo of a cat",
                seed=0,
                height=size,
                width=size,
                output_type="np",
                progress=False,
                callback=each,
                **options,
            )
            end = time.perf_counter()
        finally:
            hook.remove()
        count = options["steps"]
        r = results[name]
        r["loop_s"].append(marks["last"] - marks["loop"])
        r["s_per_step"].append((marks["last"] - marks["loop"]) / count)
        r["decode_s"].append(end - marks["last"])
        r["total_s"].append(end - start)
        pixels[name] = np.asarray(result.images[0])

    def final_latents(pipe: latentkit.LatentDiffusion, options: dict[str, Any]) -> torch.Tensor:
        out = pipe.generate(
            "a photo of a cat",
            seed=0,
            height=size,
            width=size,
            output_type="latent",
            progress=False,
            **options,
        )
        return torch.as_tensor(out.images)

    for name, (which, options) in variants.items():
        if which == "plain":
            latents[name] = final_latents(pipes[which], options)
    for round_ in range(args.rounds):
        for name, (which, options) in variants.items():
            timed(name, pipes[which], options)
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{k} {v['s_per_step'][-1]:.2f} s/step" for k, v in results.items()),
            flush=True,
        )
    reference = latents["plain"]
    rows: dict[str, Any] = {}
    for name, r in results.items():
        row: dict[str, Any] = {k: _median(v) for k, v in r.items()}
        row["runs"] = r
        if name in latents:
            diff = latents[name] - reference
            row["latents_relative_l2"] = float(diff.norm() / reference.norm())
        if name != "plain" and not name.startswith("LCM"):
            d = np.abs(pixels[name] - pixels["plain"])
            row["image_mean_abs_diff"] = float(d.mean())
            row["image_max_abs_diff"] = float(d.max())
        rows[name] = row
    plain_step = rows["plain"]["s_per_step"]
    for row in rows.values():
        row["step_speed_up"] = plain_step / row["s_per_step"]
        row["image_speed_up"] = rows["plain"]["total_s"] / row["total_s"]
    return {
        "setting": f"SD 1.5 architecture, random weights, {size}x{size}, fp32 CPU, "
        f"dpm-solver++ {steps} steps, CFG 7.5",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("shapes", "sd15"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--taesd", type=Path, help="shapes: a distilled TAESD folder")
    parser.add_argument("--size", type=int, default=256, help="sd15: image side")
    parser.add_argument("--steps", type=int, default=10, help="sd15: DPM-Solver++ steps")
    parser.add_argument("--no-lcm", dest="lcm", action="store_false", help="sd15: skip LCM-LoRA")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    run: Callable[[argparse.Namespace], dict[str, Any]] = shapes if args.what == "shapes" else sd15
    out = run(args)
    out |= {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "note": "shared 2-core CPU, loaded by other jobs while measuring",
    }
    for name, row in out["rows"].items():
        shown = {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "runs"
        }
        print(f"{name}: {shown}")
    target = HERE / "results" / f"{out['date']}-fewer-evaluations-{args.what}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
