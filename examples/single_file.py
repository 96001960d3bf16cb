"""Load a single-file checkpoint (``model.safetensors`` as A1111 and ComfyUI save them).

``latentkit.load_pipeline`` recognises a single file by its tensors (SD 1.x, SD 2.x, SDXL base
or refiner; text-to-image, inpainting or depth) and builds the pipeline from the published
configs, or from ``config=`` (a diffusers folder) when given.

Given a file, the example loads it and generates one image. Given a diffusers SD 1.x folder
instead, it first writes that folder's weights as an original-layout (CompVis) single file with
`latentkit.checkpoints.keys.to_original`, loads the file back with ``config=`` the folder, and
prints the largest pixel difference between the folder's image and the file's (the same
weights: 0).

    python examples/single_file.py --model path/to/model.safetensors
    python examples/single_file.py --model path/to/diffusers-sd15-folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

import latentkit
from latentkit.checkpoints import keys
from latentkit.models.autoencoder import AutoencoderKLConfig


def write_single_file(pipe: latentkit.LatentDiffusion, path: Path) -> None:
    """An SD 1.x pipeline's weights as one file in the original (CompVis ``ldm``) layout."""
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
    if not isinstance(pipe.vae.config, AutoencoderKLConfig):
        raise SystemExit("the original layout has a KL autoencoder (not TAESD)")
    layout = keys.checkpoint_layout(
        "sd1",
        unet=keys.UNetLayout.from_config(pipe.unet.config),
        vae=keys.VAELayout.from_config(pipe.vae.config),
    )
    save_file({k: v.contiguous() for k, v in keys.to_original(state, layout=layout)}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate from a single-file checkpoint.")
    parser.add_argument("prompt", nargs="?", default="a photo of an astronaut riding a horse")
    parser.add_argument(
        "--model", required=True, help="a .safetensors file or a diffusers SD 1.x folder"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=None, help="width and height in pixels")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="output folder")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    settings = {"steps": args.steps, "seed": args.seed, "height": args.size, "width": args.size}

    model = Path(args.model)
    folder_image = None
    if model.is_dir():
        folder = latentkit.load_pipeline(model, device=args.device)
        if folder.family != "stable-diffusion" or len(folder.text) != 1:
            parser.error("--model: this example writes single files from SD 1.x folders only")
        single = args.output / "model.safetensors"
        write_single_file(folder, single)
        folder_image = np.asarray(folder.generate(args.prompt, output_type="np", **settings).images)
        pipe = latentkit.load_pipeline(single, config=model, device=args.device)
    else:
        pipe = latentkit.load_pipeline(model, device=args.device)
    print(f"{pipe.family}: prediction type {pipe.scheduler.prediction_type}")

    result = pipe.generate(args.prompt, **settings)
    # overwrite=True so the example can be rerun; by default save() refuses to replace files.
    [path] = result.save(args.output / "single_file.png", overwrite=True)
    print(path)
    print(result.parameters[0].a1111())  # with "Model hash": the file's, as A1111 computes it
    if folder_image is not None:
        single_image = np.asarray(pipe.generate(args.prompt, output_type="np", **settings).images)
        print(
            f"largest pixel difference, folder vs single file: {np.abs(single_image - folder_image).max():.2e}"
        )


if __name__ == "__main__":
    main()
