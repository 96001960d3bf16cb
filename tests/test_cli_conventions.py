"""The CLI and PNG conventions users bring from A1111 and stable-diffusion.cpp (issues 13 and
18): PNGs that regenerate their image, A1111's labels and hashes, and the flags."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import latentkit
from latentkit.cli import _parser, main
from latentkit.request import FIELDS
from latentkit.results import GenerationParameters


def run(*argv: str) -> int:
    return main([*argv, "-q"])


def test_params_from_regenerates_the_same_pixels(sd1_path: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert (
        run(
            "generate",
            "-p",
            "a red cat",
            "--negative-prompt",
            "blurry",
            "-s",
            "7",
            "--steps",
            "3",
            "--scheduler",
            "DPM++ 2M Karras",
            "--clip-skip",
            "1",
            "-W",
            "32",
            "-H",
            "16",
            "--model",
            str(sd1_path),
            "-o",
            str(first),
        )
        == 0
    )
    text = Image.open(first).text["parameters"]
    assert "Sampler: DPM++ 2M, " in text and "Schedule type: Karras" in text
    assert "Clip skip: 2" in text  # A1111's count for the penultimate layer
    assert "Version: latentkit " in text
    assert (
        run("generate", "--params-from", str(first), "--model", str(sd1_path), "-o", str(second))
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    params = GenerationParameters.from_png(second)
    assert (params.prompt, params.negative_prompt, params.seed, params.clip_skip) == (
        "a red cat",
        "blurry",
        7,
        1,
    )


def test_a1111_text_maps_its_labels() -> None:
    text = (
        "a castle\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 7, Seed: 3, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, Clip skip: 2"
    )
    options = GenerationParameters.from_a1111(text).to_options()
    scheduler = options.pop("scheduler")
    assert scheduler.name == "dpm-solver++" and scheduler.use_karras_sigmas
    assert options == {
        "prompt": "a castle",
        "negative_prompt": "fog",
        "steps": 20,
        "guidance_scale": 7.0,
        "seed": 3,
        "width": 512,
        "height": 512,
        "clip_skip": 1,
    }


def test_loras_embeddings_and_single_files_are_hashed_in_the_png(
    sd1_path: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    embedding = tmp_path / "toy.safetensors"
    save_file({"<toy>": torch.randn(2, 32)}, str(embedding))
    out = tmp_path / "x.png"
    code = run(
        "generate",
        "a <toy> cat",
        "--embedding",
        f"{embedding}:<toy>",
        "--steps",
        "2",
        "-W",
        "16",
        "-H",
        "16",
        "--model",
        str(sd1_path),
        "-o",
        str(out),
    )
    assert code == 0
    extras = dict(GenerationParameters.from_png(out).extras)
    from latentkit.checkpoints.single_file import file_hash

    assert extras["TI hashes"] == f"<toy>: {file_hash(embedding)[:12]}"


def test_the_flags_of_a1111_and_sdcpp_users(
    sd1_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("latentkit ")
    with pytest.raises(SystemExit):  # -n is sd.cpp's negative prompt: no silent other meaning
        main(["generate", "a cat", "-n", "2"])
    out = tmp_path / "t.png"
    assert (
        run(
            "generate",
            "-p",
            "a cat",
            "--threads",
            "1",
            "--steps",
            "1",
            "-W",
            "16",
            "-H",
            "16",
            "--model",
            str(sd1_path),
            "-o",
            str(out),
        )
        == 0
    )
    assert run("generate", "a cat", "--steps", "1", "--model", str(sd1_path), "-o", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err  # the flag, not overwrite=True
    assert run("generate", "a cat", "-p", "a dog", "-o", str(tmp_path / "u.png")) == 2
    assert run("generate", "a cat", "--threads", "0", "-o", str(tmp_path / "v.png")) == 2


def test_every_request_keyword_is_a_flag_or_python_only() -> None:
    """The request is declared once; the CLI reaches every keyword a command line can carry."""
    python_only = {
        "callback",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "generator",
        "latents",
        "output_type",
        "progress",
        "original_size",
        "target_size",
        "crops_coords_top_left",
        "negative_original_size",
        "negative_target_size",
        "negative_crops_coords_top_left",
        "aesthetic_score",
        "negative_aesthetic_score",
        "denoising_start",
        "denoising_end",
        "prompt_syntax",
        "guidance_rescale",
        "noise_level",
        "guidance_interval",
        "feature_cache",
        "timesteps",
        "sigmas",
    }
    generate = next(
        a
        for a in _parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
        if a.prog.endswith("generate")
    )
    dests = {a.dest for a in generate._actions}
    renamed = {
        "guidance_scale": "guidance",
        "negative_prompt": "negative",
        "image": "image",
        "mask_image": "mask",
        "depth_map": "depth",
        "prompt": "prompt",
    }
    missing = [f for f in FIELDS if f not in python_only and renamed.get(f, f) not in dests]
    assert missing == []


def test_single_file_model_hash(tmp_path: Path, sd1_path: Path) -> None:
    import tiny_models
    from safetensors.torch import save_file
    from test_keys import FAMILY, layout_of, our_state

    from latentkit.checkpoints import keys as K
    from latentkit.checkpoints.single_file import file_hash

    pipe = tiny_models.build_pipeline("sd1")
    original = {
        k: v.contiguous()
        for k, v in K.to_original(our_state(pipe), layout=layout_of(pipe, FAMILY["sd1"]))
    }
    path = tmp_path / "tiny-sd1.safetensors"
    save_file(original, str(path))
    loaded = latentkit.load_pipeline(path, config=sd1_path, device="cpu", progress=False)
    params = loaded.generate("a cat", steps=1, height=16, width=16, progress=False).parameters[0]
    assert params.model == "tiny-sd1"
    assert dict(params.extras)["Model hash"] == file_hash(path)[:10]
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--quantize", "int8"],
            "--quantize int8 runs on the OpenVINO backend: pass --backend openvino",
        ),
        (
            ["--backend", "openvino", "--compile"],
            "--backend openvino compiles the networks itself; --compile",
        ),
    ],
)
def test_performance_errors_name_the_flags(
    sd1_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], said: str
) -> None:
    code = run("generate", "a cat", "--model", str(sd1_path), "-o", str(tmp_path / "x.png"), *flags)
    err = capsys.readouterr().err
    assert code != 0 and said in err, err
    assert not (tmp_path / "x.png").exists()
