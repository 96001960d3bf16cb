"""The command line: generate with A1111 metadata, list schedulers, never overwrite silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from latentkit.cli import main


def test_generate_writes_png_with_parameters(
    sd1_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cat.png"
    args = [
        "generate",
        "a red cat",
        "-o",
        str(out),
        "--model",
        str(sd1_path),
        "--scheduler",
        "ddim",
        "--steps",
        "3",
        "--guidance",
        "6",
        "--seed",
        "11",
        "-W",
        "32",
        "-H",
        "16",
        "--negative",
        "blurry",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--quiet",
    ]
    assert main(args) == 0
    image = Image.open(out)
    assert image.size == (32, 16)
    assert image.text["parameters"] == (
        "a red cat\nNegative prompt: blurry\n"
        "Steps: 3, Sampler: DDIM, CFG scale: 6, Seed: 11, Size: 32x16, Model: sd1, "
        "Version: latentkit 0.1.0"
    )
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bars
    # Same seed, same picture.
    before = out.read_bytes()
    assert main([*args, "--overwrite"]) == 0
    assert Image.open(out).tobytes() == Image.open(__import__("io").BytesIO(before)).tobytes()


def test_refuses_to_overwrite_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    assert (
        main(["generate", "x", "-o", str(out), "--model", str(tmp_path / "missing"), "--quiet"])
        == 2
    )
    assert out.read_bytes() == b"precious"
    assert "already exist" in capsys.readouterr().err


def test_errors_are_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "generate",
                "x",
                "-o",
                str(tmp_path / "a.png"),
                "--model",
                str(tmp_path / "nope"),
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("latentkit: error: local path") and "does not exist" in err


def test_progress_bars_on_stderr(
    sd1_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "generate",
                "x",
                "-o",
                str(tmp_path / "a.png"),
                "--model",
                str(sd1_path),
                "--steps",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "denoising" in err and "loading" in err


def test_lists_schedulers(capsys: pytest.CaptureFixture[str]) -> None:
    from latentkit import schedulers

    assert main(["schedulers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # One registration per line, name first, then its A1111 labels.
    assert [line.split()[0] for line in lines] == schedulers.names()
    assert {"ddim", "dpm-solver++", "pndm", "euler"} <= {line.split()[0] for line in lines}
    by_name = {line.split()[0]: line.split(maxsplit=1)[1:] for line in lines}
    assert by_name["dpm-solver++"] == ["DPM++ 2M, DPM++ 2M Karras"]
    assert by_name["pndm"] == ["PLMS"]


def test_image_tasks_from_the_command_line(sd1_path: Path, tmp_path: Path) -> None:
    import numpy as np

    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(
        picture
    )
    mask = tmp_path / "mask.png"
    Image.fromarray(np.tile(np.array([255] * 16 + [0] * 16, dtype="uint8"), (32, 1))).save(mask)
    out = tmp_path / "out.png"
    common = ["--model", str(sd1_path), "--steps", "3", "--seed", "1", "--device", "cpu", "--quiet"]
    assert (
        main(
            [
                "generate",
                "a cat",
                "-o",
                str(out),
                "--image",
                str(picture),
                "--strength",
                "0.5",
                *common,
            ]
        )
        == 0
    )
    assert "Denoising strength: 0.5" in Image.open(out).text["parameters"]
    assert (
        main(
            [
                "generate",
                "a cat",
                "-o",
                str(tmp_path / "b.png"),
                "--image",
                str(picture),
                "--mask",
                str(mask),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(["generate", "a cat", "-o", str(tmp_path / "c.png"), "--mask", str(mask), *common])
        == 2
    )
    assert (
        main(
            [
                "generate",
                "a cat",
                "-o",
                str(tmp_path / "d.png"),
                "--image",
                str(tmp_path / "nope.png"),
                *common,
            ]
        )
        == 2
    )
    assert (
        main(["generate", "a cat", "-o", str(tmp_path / "e.png"), "--depth", str(picture), *common])
        == 2
    )


def test_speed_flags_reach_the_pipeline(
    sd1_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import latentkit.api

    seen = {}
    load = latentkit.api.load_pipeline

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(latentkit.api, "load_pipeline", spy)
    out = tmp_path / "fast.png"
    flags = [
        "--autocast",
        "bf16",
        "--channels-last",
        "--fuse-qkv",
        "--no-conv-gemm",
        "--no-upsample-phases",
        "--attention",
        "math",
        "--attention-slice",
        "2",
        "--tile-vae",
    ]
    common = [
        "--model",
        str(sd1_path),
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(["generate", "a red cat", "-o", str(out), *common, *flags]) == 0
    p = seen["performance"]
    assert (
        p.autocast,
        p.channels_last,
        p.fuse_qkv,
        p.conv_gemm,
        p.upsample_phases,
        p.attention,
        p.attention_slice_size,
        p.vae_tiling,
    ) == ("bf16", True, True, False, False, "math", 2, True)  # --fuse-qkv given
    assert Image.open(out).size == (32, 32)


def test_cuda_only_flags_fail_before_loading_on_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "generate",
        "x",
        "-o",
        str(tmp_path / "x.png"),
        "--model",
        str(tmp_path / "none"),
        "--device",
        "cpu",
        "--cuda-graphs",
        "--quiet",
    ]
    assert main(args) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
