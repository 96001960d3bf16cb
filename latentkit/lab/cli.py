"""The ``latentkit-lab`` command: ``latentkit-lab eval`` (sampler quality on a shapes model)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentkit-lab", description="latentkit's lab: the shapes model's evaluation."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="measure prompt adherence of samplers on a shapes model")
    ev.add_argument(
        "--model", default="latentkit/shapes", help="default: the built-in shapes model"
    )
    ev.add_argument("--single", type=int, default=24, help="single-shape held-out prompts")
    ev.add_argument("--two", type=int, default=72, help="two-shape held-out prompts")
    ev.add_argument("--steps", default="5,10,20,50", help="DDIM and DPM-Solver++ step counts")
    ev.add_argument("--guidance", default="1,3,7.5", help="guidance scales")
    ev.add_argument("--ddpm-steps", type=int, default=1000, help="DDPM steps (0 skips DDPM)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch", type=int, default=16, help="prompts generated together")
    ev.add_argument(
        "--schedulers", default="ddim,dpm-solver++", help="schedulers run at each step count"
    )
    ev.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a generate() keyword for every run, VALUE a Python literal "
        "(e.g. feature_cache=3, 'guidance_interval=(0.28, 5.42)'); repeatable",
    )
    ev.add_argument("--vae", help="load_pipeline's vae=: another autoencoder (e.g. a TAESD folder)")
    ev.add_argument(
        "--backend",
        choices=["torch", "openvino"],
        default="torch",
        help="Performance(backend=...): who runs the UNet and the decoder",
    )
    ev.add_argument("--autocast", choices=["bf16", "fp16"], help="Performance(autocast=...)")
    ev.add_argument(
        "--quantize", choices=["int8"], help="Performance(quantize=...): needs --backend openvino"
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the lab's command line; returns the exit status."""
    args = _parser().parse_args(argv)
    from latentkit.errors import LatentkitError

    try:
        return _evaluate(args)  # "eval" is the only command
    except LatentkitError as e:
        print(f"latentkit-lab: error: {e}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    from latentkit.api import load_pipeline
    from latentkit.errors import InvalidArgumentError
    from latentkit.lab import evaluation
    from latentkit.lab.shapes import held_out_prompts
    from latentkit.performance import Performance

    try:
        steps = [int(n) for n in args.steps.split(",") if n]
        guidance = [float(g) for g in args.guidance.split(",") if g]
    except ValueError as e:
        raise InvalidArgumentError(
            f"--steps and --guidance take comma-separated numbers ({e})"
        ) from e
    if args.batch < 1:
        raise InvalidArgumentError(f"--batch must be at least 1, got {args.batch}")
    options = _options(args.option)
    prompts = held_out_prompts(args.seed, n_single=args.single, n_two=args.two)
    runs = evaluation.default_runs(
        steps=steps,
        guidance=guidance,
        ddpm_steps=args.ddpm_steps,
        schedulers=[s for s in args.schedulers.split(",") if s],
    )
    performance = Performance(backend=args.backend, autocast=args.autocast, quantize=args.quantize)
    pipe = load_pipeline(
        args.model,
        device=args.device,
        progress=not args.quiet,
        vae=args.vae,
        performance=performance,
    )
    reports = evaluation.sampler_grid(
        pipe,
        prompts,
        runs,
        seed=args.seed,
        batch=args.batch,
        progress=not args.quiet,
        options=options,
    )
    print(evaluation.format_table(reports))
    return 0


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags as generate keywords (the values Python literals)."""
    import ast

    from latentkit.errors import InvalidArgumentError
    from latentkit.request import Request

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        try:
            if not sep:
                raise ValueError("no '='")
            options[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError) as e:
            raise InvalidArgumentError(
                f"--option takes KEY=VALUE with VALUE a Python literal, got {pair!r} ({e})"
            ) from e
    Request.create("a red circle", **options)  # unknown keywords and bad values: now
    return options


if __name__ == "__main__":
    sys.exit(main())
