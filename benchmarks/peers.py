"""Peer engines for compare.py: OpenVINO (optimum-intel) and ONNX Runtime (optimum-onnx).

This module runs only in the peer virtual environment (benchmarks/.venv-peers, made by
benchmarks/setup_peers.sh): optimum-intel, optimum-onnx and the transformers 4.x / diffusers
versions they accept conflict with latentkit's environment (transformers 5). compare.py, in
latentkit's environment, starts it in fresh processes with ``--peer-python``:

    python benchmarks/peers.py export --engine openvino --precision fp32 SOURCE OUT
    (measurements: compare.py's bootstrap imports this module and calls `measure`)

It never imports latentkit. The measuring protocol is compare.py's own (`compare.measure_generation`):
same prompt, seed, steps, guidance and DPM-Solver++ config, warm-up call, then a timed call
whose per-step callbacks give the step time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# compare.py imports nothing but the standard library at module level, so it loads here too.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare

# OpenVINO CPU plugin precision per compare.py dtype. "f32" must be asked for: on CPUs with
# AVX-512 BF16 or AMX the plugin's default is bf16. int8 is int8 *weights* (NNCF weight
# compression, decompressed in the kernels) with f32 activations, so it differs from fp32 by
# the weight compression only; int8bf16 the same weights with bf16 activations, what the
# plugin does by itself on this CPU. bf16 runs the fp32 IR (compare.peer_export_precision): the
# plugin converts the weights while compiling.
OV_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int8bf16": "bf16"}


def _tokenizer(folder: Path) -> Any:
    """The pipeline's CLIP tokenizer, read from ``tokenizer.json``.

    The random-weight folders are written by transformers 5, which saves only
    ``tokenizer.json``; transformers 4's slow ``CLIPTokenizer`` (what model_index.json names)
    needs ``vocab.json``/``merges.txt``. The fast tokenizer reads the same BPE model, and it
    is passed explicitly wherever a pipeline is loaded.
    """
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast.from_pretrained(str(folder / "tokenizer"))


def _text_encoder(folder: Path) -> Any:
    """The CLIP text encoder with the folder's weights, loaded strictly.

    transformers 5 writes ``CLIPTextModel``'s keys without the ``text_model.`` prefix that
    transformers 4 (and the published SD 1.5 files) use; transformers 4's ``from_pretrained``
    would then leave the whole encoder at its random initialisation with only a warning.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder)))
    state = load_file(str(folder / "model.safetensors"))
    prefix = "text_model."
    state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    # strict: a missing or unknown key is an error, not a silently random weight.
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def _source_pipeline(source: Path) -> Any:
    """The diffusers pipeline of the random-weight folder, fp32, for exporting.

    Built from its components: ``from_pretrained`` would refuse the fast tokenizer in place
    of the slow class that model_index.json names (see `_tokenizer`).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    fp32 = {"torch_dtype": torch.float32}
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(source), subfolder="vae", **fp32),
        text_encoder=_text_encoder(source / "text_encoder"),
        tokenizer=_tokenizer(source),
        unet=UNet2DConditionModel.from_pretrained(str(source), subfolder="unet", **fp32),
        scheduler=PNDMScheduler.from_pretrained(str(source), subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export(*, engine: str, precision: str, source: Path, out: Path) -> None:
    """Write the ``engine``'s model for ``precision`` to ``out`` (via ``out.partial``).

    - openvino fp32: optimum-intel's ``export_from_model`` with ``OVConfig(dtype="fp32")``:
      fp32 IR, and no size-based default compression (optimum-intel compresses models of
      more than 1e9 parameters to int8 unless told otherwise; SD 1.5's UNet has 0.86e9).
    - openvino int8: the fp32 IR loaded with ``OVWeightQuantizationConfig(bits=8)``, which is
      what ``load_in_8bit=True`` does: NNCF weight compression INT8_ASYM (per output channel)
      of every model of the pipeline (UNet, text encoder, VAE encoder and decoder).
    - onnxruntime fp32: optimum-onnx's ``onnx_export_from_model`` (external data for the
      UNet's >2 GiB of weights), without its validation run.
    """
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    if engine == "openvino" and precision == "fp32":
        from optimum.exporters.openvino.convert import export_from_model
        from optimum.intel import OVConfig

        export_from_model(
            _source_pipeline(source),
            output=str(partial),
            task="text-to-image",
            ov_config=OVConfig(dtype="fp32"),
        )
    elif engine == "openvino" and precision == "int8":
        from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

        fp32 = out.with_name(out.name.replace("-int8", "-fp32"))
        pipe = OVStableDiffusionPipeline.from_pretrained(
            str(fp32),
            tokenizer=_tokenizer(fp32),
            compile=False,
            quantization_config=OVWeightQuantizationConfig(bits=8),
        )
        pipe.save_pretrained(str(partial))
    elif engine == "onnxruntime" and precision == "fp32":
        from optimum.exporters.onnx import onnx_export_from_model

        onnx_export_from_model(
            _source_pipeline(source),
            output=str(partial),
            task="text-to-image",
            do_validation=False,
        )
    else:
        raise SystemExit(f"no {engine} export for {precision}")
    info = {
        "engine": engine,
        "precision": precision,
        "source": str(source),
        "export_s": time.perf_counter() - start,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions(),
    }
    (partial / "latentkit_benchmark_export.json").write_text(json.dumps(info, indent=2))
    partial.rename(out)


def versions() -> dict[str, str]:
    """Versions of everything in the peer environment that shapes the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "optimum",
        "optimum-intel",
        "optimum-onnx",
        "openvino",
        "nncf",
        "onnxruntime",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def measure(spec: dict[str, Any]) -> None:
    """Load the exported model (static shapes for OpenVINO), time generation, save the image."""
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    engine, precision = spec["engine"], spec["precision"]
    model_dir = Path(spec["peer_model_dir"])
    # The same number of threads as torch uses in latentkit's and diffusers' workers (its
    # default, or OMP_NUM_THREADS): the peers' runtimes have their own thread pools.
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"import_s": spec["import_s"], "threads": threads}

    start = time.perf_counter()
    if engine == "openvino":
        from optimum.intel import OVStableDiffusionPipeline

        ov_config = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION_HINT[precision],
            "INFERENCE_NUM_THREADS": str(threads),
        }
        pipe = OVStableDiffusionPipeline.from_pretrained(
            str(model_dir), tokenizer=_tokenizer(model_dir), compile=False, ov_config=ov_config
        )
        # Static shapes (batch 1, so the UNet's batch is 2 with guidance) let the CPU plugin
        # plan every buffer and pick kernels for the exact sizes.
        pipe.reshape(batch_size=1, height=spec["size"], width=spec["size"], num_images_per_prompt=1)
        pipe.compile()
        out["ov_config"] = ov_config
    elif engine == "onnxruntime":
        import onnxruntime
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        pipe = ORTStableDiffusionPipeline.from_pretrained(
            str(model_dir),
            tokenizer=_tokenizer(model_dir),
            provider="CPUExecutionProvider",
            session_options=options,
        )
    else:
        raise SystemExit(f"unknown peer engine {engine!r}")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out["load_s"] = time.perf_counter() - start

    ticks: list[float] = []

    def on_step_end(pipeline: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        ticks.append(time.perf_counter())
        return kwargs

    def generate() -> Any:
        return pipe(
            spec["prompt"],
            num_inference_steps=spec["steps"],
            guidance_scale=compare.GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(spec["seed"]),
            height=spec["size"],
            width=spec["size"],
            output_type="np",
            callback_on_step_end=on_step_end,
        ).images[0]

    compare.measure_generation(spec, out, generate, ticks, sync=lambda: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="peer-engine exports for compare.py")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="export the random-weight folder for one engine")
    exp.add_argument("--engine", choices=("openvino", "onnxruntime"), required=True)
    exp.add_argument("--precision", choices=("fp32", "int8"), required=True)
    exp.add_argument("source", type=Path)
    exp.add_argument("out", type=Path)
    sub.add_parser("versions", help="print the peer environment's versions as JSON")
    args = parser.parse_args(argv)
    if args.command == "versions":
        print(json.dumps(versions()))
    else:
        export(engine=args.engine, precision=args.precision, source=args.source, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
