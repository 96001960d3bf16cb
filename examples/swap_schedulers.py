"""The same seed through four schedulers, with the model loaded once.

A scheduler given by name takes over the fields of the model's own scheduler config (beta
schedule, prediction type, ...), as diffusers' ``from_config`` does. A scheduler object is
used as it is, so build it from ``pipe.scheduler_config`` when it should match the model.

    python examples/swap_schedulers.py --steps 25
"""

from __future__ import annotations

import argparse
from pathlib import Path

import latentkit


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare schedulers on one seed.")
    parser.add_argument("prompt", nargs="?", default="a lighthouse on a cliff at sunset")
    parser.add_argument(
        "--model",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="Hub repo id or local diffusers folder",
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--size", type=int, default=None, help="width and height in pixels (default: the model's)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()

    pipe = latentkit.load_pipeline(args.model, device=args.device)
    choices: dict[str, str | latentkit.Scheduler | None] = {
        "default": None,  # the model's own scheduler (PNDM for SD 1.5)
        "ddim": "ddim",
        "dpm-solver++": "dpm-solver++",
        # An object with options: DDIM with eta=0.5 adds fresh noise at every step.
        # (pipe.with_scheduler("ddim", eta=0.5) returns a pipeline that uses the same.)
        "ddim-eta0.5": latentkit.schedulers.create("ddim", config=pipe.scheduler_config, eta=0.5),
    }
    for label, scheduler in choices.items():
        result = pipe.generate(
            args.prompt,
            scheduler=scheduler,
            steps=args.steps,
            seed=args.seed,
            height=args.size,
            width=args.size,
        )
        [path] = result.save(args.output / f"scheduler-{label}.png", overwrite=True)
        print(f"{result.parameters[0].scheduler:<14} {path}")


if __name__ == "__main__":
    main()
