"""latentkit vs diffusers, side by side, on identical weight files.

    python benchmarks/compare.py                           # SD 1.5 architecture, CPU settings
    python benchmarks/compare.py --settings cuda-fp16-512  # on a GPU machine
    python benchmarks/compare.py --arch tiny --settings cpu-fp32-256 --steps 2 --repeats 1
    python benchmarks/compare.py --arch sdxl                # SDXL base: 512² and 1024², 3 steps
    python benchmarks/compare.py --arch sdxl-tiny --settings cpu-fp32-256 --steps 2 --repeats 1
    # with the peer engines (benchmarks/setup_peers.sh once): OpenVINO and ONNX Runtime
    python benchmarks/compare.py --engines latentkit,diffusers,openvino,onnxruntime \
        --settings cpu-fp32-256,cpu-bf16-512,cpu-int8-256

Every measurement runs in a fresh Python process, the engines alternate (latentkit,
diffusers, [openvino, onnxruntime,] latentkit, ...) and the medians over ``--repeats`` rounds
are reported. See benchmarks/README.md for the protocol and how to read the table.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import itertools
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Keyword arguments for `latentkit.load_pipeline`, per device type ("cpu", "cuda"), e.g.
# {"performance": latentkit.Performance(...)}. Measuring workers import this module only
# after they have timed `import latentkit`, so referring to latentkit here does not skew the
# import time (but a top-level `import latentkit` would then also load it into the diffusers
# workers, adding a few MiB to their RSS: prefer `import latentkit` right above the dict).
# `--latentkit-option key=value` adds to every device's dict for one run.
LATENTKIT_OPTIONS: dict[str, dict[str, Any]] = {"cpu": {}, "cuda": {}}
# The load_pipeline keywords that make latentkit run int8 weights on `*-int8-*` settings (it
# loads float32 and these options do the rest), e.g.
# {"performance": latentkit.Performance(backend="openvino", quantize="int8")}. None: not
# wired up, and int8 settings skip latentkit with a line saying so (diffusers still runs its
# fp32 baseline, OpenVINO its int8 weights).
LATENTKIT_INT8_OPTIONS: dict[str, Any] | None = None
# --latentkit-backend: "torch" (default) or "openvino" (Performance(backend="openvino"), with
# autocast="bf16" on bf16 settings and quantize="int8" on int8 ones; float32 weights).
LATENTKIT_BACKEND = "torch"

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Engines, in the order each round runs them. The peers run in their own virtual
# environment (--peer-python; benchmarks/setup_peers.sh) through benchmarks/peers.py.
ENGINES = ("latentkit", "diffusers", "openvino", "onnxruntime")
PEER_ENGINES = ("openvino", "onnxruntime")
DEFAULT_ENGINES = ("latentkit", "diffusers")
# The peers' pipelines here are SD 1.x's (OVStableDiffusionPipeline, ORTStableDiffusionPipeline).
PEER_ARCHES = ("sd15", "tiny")
# Each worker times its engine's import on top of `import torch`: the statement to time.
# diffusers imports lazily: touching the folder's pipeline class loads it and transformers.
IMPORTS = {
    "latentkit": "import latentkit",
    "diffusers": "import diffusers; getattr(diffusers, spec['diffusers_class'])",
    "openvino": "from optimum.intel import OVStableDiffusionPipeline",
    "onnxruntime": "from optimum.onnxruntime import ORTStableDiffusionPipeline",
}
CPU_SETTINGS = (
    "cpu-fp32-256",
    "cpu-fp32-512",
    "cpu-bf16-512",
    "cpu-fp32-1024",
    "cpu-bf16-1024",
    "cpu-int8-256",
    "cpu-int8-512",
)
CUDA_SETTINGS = ("cuda-fp16-512", "cuda-bf16-512", "cuda-fp16-1024", "cuda-bf16-1024")
# int8 is int8 *weights*: the engines that have such a mode compute in float32 around them
# (latentkit: LATENTKIT_INT8_OPTIONS; OpenVINO: NNCF weight compression, f32 inference).
DTYPES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "int8": "float32",
    "int8bf16": "float32",
}
INT8 = ("int8", "int8bf16")
"""int8 settings: ``int8`` computes in float32 around the 8-bit weights, ``int8bf16`` in
bf16 (what OpenVINO's CPU plugin picks by itself on a CPU with AVX-512 BF16)."""
GUIDANCE = 7.5
SCHEDULER = "dpm-solver++"  # diffusers: DPMSolverMultistepScheduler, whose default is dpmsolver++
TINY_SIZE = 64  # the tiny test UNet/VAE: any multiple of 8 works, 64 keeps a run to seconds

# --arch: what it builds, and its defaults for --settings, --steps and --repeats.
ARCHES: dict[str, str] = {
    "sd15": "SD 1.5's architecture (860M UNet)",
    "sdxl": "SDXL base's architecture (2.6B UNet, CLIP ViT-L + OpenCLIP bigG), fp16 files",
    "tiny": "the test suite's tiny SD 1.x models, for smoke tests",
    "sdxl-tiny": "the test suite's tiny SDXL models, for smoke tests",
}
TINY_ARCHES = ("tiny", "sdxl-tiny")
DEFAULT_SETTINGS: dict[str, tuple[str, ...]] = {
    "sd15": ("cpu-fp32-256", "cpu-fp32-512", "cpu-bf16-512"),
    # A 1024² SDXL step (UNet batch 2) is 13.5 TFLOP, a 512² one 3.2: few steps, one round.
    "sdxl": ("cpu-fp32-512", "cpu-fp32-1024"),
}
DEFAULT_STEPS = {"sdxl": 3}  # others: 4
DEFAULT_REPEATS = {"sdxl": 1}  # others: 2

# Stable Diffusion 1.5's component configs (stable-diffusion-v1-5/stable-diffusion-v1-5).
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
# CLIP ViT-L/14's text tower; bos/eos where CLIP's vocab has <|startoftext|>/<|endoftext|>.
SD15_TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# Stable Diffusion XL base's component configs (stabilityai/stable-diffusion-xl-base-1.0),
# the keys that differ from diffusers' defaults. UNet: 2,567,463,684 parameters (see
# tests/test_sdxl_models.py, which checks this config against diffusers on the meta device).
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG), concatenated
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled bigG 1280 + 6 size/crop ids x 256
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)
# SD's VAE architecture with SDXL's latent scale; force_upcast: decode in fp32 under fp16.
SDXL_VAE: dict[str, Any] = SD15_VAE | dict(
    sample_size=1024, scaling_factor=0.13025, force_upcast=True
)
# OpenCLIP ViT-bigG/14's text tower (text_encoder_2/config.json): 694.7M parameters. The
# published bos/eos/pad (0/2/1) are kept: eos 2 makes transformers (and latentkit) pool at
# the highest token id, which is <|endoftext|> (49407) with the tokenizer written here.
SDXL_TEXT_2: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1280,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# (key, label) of the metrics in the table, in order; CUDA-only keys are skipped on the CPU.
METRICS = (
    ("export_s", "export (s, once, cached; not in load)"),
    ("import_s", "import (s, on top of torch)"),
    ("load_s", "load (s)"),
    # Lazy imports move work between the two (latentkit loads transformers in load_pipeline,
    # diffusers at import): the sum is the fair time-to-ready.
    ("import_load_s", "import + load (s)"),
    ("load_rss_mib", "peak RSS after load (MiB)"),
    ("load_rss_over_weights", "peak RSS after load / weights size"),
    ("step_s", "s / step (CFG, UNet batch 2)"),
    ("e2e_s", "end-to-end s / image"),
    ("peak_rss_mib", "peak RSS at end (MiB)"),
    ("cuda_load_alloc_mib", "CUDA max allocated after load (MiB)"),
    ("cuda_peak_alloc_mib", "CUDA max allocated at end (MiB)"),
)


# --------------------------------------------------------------------------------------------
# Writing the random-weight pipelines (diffusers' own classes and save_pretrained).
# --------------------------------------------------------------------------------------------


def _tiny_models() -> Any:
    # The test suite's tiny-model helpers live in tests/, which is not a package.
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models

    return tiny_models


def _write_clip_tokenizer(
    folder: Path, vocab_size: int = 49408, *, pad_token: str = "<|endoftext|>"
) -> None:
    """A CLIP BPE tokenizer with exactly ViT-L/14's vocab size, written offline.

    The real vocab cannot be downloaded here; what matters for the benchmark is that the
    token embedding has 49408 rows and the special tokens sit where CLIP has them (49406,
    49407). The byte alphabet tokenizes any prompt; dummy entries fill the rest. SDXL's
    second tokenizer pads with ``"!"`` (id 0 here as in CLIP's vocab), not ``<|endoftext|>``.
    """
    from transformers import CLIPTokenizer

    chars = list(_tiny_models()._bytes_to_unicode().values())
    merges = [("a", "t</w>"), ("c", "at</w>"), ("p", "h"), ("o", "t"), ("ph", "ot")]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += [f"<|dummy{i}|>" for i in range(vocab_size - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == vocab_size
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)
    tok.save_pretrained(str(folder))


def _build_sd15() -> Any:
    """Stable Diffusion 1.5's architecture (UNet 860M, VAE, CLIP ViT-L/14 text) with random weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.schedulers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(_tiny_models().SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> Any:
    """SDXL base's architecture with random weights, stored in float16.

    fp16 files, because that is how SDXL is mostly downloaded and run (the base repository's
    ``fp16`` variant), and because it halves the ~14 GB of fp32 files (and the memory needed
    to write them). Both libraries read the same bytes and convert them to the setting's dtype
    at load time, so the images still compare exactly; the cost is that load time includes
    that conversion and that RSS / weights size is about 2 for fp32 settings, 1 for bf16.
    Each model is halved as soon as it is built, so the peak while writing is the fp32 UNet
    (10.3 GB) rather than all of them.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer(Path(tmp) / "1")
        _write_clip_tokenizer(Path(tmp) / "2", pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / "1"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(Path(tmp) / "2"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).half()
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE).half()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).half()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)).half()
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(_tiny_models().SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_folder(arch: str, folder: str) -> None:
    """Write the ``arch`` pipeline to ``folder`` (runs in its own process; see `ensure_folder`)."""
    if arch == "sd15":
        pipe = _build_sd15()
    elif arch == "sdxl":
        pipe = _build_sdxl()
    else:
        pipe = _tiny_models().build_pipeline({"tiny": "sd1", "sdxl-tiny": "sdxl"}[arch])
    # Write next to the target and rename, so an interrupted write is never mistaken for a
    # finished folder on the next run.
    target = Path(folder)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(str(partial), safe_serialization=True)
    partial.rename(target)


def ensure_folder(arch: str, folder: Path) -> None:
    if (folder / "model_index.json").exists():
        print(f"reusing {folder}")
        return
    print(f"writing the random-weight {arch} pipeline to {folder} (once) ...", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A separate process, so the parent keeps no gigabytes of weights (nor diffusers) around.
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import {Path(__file__).stem} as m; "
        f"m.build_folder({arch!r}, {str(folder)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for ext in ("*.safetensors", "*.bin") for p in folder.rglob(ext))


# --------------------------------------------------------------------------------------------
# The measuring worker: one fresh process per (setting, engine, round).
# --------------------------------------------------------------------------------------------

# Runs as `python -c`: the engine's import must be timed before anything else is imported,
# including this module (whose LATENTKIT_OPTIONS may refer to latentkit). spec["import"] is
# the engine's IMPORTS statement; spec["module"] is this module, or peers for the peers.
_BOOTSTRAP = """
import json, sys, time
spec = json.loads(sys.argv[1])
import torch
start = time.perf_counter()
exec(spec["import"])
spec["import_s"] = time.perf_counter() - start
sys.path.insert(0, spec["benchmarks_dir"])
__import__(spec["module"]).measure(spec)
"""


def _latentkit_options(
    device: str, extra: list[str], precision: str = "", backend: str = "torch"
) -> dict[str, Any]:
    options = dict(LATENTKIT_OPTIONS.get(device, {}))
    if backend == "openvino":
        # latentkit's own networks run by OpenVINO (float32 weights; the precision is
        # OpenVINO's), converted IR kept under benchmarks/.cache so a round reuses it.
        import latentkit

        options["performance"] = latentkit.Performance(
            backend="openvino",
            autocast="bf16" if precision in ("bf16", "int8bf16") else None,
            quantize="int8" if precision in INT8 else None,
            cache_dir=str(HERE / ".cache" / "latentkit-openvino"),
        )
    elif precision in INT8:
        options.update(LATENTKIT_INT8_OPTIONS or {})
    options.update(parse_options(extra))
    return options


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--latentkit-option wants key=value, not {pair!r}")
        value = value.strip()
        if value.startswith("Performance("):
            # The one non-literal value: latentkit's options object, e.g.
            # --latentkit-option "performance=Performance(compile=True)".
            import latentkit

            options[key.strip()] = eval(value, {"Performance": latentkit.Performance})
        else:
            options[key.strip()] = ast.literal_eval(value)
    return options


def _max_rss_mib() -> float:
    import resource

    # Linux reports KiB (macOS bytes; this benchmark targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cuda_max_allocated_mib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def measure(spec: dict[str, Any]) -> None:
    """Load, time the steps and one full generation, write the metrics and the image.

    latentkit and diffusers; the peer engines have their own loading in peers.py and share
    `measure_generation`.
    """
    import torch

    device, engine = spec["device"], spec["engine"]
    dtype = getattr(torch, spec["dtype"])
    cuda = device == "cuda"

    def sync() -> None:
        # CUDA runs asynchronously: without this, timers would measure kernel launches.
        if cuda:
            torch.cuda.synchronize()

    out: dict[str, Any] = {"import_s": spec["import_s"], "threads": torch.get_num_threads()}
    ticks: list[float] = []  # perf_counter after every denoising step

    start = time.perf_counter()
    if engine == "latentkit":
        import latentkit

        backend = spec.get("latentkit_backend", "torch")
        options = _latentkit_options(device, spec["latentkit_options"], spec["precision"], backend)
        # The OpenVINO backend converts float32 weights and lowers the precision itself.
        load_dtype = "float32" if backend == "openvino" else spec["dtype"]
        pipe = latentkit.load_pipeline(
            spec["folder"], device=device, dtype=load_dtype, progress=False, **options
        )

        def on_step(step: Any) -> None:
            sync()
            ticks.append(time.perf_counter())

        def generate() -> Any:
            return pipe.generate(
                spec["prompt"],
                steps=spec["steps"],
                guidance_scale=GUIDANCE,
                seed=spec["seed"],
                height=spec["size"],
                width=spec["size"],
                progress=False,
                scheduler=SCHEDULER,
                output_type="np",
                callback=on_step,
            ).images[0]

    else:
        import diffusers
        from diffusers import DPMSolverMultistepScheduler
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        # The folder's own pipeline class (model_index.json), with no post-processing that
        # latentkit does not do either: no safety checker (SD), no watermark (SDXL).
        pipeline_class = getattr(diffusers, spec["diffusers_class"])
        extra: dict[str, Any] = (
            {"add_watermarker": False}
            if "XL" in spec["diffusers_class"]
            else {"safety_checker": None, "requires_safety_checker": False}
        )
        pipe = pipeline_class.from_pretrained(spec["folder"], torch_dtype=dtype, **extra).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

        def on_step_end(pipeline: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            sync()
            ticks.append(time.perf_counter())
            return kwargs

        def generate() -> Any:
            return pipe(
                spec["prompt"],
                num_inference_steps=spec["steps"],
                guidance_scale=GUIDANCE,
                generator=torch.Generator("cpu").manual_seed(spec["seed"]),
                height=spec["size"],
                width=spec["size"],
                output_type="np",
                callback_on_step_end=on_step_end,
            ).images[0]

    sync()
    out["load_s"] = time.perf_counter() - start
    measure_generation(spec, out, generate, ticks, sync=sync, cuda=cuda)


def measure_generation(
    spec: dict[str, Any],
    out: dict[str, Any],
    generate: Any,
    ticks: list[float],
    *,
    sync: Any,
    cuda: bool = False,
) -> None:
    """After ``out["load_s"]``: memory after load, then the warm-up and the timed generation.

    ``generate()`` returns the image (``output_type="np"``) and appends ``perf_counter()`` to
    ``ticks`` after every denoising step. Writes the metrics to ``spec["result_path"]`` and
    the image to ``spec["image_path"]``. Shared by every engine, peers.py's included.
    """
    import numpy as np

    out["import_load_s"] = out["import_s"] + out["load_s"]
    out["load_rss_mib"] = _max_rss_mib()
    # Over the source folder's weight files for every engine (the peers' exported files
    # differ: int8 ones are ~1/4), so the column compares engines on one scale.
    out["load_rss_over_weights"] = out["load_rss_mib"] * 2**20 / spec["weights_bytes"]
    if cuda:
        out["cuda_load_alloc_mib"] = _cuda_max_allocated_mib()

    # The first call is warm-up (first-use allocations, the solver's first higher-order
    # update, ...). Step times come from the timed call only: the gaps between consecutive
    # step callbacks, so its first step, which also pays for text encoding, never counts.
    for _call in ("warm-up", "timed"):  # the last iteration is the one measured
        ticks.clear()
        sync()
        start = time.perf_counter()
        image = generate()
        sync()
    out["e2e_s"] = time.perf_counter() - start
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    out["step_s"] = statistics.median(steps) if steps else None
    out["step_times_s"] = steps  # raw, for the JSON
    out["peak_rss_mib"] = _max_rss_mib()
    if cuda:
        out["cuda_peak_alloc_mib"] = _cuda_max_allocated_mib()
    np.save(spec["image_path"], np.asarray(image, dtype=np.float32))
    Path(spec["result_path"]).write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------


def parse_setting(setting: str) -> tuple[str, str, int]:
    """``"cpu-fp32-512"`` → ``("cpu", "fp32", 512)``."""
    try:
        device, dtype, size = setting.split("-")
        if device not in ("cpu", "cuda") or dtype not in DTYPES:
            raise ValueError
        if device == "cuda" and dtype in INT8:
            raise ValueError  # no engine here has a CUDA int8-weight mode
        return device, dtype, int(size)
    except ValueError:
        raise SystemExit(
            f"bad setting {setting!r}: want DEVICE-DTYPE-SIZE, DEVICE in cpu/cuda, "
            f"DTYPE in {'/'.join(DTYPES)} (int8: cpu only), "
            f"e.g. {', '.join(CPU_SETTINGS + CUDA_SETTINGS)}"
        ) from None


def engine_precision(
    engine: str, *, device: str, dtype: str, arch: str, diffusers_bf16: bool
) -> tuple[str | None, str]:
    """The precision ``engine`` runs a DEVICE-DTYPE setting in: ``(dtype, "")``, or
    ``(None, why it is skipped)``."""
    if engine == "latentkit":
        if dtype in INT8 and LATENTKIT_INT8_OPTIONS is None and LATENTKIT_BACKEND != "openvino":
            return None, "no int8 options set (LATENTKIT_INT8_OPTIONS in compare.py is None)"
        return dtype, ""
    if engine == "diffusers":
        # bf16 on the CPU is latentkit's target; diffusers' CPU path is fp32, so fp32 is the
        # baseline it is compared against (unless asked otherwise). diffusers has no int8
        # weights of its own: fp32 again. On CUDA, diffusers runs fp16/bf16 natively and
        # both libraries use the setting's dtype.
        if dtype in INT8 or (device == "cpu" and dtype == "bf16" and not diffusers_bf16):
            return "fp32", ""
        return dtype, ""
    if arch not in PEER_ARCHES:
        return None, f"SD 1.x pipelines only (--arch {'/'.join(PEER_ARCHES)})"
    if device != "cpu":
        return None, "set up for the CPU only"
    supported = {"openvino": ("fp32", "bf16", *INT8), "onnxruntime": ("fp32",)}[engine]
    if dtype not in supported:
        return None, f"{'/'.join(supported)} only"
    return dtype, ""


def peer_model_dir(folder: Path, engine: str, export_precision: str) -> Path:
    """Where ``engine``'s export of ``folder`` lives: ``.cache/sd15-openvino-fp32`` etc."""
    return folder.with_name(f"{folder.name.removesuffix('-random')}-{engine}-{export_precision}")


def peer_export_precision(engine: str, precision: str) -> str:
    # OpenVINO's bf16 is an inference-time hint on the fp32 IR (peers.OV_EXPORT), and its
    # int8bf16 the same hint on the int8 one.
    if engine == "openvino" and precision == "bf16":
        return "fp32"
    return "int8" if precision == "int8bf16" else precision


def ensure_peer_model(
    folder: Path, engine: str, export_precision: str, peer_python: Path
) -> dict[str, Any]:
    """Export ``folder`` for ``engine`` once (a fresh process in the peer environment).

    Returns the export's record (time, versions), which the table shows apart from the
    load time. The int8 OpenVINO model is compressed from the fp32 one, so that comes first.
    """
    target = peer_model_dir(folder, engine, export_precision)
    record = target / "latentkit_benchmark_export.json"
    if record.exists():
        info: dict[str, Any] = json.loads(record.read_text())
        if info["source"] != str(folder):
            raise SystemExit(
                f"{target} was exported from {info['source']}, not {folder}: delete it to re-export"
            )
        print(f"reusing {target} (exported in {info['export_s']:.0f} s on {info['date']})")
        return info
    if engine == "openvino" and export_precision == "int8":
        ensure_peer_model(folder, engine, "fp32", peer_python)
    print(f"exporting {folder.name} for {engine} {export_precision} to {target} (once) ...")
    subprocess.run(
        [
            str(peer_python),
            str(HERE / "peers.py"),
            "export",
            "--engine",
            engine,
            "--precision",
            export_precision,
            str(folder),
            str(target),
        ],
        check=True,
        cwd=REPO,
    )
    info = json.loads(record.read_text())
    print(f"  exported in {info['export_s']:.0f} s")
    return info


def run_worker(spec: dict[str, Any], python: str) -> tuple[dict[str, Any] | None, str]:
    """One measurement in a fresh process: (metrics, "") or (None, the error's tail)."""
    proc = subprocess.run(
        [python, "-c", _BOOTSTRAP, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    result = Path(spec["result_path"])
    if proc.returncode != 0 or not result.exists():
        return None, (proc.stderr or proc.stdout)[-3000:]
    return json.loads(result.read_text()), ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "latentkit"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    try:
        # Numbers move with the code: record which latentkit commit (and whether edited).
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "latentkit"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        found["latentkit"] += f" ({head}{', edited' if dirty else ''})"
    except OSError:
        pass
    return found


def peer_versions(peer_python: Path) -> dict[str, str]:
    proc = subprocess.run(
        [str(peer_python), str(HERE / "peers.py"), "versions"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    found: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "–"
    if key.endswith("_mib"):
        return f"{value:,.0f}"
    if key == "load_rss_over_weights":
        return f"{value:.2f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:#.3g}" if value >= 0.001 else f"{value:.2e}"  # '#': 5.00, not 5


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "–"
    return f"{a / b:.2f}" if a >= 0.1 * b else f"{a / b:.2g}"


def table(results: dict[str, Any], engines: list[str]) -> str:
    """One column per engine, then latentkit/<engine> ratios (when latentkit is measured)."""
    others = [e for e in engines if e != "latentkit"] if "latentkit" in engines else []
    header = ["setting", "metric", *engines, *(f"latentkit/{e}" for e in others)]

    def row(*cells: str) -> str:
        cells += ("",) * (len(header) - len(cells))
        return "| " + " | ".join(cells) + " |"

    rows = [row(*header), "|---|---|" + "---:|" * (len(header) - 2)]
    for setting, res in results.items():
        if "skipped" in res:
            rows.append(row(setting, f"skipped: {res['skipped']}"))
            continue
        label = setting
        if res["size"] != parse_setting(setting)[2]:
            label += f" @{res['size']}px"
        if res["errors"]:
            label += f" ({len(res['errors'])} run(s) FAILED, see the JSON)"
        rows.append(row(label, "precision", *(res["precision"][e] or "skipped" for e in engines)))
        for key, name in METRICS:
            values = {e: res["median"].get(e, {}).get(key) for e in engines}
            if all(v is None for v in values.values()):
                continue  # e.g. CUDA memory on the CPU, export time without peers
            cells = [_fmt(values[e], key) for e in engines]
            ratios = [_ratio(values["latentkit"], values[e]) for e in others]
            rows.append(row("", name, *cells, *ratios))
        diffs = res["max_abs_diff"]
        if diffs:  # at least one engine beside the reference ran
            cells = [
                "(reference)"
                if e == res["reference"]
                else "–"
                if diffs.get(e) is None
                else f"{diffs[e]:.2g}"
                for e in engines
            ]
            rows.append(row("", f"max abs diff vs {res['reference']} (image)", *cells))
    return "\n".join(rows)


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = {
        k for run in runs for k, v in run.items() if isinstance(v, (int, float)) and k != "round"
    }
    return {k: statistics.median(run[k] for run in runs if run.get(k) is not None) for k in keys}


def default_json_path(settings: list[str], arch: str) -> Path:
    stem = f"{dt.date.today().isoformat()}-{'+'.join(settings)}"
    if arch != "sd15":
        stem += f"-{arch}"  # keep smoke-test numbers apart from real ones
    path = HERE / "results" / f"{stem}.json"
    n = 2
    while path.exists():  # several runs a day: never overwrite an earlier one
        path = HERE / "results" / f"{stem}-{n}.json"
        n += 1
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings",
        help=(
            f"comma-separated DEVICE-DTYPE-SIZE (default: {','.join(DEFAULT_SETTINGS['sdxl'])} "
            f"for --arch sdxl, {','.join(DEFAULT_SETTINGS['sd15'])} otherwise; "
            f"CPU: {','.join(CPU_SETTINGS)}; GPU: {','.join(CUDA_SETTINGS)})"
        ),
    )
    parser.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help=(
            f"comma-separated, run in this order each round, from {','.join(ENGINES)} "
            f"(default: %(default)s; {' and '.join(PEER_ENGINES)} run with --peer-python)"
        ),
    )
    parser.add_argument(
        "--peer-python",
        type=Path,
        default=HERE / ".venv-peers" / "bin" / "python",
        help="the peer environment's python (benchmarks/setup_peers.sh; default: %(default)s)",
    )
    parser.add_argument(
        "--arch",
        choices=tuple(ARCHES),
        default="sd15",
        help="; ".join(f"{a}: {d}" for a, d in ARCHES.items()) + " (default: %(default)s)",
    )
    parser.add_argument("--model-dir", type=Path, help="default: benchmarks/.cache/<arch>-random")
    parser.add_argument("--steps", type=int, help="denoising steps (default 4; 3 for --arch sdxl)")
    parser.add_argument(
        "--repeats", type=int, help="rounds per engine (default 2; 1 for --arch sdxl)"
    )
    parser.add_argument(
        "--size",
        type=int,
        help=(
            f"override every setting's height=width (default: the setting's; {TINY_SIZE} for "
            f"--arch {'/'.join(TINY_ARCHES)})"
        ),
    )
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--latentkit-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra load_pipeline keyword (VALUE a Python literal); repeatable",
    )
    parser.add_argument(
        "--latentkit-backend",
        choices=["torch", "openvino"],
        default="torch",
        help="latentkit's Performance(backend=...): openvino runs its own converted networks",
    )
    parser.add_argument(
        "--diffusers-bf16",
        action="store_true",
        help="run diffusers in bf16 too on cpu-bf16 settings (default: fp32 baseline)",
    )
    parser.add_argument(
        "--json", type=Path, help="default: benchmarks/results/<date>-<settings>.json"
    )
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="write the peers' exports that these settings need, then stop (no measurement)",
    )
    args = parser.parse_args(argv)
    global LATENTKIT_BACKEND
    LATENTKIT_BACKEND = args.latentkit_backend

    import numpy as np
    import torch

    if args.settings is None:
        args.settings = ",".join(DEFAULT_SETTINGS.get(args.arch, DEFAULT_SETTINGS["sd15"]))
    if args.steps is None:
        args.steps = DEFAULT_STEPS.get(args.arch, 4)
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS.get(args.arch, 2)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        parse_setting(s)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines or len(set(engines)) != len(engines):
        parser.error(
            f"--engines: want distinct names from {','.join(ENGINES)}, not {args.engines!r}"
        )
    peers = [e for e in engines if e in PEER_ENGINES]
    peer_python = args.peer_python.absolute()  # not resolved: a venv's python is a symlink
    if peers and not peer_python.exists():
        parser.error(
            f"{', '.join(peers)} need the peer environment: {peer_python} is missing "
            "(run benchmarks/setup_peers.sh, or pass --peer-python)"
        )
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is warm-up, not timed")
    try:
        parse_options(args.latentkit_option)
    except (ValueError, SyntaxError) as e:
        parser.error(str(e))
    folder = (args.model_dir or HERE / ".cache" / f"{args.arch}-random").resolve()
    ensure_folder(args.arch, folder)
    weights = weights_bytes(folder)
    # diffusers loads the folder with its own pipeline class (StableDiffusionPipeline,
    # StableDiffusionXLPipeline, ...); latentkit's load_pipeline detects the family itself.
    diffusers_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
    json_path = args.json or default_json_path(settings, args.arch)

    # What each engine runs in each setting, then the peers' exports, once, before any
    # measurement (their time is reported, but is not load time).
    plans: dict[str, dict[str, tuple[str | None, str]]] = {}
    for setting in settings:
        device, dtype, _ = parse_setting(setting)
        plans[setting] = {
            e: engine_precision(
                e, device=device, dtype=dtype, arch=args.arch, diffusers_bf16=args.diffusers_bf16
            )
            for e in engines
        }
    exports: dict[tuple[str, str], dict[str, Any]] = {}
    for setting, plan in plans.items():
        for engine in peers:
            precision = plan[engine][0]
            if precision is None or parse_setting(setting)[0] == "cuda":
                continue
            key = (engine, peer_export_precision(engine, precision))
            if key not in exports:
                exports[key] = ensure_peer_model(folder, *key, peer_python)
    if args.export_only:
        return 0

    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "arch": args.arch,
        "folder": str(folder),
        "weights_mib": weights / 2**20,
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "engines": engines,
        "versions": versions(),
        "peer_versions": peer_versions(peer_python) if peers else None,
        "peer_exports": {f"{e}-{p}": info for (e, p), info in exports.items()},
        "steps": args.steps,
        "repeats": args.repeats,
        "scheduler": SCHEDULER,
        "guidance_scale": GUIDANCE,
        "prompt": args.prompt,
        "seed": args.seed,
        "latentkit_options": {
            dev: repr(_latentkit_options(dev, args.latentkit_option, "", args.latentkit_backend))
            for dev in LATENTKIT_OPTIONS
        },
        "latentkit_int8_options": repr(LATENTKIT_INT8_OPTIONS),
    }
    print(f"# {' vs '.join(engines)} — {meta['date']}")
    print(f"CPU: {meta['cpu']}; torch threads: {meta['torch_threads']}; GPU: {meta['cuda']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    if meta["peer_versions"]:
        print(
            "peer environment: "
            + ", ".join(f"{k} {v}" for k, v in meta["peer_versions"].items())
            + f" ({peer_python})"
        )
    print(
        f"model: {args.arch} random weights, {meta['weights_mib']:,.0f} MiB of weight files "
        f"({folder})"
    )
    print(
        f"protocol: {args.repeats} round(s) of fresh processes alternating {'/'.join(engines)}; "
        f"medians; {args.steps} steps of {SCHEDULER}, CFG {GUIDANCE}; first step excluded from s/step"
    )
    if "latentkit" in engines:
        print(f"latentkit load_pipeline options: {meta['latentkit_options']}")

    results: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            device, dtype, size = parse_setting(setting)
            if device == "cuda" and not torch.cuda.is_available():
                print(f"{setting}: skipped, CUDA is not available")
                results[setting] = {"skipped": "CUDA not available"}
                continue
            size = args.size or (TINY_SIZE if args.arch in TINY_ARCHES else size)
            plan = plans[setting]
            for engine, (precision, why) in plan.items():
                if precision is None:
                    print(f"{setting}: {engine} skipped: {why}")
                elif precision != dtype:
                    print(f"{setting}: {engine} runs {precision} as the baseline")
            running = [e for e in engines if plan[e][0] is not None]
            # Images are compared with latentkit's; with latentkit skipped (int8 before it
            # has such a mode), with the first engine that runs.
            reference = running[0] if running else None
            res: dict[str, Any] = {
                "device": device,
                "size": size,
                "precision": {e: plan[e][0] for e in engines},
                "skipped_engines": {e: why for e, (p, why) in plan.items() if p is None},
                "reference": reference,
                "runs": [],
                "errors": [],
            }
            diffs: dict[str, list[float]] = {e: [] for e in running if e != reference}
            for rnd in range(args.repeats):
                images = {}
                for engine in running:  # alternate, so drift (thermal, load) hits all alike
                    precision = plan[engine][0]
                    assert precision is not None
                    name = f"{setting}-{engine}-{rnd}"
                    print(f"  {name} ...", end=" ", flush=True)
                    spec = {
                        "engine": engine,
                        "precision": precision,
                        "import": IMPORTS[engine],
                        "module": "peers" if engine in PEER_ENGINES else Path(__file__).stem,
                        "benchmarks_dir": str(HERE),
                        "folder": str(folder),
                        "diffusers_class": diffusers_class,
                        "weights_bytes": weights,
                        "device": device,
                        "dtype": DTYPES[precision],
                        "size": size,
                        "steps": args.steps,
                        "prompt": args.prompt,
                        "seed": args.seed,
                        "latentkit_options": args.latentkit_option,
                        "latentkit_backend": args.latentkit_backend,
                        "result_path": str(Path(tmp) / f"{name}.json"),
                        "image_path": str(Path(tmp) / f"{name}.npy"),
                    }
                    if engine in PEER_ENGINES:
                        spec["peer_model_dir"] = str(
                            peer_model_dir(folder, engine, peer_export_precision(engine, precision))
                        )
                    python = str(peer_python) if engine in PEER_ENGINES else sys.executable
                    start = time.perf_counter()
                    metrics, error = run_worker(spec, python)
                    if metrics is None:
                        failed = True
                        print("FAILED")
                        print(error, file=sys.stderr)
                        res["errors"].append({"engine": engine, "round": rnd, "error": error})
                        continue
                    print(f"{time.perf_counter() - start:.1f}s")
                    if engine in PEER_ENGINES:
                        key = (engine, peer_export_precision(engine, precision))
                        metrics["export_s"] = exports[key]["export_s"]
                    res["runs"].append({"engine": engine, "round": rnd, **metrics})
                    images[engine] = np.load(spec["image_path"])
                for engine in diffs:
                    if reference in images and engine in images:
                        diff = np.abs(images[engine] - images[reference]).max()
                        diffs[engine].append(float(diff))
            res["median"] = {
                e: medians([r for r in res["runs"] if r["engine"] == e]) for e in running
            }
            res["max_abs_diff"] = {e: max(d) if d else None for e, d in diffs.items()}
            results[setting] = res
            # Written after every setting, so a long run that dies keeps what it measured.
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    print()
    print(table(results, engines))
    print()
    print(
        "ratio < 1: latentkit is faster / smaller. max abs diff: largest per-pixel difference "
        "of the final images (values in [0, 1]) from the reference engine's, same seed; "
        "between different precisions it measures the precision's deviation."
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"raw results: {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
