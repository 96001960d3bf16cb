"""The ``latentkit`` command: ``latentkit generate "prompt" -o out.png``, ``latentkit upscale
in.png -o out.png`` and ``latentkit schedulers``.

The shapes model's evaluation is the lab's command (``latentkit-lab eval``), not the SDK's."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latentkit.results import GenerationParameters


_PERFORMANCE_FLAGS = {
    'backend="openvino"': "--backend openvino",
    'quantize="int8"': "--quantize int8",
    "compile=True": "--compile",
    "cuda_graphs=True": "--cuda-graphs",
    "cpu_offload=True": "--offload",
    "dtype='fp32'": "--dtype fp32",
    "autocast='bf16'": "--autocast bf16",
}
"""Python spellings in `Performance` / `load_pipeline` messages, and the flags that say them."""


def _as_flags(message: str) -> str:
    for python, flag in _PERFORMANCE_FLAGS.items():
        message = message.replace(python, flag)
    return message


def _parser() -> argparse.ArgumentParser:
    from latentkit import __version__
    from latentkit.api import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="latentkit", description="Latent diffusion image generation."
    )
    parser.add_argument("--version", action="version", version=f"latentkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (or -p/--prompt)")
    gen.add_argument("-p", "--prompt", dest="prompt_flag", default=None, help="the prompt")
    gen.add_argument(
        "--params-from",
        type=Path,
        default=None,
        metavar="PNG",
        help="take the prompt, seed, sampler, steps, size, ... from a PNG's A1111 parameters "
        "(latentkit's or A1111's); other flags given override them",
    )
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="PNG path (default out.png); several images get -N suffixes",
    )
    gen.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub repo id or local diffusers folder (default {DEFAULT_MODEL})",
    )
    gen.add_argument(
        "--scheduler",
        default=None,
        help="scheduler name (see `latentkit schedulers`); default: the model's own",
    )
    gen.add_argument(
        "--steps", type=int, default=None, help="default: the model's recommendation, else 50"
    )
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the model's recommendation, else 7.5)",
    )
    gen.add_argument(
        "-s",
        "--seed",
        type=int,
        default=None,
        help="random seed (default: a fresh one, written into the PNG)",
    )
    gen.add_argument("-W", "--width", type=int, default=None)
    gen.add_argument("-H", "--height", type=int, default=None)
    gen.add_argument("--negative-prompt", "--negative", dest="negative", default=None)
    gen.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt")
    gen.add_argument("--negative-prompt-2", default=None, help="SDXL: its negative prompt")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="add a LoRA (file, folder or Hub repo) at SCALE (default 1); repeatable",
    )
    gen.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH[:TOKEN]",
        help="add a textual-inversion embedding under TOKEN (default: its own); repeatable",
    )
    gen.add_argument(
        "--vae", default=None, help="swap the autoencoder (folder, Hub repo or single file)"
    )
    gen.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction", "sample"],
        default=None,
        help="what a single-file checkpoint predicts, where its tensors cannot tell (SD 2.x)",
    )
    gen.add_argument(
        "--allow-pickle", action="store_true", help="read pickle (.ckpt/.bin) files you trust"
    )
    gen.add_argument(
        "--image", type=Path, default=None, help="start from this image (image-to-image)"
    )
    gen.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="inpaint: white = repaint, black = keep (needs --image)",
    )
    gen.add_argument(
        "--strength",
        type=float,
        default=None,
        help="share of the schedule to run with --image, in [0, 1]",
    )
    gen.add_argument(
        "--clip-skip", type=int, default=None, help="use the text encoder's layer N before the last"
    )
    gen.add_argument(
        "--depth", type=Path, default=None, help="depth map image (depth-to-image models)"
    )
    gen.add_argument(
        "--outpaint",
        type=_margins,
        default=None,
        metavar="L,T,R,B",
        help="extend --image by these pixels left, top, right, bottom (multiples of 8) and "
        "generate the new area",
    )
    control = gen.add_argument_group("ControlNet (see docs/controlnet.md)")
    control.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="SOURCE",
        help="ControlNet Hub repo or folder; repeat for several",
    )
    control.add_argument(
        "--control-image",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="control image, one per --controlnet, in the same order",
    )
    for flag, text in (
        (
            "--control-scale",
            "how strongly the ControlNets steer (default: 1; with --image 0.8; with --mask 0.5, "
            "SDXL 1)",
        ),
        ("--control-start", "fraction of the steps before which they are off (default 0)"),
        ("--control-end", "fraction of the steps after which they are off (default 1)"),
    ):
        control.add_argument(
            flag,
            type=float,
            action="append",
            default=None,
            help=text + "; once for all or once per --controlnet",
        )
    control.add_argument(
        "--guess-mode",
        action="store_true",
        help="the ControlNets steer only the prompt's branch of guidance",
    )
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    gen.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); on a shared machine use the cores that "
        "are free: oversubscribed OpenMP threads spin",
    )
    speed = gen.add_argument_group("speed and memory (see docs/performance.md)")
    speed.add_argument(
        "--autocast",
        choices=["bf16", "fp16"],
        default=None,
        help="matmuls and convolutions in this precision (bf16: fast CPU mode)",
    )
    # Options whose default (None) is chosen per device; --no-X turns one off everywhere.
    for flag, text in (
        (
            "--channels-last",
            "NHWC memory layout for every network (default: the autoencoder on a CPU)",
        ),
        ("--conv-gemm", "convolve maps of at most 8x8 pixels as one GEMM (default: on a CPU)"),
        (
            "--upsample-phases",
            "upsample-then-convolve as four small convolutions (default: on a CPU)",
        ),
        ("--fuse-qkv", "fused attention projections (default: on CUDA only)"),
    ):
        speed.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    speed.add_argument("--attention", choices=["sdpa", "math"], default="sdpa")
    speed.add_argument(
        "--attention-slice",
        type=int,
        default=None,
        metavar="N",
        help="attention slicing: N (batch x head) slices at a time",
    )
    speed.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    speed.add_argument(
        "--backend",
        choices=["torch", "openvino"],
        default="torch",
        help="what runs the UNet and the decoder (openvino: CPU, converted once per size)",
    )
    speed.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="the UNet in 8 bits: int8 convolutions, 8-bit matrix weights (--backend openvino)",
    )
    speed.add_argument("--cuda-graphs", action="store_true", help="replay the UNet as CUDA graphs")
    speed.add_argument("--tile-vae", action="store_true", help="decode large images in tiles")
    speed.add_argument(
        "--offload",
        action="store_true",
        help="keep networks in CPU memory, move each to the GPU while it runs",
    )
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sub.add_parser(
        "schedulers", help="list the registered schedulers, each with its A1111 sampler labels"
    )
    _batch_parser(sub)
    _upscale_parser(sub)
    return parser


def _margins(text: str) -> tuple[int, int, int, int]:
    """``--outpaint L,T,R,B``: four non-negative ints (their multiples are the model's check)."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected four non-negative ints LEFT,TOP,RIGHT,BOTTOM such as 0,0,256,0; got {text!r}"
        )
    left, top, right, bottom = (int(p) for p in parts)
    return left, top, right, bottom


UPSCALE_MODEL = "stabilityai/stable-diffusion-x4-upscaler"


def _upscale_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser(
        "upscale",
        help="upscale an image 4x with the x4 upscaler",
        description="Upscale IN 4x (Stable Diffusion x4 upscaler, or another model of its "
        "family), guided by an optional prompt; the PNG carries the parameters.",
    )
    up.add_argument("input", type=Path, metavar="IN", help="the picture to upscale")
    up.add_argument(
        "-o", "--output", type=Path, default=None, help="PNG path (default: IN's name + -x4.png)"
    )
    up.add_argument(
        "--model", default=UPSCALE_MODEL, help=f"Hub repo id or local folder ({UPSCALE_MODEL})"
    )
    up.add_argument("--prompt", default="", help="what the picture shows (optional guidance)")
    up.add_argument("--negative", default=None, help="negative prompt")
    up.add_argument(
        "--noise-level",
        type=int,
        default=20,
        help="noise added to IN before upscaling, 0-350 (more: more invented detail)",
    )
    up.add_argument("--steps", type=int, default=None, help="default: the model's, else 75")
    up.add_argument("--guidance", type=float, default=None, help="default: 9")
    up.add_argument("--scheduler", default=None, help="default: the model's own")
    up.add_argument("--seed", type=int, default=None, help="default: a fresh one")
    up.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="PX",
        help="upscale in overlapping tiles of PX output pixels (UNet and autoencoder), so "
        "large inputs fit in memory; e.g. 512",
    )
    up.add_argument("--device", default="auto")
    up.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    up.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _upscale(args: argparse.Namespace) -> int:
    from latentkit import images
    from latentkit.api import load_pipeline
    from latentkit.errors import InvalidArgumentError
    from latentkit.models.autoencoder import Tiling
    from latentkit.performance import Performance
    from latentkit.results import output_paths

    output: Path = args.output or Path(f"{args.input.stem}-x4.png")
    if output.suffix.lower() != ".png":
        raise InvalidArgumentError(f"output must be a .png file, got {output}")
    output_paths(output, 1, overwrite=args.overwrite)  # fail before loading
    picture = images.open_image(args.input, "IN")
    tiling = None if args.tile is None else Tiling(tile_size=args.tile)
    performance = Performance(vae_tiling=tiling or False, unet_tiling=tiling or False)
    pipe = load_pipeline(
        args.model,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
        performance=performance,
    )
    result = pipe.generate(
        args.prompt,
        image=picture,
        negative_prompt=args.negative,
        noise_level=args.noise_level,
        steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        progress=not args.quiet,
    )
    for path in result.save(output, overwrite=args.overwrite):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    from latentkit.errors import LatentkitError

    try:
        if args.command == "schedulers":
            from latentkit import schedulers

            # One registration per line, name first, then its A1111 labels (comma-separated).
            listed = schedulers.names()
            width = max(map(len, listed), default=0) + 2
            for name in listed:
                print(f"{name:<{width}}{', '.join(schedulers.aliases(name))}".rstrip())
            return 0
        if args.command == "batch":
            return _batch(args)
        if args.command == "upscale":
            return _upscale(args)
        return _generate(args)
    except LatentkitError as e:
        print(f"latentkit: error: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    from latentkit import images
    from latentkit.api import load_pipeline
    from latentkit.errors import InvalidArgumentError, OutputExistsError
    from latentkit.performance import Performance
    from latentkit.results import output_paths

    output: Path = args.output
    if args.prompt is not None and args.prompt_flag is not None:
        raise InvalidArgumentError("give the prompt once: positionally or with -p/--prompt")
    png = None if args.params_from is None else _params_from(args.params_from)
    options = {} if png is None else png.to_options()
    prompt = args.prompt if args.prompt is not None else args.prompt_flag
    prompt = prompt if prompt is not None else options.pop("prompt", None)
    options.pop("prompt", None)
    if prompt is None:
        raise InvalidArgumentError("no prompt: give one (or -p/--prompt, or --params-from PNG)")
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    loras = [_split(v, "--lora", float) for v in args.lora]
    embeddings = [_split(v, "--embedding", str) for v in args.embedding]
    if output.suffix.lower() != ".png":
        raise InvalidArgumentError(
            f"output must be a .png file (it carries the parameters), got {output}"
        )
    try:
        output_paths(output, args.num_images, overwrite=args.overwrite)  # fail before loading
    except OutputExistsError as e:
        # The message a Python caller reads names overwrite=True; here the flag is the way.
        raise OutputExistsError(str(e).replace("overwrite=True", "--overwrite"), path=e.path) from e
    if args.mask is not None and args.image is None:
        raise InvalidArgumentError("--mask needs --image (the picture to inpaint)")
    if args.outpaint is not None and args.image is None:
        raise InvalidArgumentError("--outpaint needs --image (the picture to extend)")
    if png is not None:
        _check_png_inputs(args.params_from, png, args)
    # Read the inputs now: an unreadable file fails before the model loads.
    opened = {
        what: None if path is None else images.open_image(path, what)
        for what, path in (("--image", args.image), ("--mask", args.mask), ("--depth", args.depth))
    }
    control = _control_options(args)
    try:
        performance = Performance(
            autocast=args.autocast,
            channels_last=args.channels_last,
            fuse_qkv=args.fuse_qkv,
            conv_gemm=args.conv_gemm,
            upsample_phases=args.upsample_phases,
            attention=args.attention,
            attention_slice_size=args.attention_slice,
            compile=args.compile,
            backend=args.backend,
            quantize=args.quantize,
            cuda_graphs=args.cuda_graphs,
            vae_tiling=args.tile_vae,
            cpu_offload=args.offload,
        )
        pipe = load_pipeline(
            args.model,
            device=args.device,
            dtype=args.dtype,
            progress=not args.quiet,
            performance=performance,
            vae=args.vae,
            prediction_type=args.prediction_type,
            allow_pickle=args.allow_pickle,
        )
    except InvalidArgumentError as e:
        # Performance and load_pipeline name their Python keywords; here the flags are the way.
        if _as_flags(str(e)) == str(e):
            raise
        raise InvalidArgumentError(_as_flags(str(e))) from e
    for source, scale in loras:
        pipe = pipe.with_lora(
            source, scale=1.0 if scale is None else scale, allow_pickle=args.allow_pickle
        )
    for source, token in embeddings:
        pipe = pipe.with_embedding(source, token=token, allow_pickle=args.allow_pickle)
    for source in args.controlnet:
        pipe = pipe.with_controlnet(source, progress=not args.quiet)
    given: dict[str, Any] = {
        "negative_prompt": args.negative,
        "prompt_2": args.prompt_2,
        "negative_prompt_2": args.negative_prompt_2,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "clip_skip": args.clip_skip,
        "image": opened["--image"],
        "mask_image": opened["--mask"],
        "strength": args.strength,
        "depth_map": opened["--depth"],
        "outpaint": args.outpaint,
    }
    # Flags given win over the PNG's parameters.
    options.update({k: v for k, v in given.items() if v is not None})
    options.update(control)
    result = pipe.generate(prompt, **options, num_images=args.num_images, progress=not args.quiet)
    for path in result.save(output, overwrite=args.overwrite):
        print(path)
    return 0


def _split(value: str, flag: str, kind: type[Any]) -> tuple[str, Any]:
    """``PATH[:X]`` → (PATH, X or None); a colon in a Windows drive or a path stays in it."""
    from latentkit.errors import InvalidArgumentError

    path, sep, tail = value.rpartition(":")
    if not sep or not path or "/" in tail or "\\" in tail or Path(value).exists():
        return value, None
    try:
        return path, kind(tail)
    except ValueError as e:
        raise InvalidArgumentError(f"{flag} {value!r}: {tail!r} is not a valid value") from e


def _params_from(path: Path) -> GenerationParameters:
    """A PNG's A1111 parameters (``to_options`` gives the ``generate`` keywords)."""
    from latentkit.results import GenerationParameters

    return GenerationParameters.from_png(path)


def _check_png_inputs(path: Path, png: GenerationParameters, args: argparse.Namespace) -> None:
    """Refuse, before any model loads, to regenerate a PNG without the pictures and
    ControlNets it was made with (no PNG carries them): its image for image-to-image,
    inpainting, outpainting and upscaling, its mask, and as many ControlNets as it names."""
    from latentkit.errors import InvalidArgumentError

    extras = dict(png.extras)
    needed = png.input_images
    if "image" in needed and args.image is None:
        fields = ("Outpaint", "Noise level", "Denoising start", "Mask blur")
        why = next((f"{f}: {extras[f]}" for f in fields if f in extras), None)
        why = why or f"Denoising strength: {png.strength}"
        raise InvalidArgumentError(
            f"{path} was made from an input picture ({why}); give that picture with --image "
            "(a PNG cannot carry its input pictures)"
        )
    if "mask_image" in needed and args.mask is None:
        raise InvalidArgumentError(
            f"{path} was inpainted (Mask blur); give its mask with --mask (a PNG cannot carry "
            "its input pictures)"
        )
    units = png.controlnets()
    if units and len(args.controlnet) != len(units):
        names = ", ".join(u.get("Model", "?") for u in units)
        raise InvalidArgumentError(
            f"{path} was made with {len(units)} ControlNet(s) ({names}) but "
            f"{len(args.controlnet)} --controlnet given: attach the same ones with --controlnet "
            "and give each its control image with --control-image, in the same order (a PNG "
            "cannot carry its control images)"
        )


def _control_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ControlNet keywords of ``generate`` from the flags, the control images read now
    (an unreadable file or a wrong count fails before any model loads)."""
    from latentkit import images
    from latentkit.errors import InvalidArgumentError

    nets, paths = len(args.controlnet), args.control_image
    if nets == 0:
        flags = ("control_image", "control_scale", "control_start", "control_end")
        used = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f)]
        if args.guess_mode:
            used.append("--guess-mode")
        if used:
            raise InvalidArgumentError(f"{', '.join(used)} need(s) --controlnet")
        return {}
    if len(paths) != nets:
        raise InvalidArgumentError(
            f"got {len(paths)} --control-image for {nets} --controlnet; give one each"
        )
    opened = [images.open_image(path, "--control-image") for path in paths]
    options: dict[str, Any] = {"control_image": opened[0] if nets == 1 else opened}
    for name in ("control_scale", "control_start", "control_end"):
        values = getattr(args, name)
        if values is None:
            continue
        if len(values) not in (1, nets):
            raise InvalidArgumentError(
                f"--{name.replace('_', '-')} given {len(values)} times for {nets} --controlnet; "
                "give it once or once per --controlnet"
            )
        options[name] = values[0] if len(values) == 1 else values
    if args.guess_mode:
        options["guess_mode"] = True
    return options


def _batch_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batch = sub.add_parser(
        "batch",
        help="generate every row of a jobs file (JSON Lines or CSV); rerun to resume",
        description="Generate every row of a jobs file into OUTDIR (<id>.png and "
        "manifest.jsonl); rows already done there are skipped. Exit status 1 if a row failed.",
    )
    batch.add_argument(
        "jobs", type=Path, metavar="JOBS", help="JSON Lines file (or CSV with a prompt column)"
    )
    batch.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUTDIR", help="output folder"
    )
    batch.add_argument("--model", default=None, help="model of rows that name none")
    batch.add_argument("--engine", choices=["local", "ray"], default="local")
    batch.add_argument("--workers", type=int, default=None, help="Ray actors")
    batch.add_argument(
        "--ray-address", default=None, help="Ray cluster to join ('auto'); default: a local one"
    )
    batch.add_argument(
        "--seed", type=int, default=0, help="run seed: rows without a seed derive theirs from it"
    )
    batch.add_argument(
        "--batch-size", type=int, default=1, help="rows sharing settings per generate call"
    )
    batch.add_argument("--max-retries", type=int, default=3, help="Ray: reruns of a dead row")
    batch.add_argument("--cpus-per-worker", type=int, default=1, help="Ray: CPUs of a CPU actor")
    batch.add_argument("--device", default="auto")
    batch.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _batch(args: argparse.Namespace) -> int:
    import os

    if args.engine == "ray" and args.ray_address is None and "ray" not in sys.modules:
        # The one-node cluster this command starts listens on loopback only (read by Ray
        # when it is imported); a cluster joined with --ray-address is left as it is.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from latentkit import batch

    summary = batch.run(
        args.jobs,
        output_dir=args.output,
        model=args.model,
        engine=args.engine,
        workers=args.workers,
        ray_address=args.ray_address,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_retries=args.max_retries,
        cpus_per_worker=args.cpus_per_worker,
        progress=not args.quiet,
    )
    print(
        f"done {summary.done}, skipped {summary.skipped}, failed {summary.failed} "
        f"({summary.images} images in {summary.seconds:.1f} s); manifest: {summary.manifest}"
    )
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
