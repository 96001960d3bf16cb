"""Single-file loading: peak memory and time, latentkit vs diffusers' ``from_single_file``.

Writes an original-layout (CompVis/A1111) fp16 checkpoint of SD 1.5's architecture from the
random-weight diffusers folder that ``benchmarks/compare.py`` builds (``--model-dir``), then
loads it with each library in a fresh process (``--repeats`` rounds, alternating), dtype fp16
on the CPU, and prints one markdown table: file size, load time, the process's peak resident
memory (``ru_maxrss``) and its rise over the resident memory after imports, both also as a
multiple of the file size.

    python benchmarks/compare.py --arch sd15 --settings cpu-fp32-256 --steps 2 --repeats 1  # once
    python benchmarks/single_file.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
lib, path, config = sys.argv[1:4]
if lib == "latentkit":
    import latentkit
else:
    import diffusers

def status_kib(field: str) -> int:
    # VmHWM is this process image's peak RSS (reset at exec, unlike ru_maxrss, which a child
    # inherits from a big parent).
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)

def rss_kib() -> int:
    return status_kib("VmRSS")

# Which kind of page the peak is made of: anonymous (copies) or file-backed (the mapped file,
# page cache the kernel can drop), sampled every 5 ms.
import threading
peaks = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()
def sample() -> None:
    while not done.is_set():
        for field in peaks:
            peaks[field] = max(peaks[field], status_kib(field))
        time.sleep(0.005)
sampler = threading.Thread(target=sample, daemon=True)
before = rss_kib()
sampler.start()
began = time.perf_counter()
if lib == "latentkit":
    pipe = latentkit.load_pipeline(path, config=config, dtype=torch.float16, device="cpu",
                                   progress=False)
    unet = pipe.unet
else:
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        path, config=config, torch_dtype=torch.float16, local_files_only=True,
        safety_checker=None)
    unet = pipe.unet
seconds = time.perf_counter() - began
done.set()
sampler.join()
assert next(unet.parameters()).dtype == torch.float16
peak = status_kib("VmHWM")
after = rss_kib()
# A loader may leave tensors as untouched memory-mapped pages that the first step reads in:
# read every weight once and take the peak again, the memory of a pipeline ready to run.
text_encoders = [t.text_encoder for t in pipe.text] if lib == "latentkit" else [pipe.text_encoder]
with torch.no_grad():
    for module in (pipe.unet, pipe.vae, *text_encoders):
        for tensor in module.state_dict().values():
            tensor.sum()
print(json.dumps({"seconds": seconds, "before_kib": before, "peak_kib": peak, "after_kib": after,
                  "anon_peak_kib": peaks["RssAnon"], "file_peak_kib": peaks["RssFile"],
                  "touched_peak_kib": status_kib("VmHWM"), "touched_kib": rss_kib()}))
"""


def write_single_file(folder: Path, out: Path) -> None:
    """``folder`` (a diffusers SD 1.x folder) as one original-layout fp16 safetensors file."""
    import torch
    from safetensors.torch import save_file

    import latentkit
    from latentkit.checkpoints import keys as K

    pipe = latentkit.load_pipeline(folder, dtype=torch.float16, device="cpu", progress=False)
    (text,) = pipe.text
    state = {
        f"{name}.{key}": tensor
        for name, module in (
            ("unet", pipe.unet),
            ("vae", pipe.vae),
            ("text_encoder", text.text_encoder),
        )
        for key, tensor in module.state_dict().items()
    }
    from latentkit.models.autoencoder import AutoencoderKLConfig

    assert isinstance(pipe.vae.config, AutoencoderKLConfig)  # the original layout's VAE
    layout = K.checkpoint_layout(
        "sd1",
        unet=K.UNetLayout.from_config(pipe.unet.config),
        vae=K.VAELayout.from_config(pipe.vae.config),
    )
    original = {k: v.contiguous() for k, v in K.to_original(state, layout=layout)}
    save_file(original, str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "benchmarks/.cache/sd15-random")
    parser.add_argument(
        "--file", type=Path, default=ROOT / "benchmarks/.cache/sd15-single-fp16.safetensors"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--libraries", default="latentkit,diffusers")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.file.is_file():
        print(f"writing {args.file} from {args.model_dir}", flush=True)
        write_single_file(args.model_dir, args.file)
    size = args.file.stat().st_size
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    rows: list[dict[str, Any]] = []
    for round_ in range(args.repeats):
        for lib in args.libraries.split(","):
            cmd = [sys.executable, "-c", CHILD, lib, str(args.file), str(args.model_dir)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{lib} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"library": lib, "round": round_ + 1, **result})
            print(json.dumps(rows[-1]), flush=True)
    gib = 1024**3
    print(f"\nfile: {args.file.name}, {size / gib:.2f} GiB ({size / 1e9:.2f} GB)\n")
    print(
        "| library | round | load time | peak RSS loading | rise over imports | peak anonymous / file-backed (sampled) | peak RSS, every weight read |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak, before, touched = (
            int(r[k]) * 1024 for k in ("peak_kib", "before_kib", "touched_peak_kib")
        )
        print(
            f"| {r['library']} | {r['round']} | {float(r['seconds']):.1f} s "
            f"| {peak / gib:.2f} GiB ({peak / size:.2f}x) | {(peak - before) / gib:.2f} GiB "
            f"({(peak - before) / size:.2f}x) | {int(r['anon_peak_kib']) / 2**20:.2f} / {int(r['file_peak_kib']) / 2**20:.2f} GiB | {touched / gib:.2f} GiB ({touched / size:.2f}x) |"
        )
    out = args.json or ROOT / "benchmarks/results" / (
        time.strftime("%Y-%m-%d") + "-single-file.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"file_bytes": size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
