"""Outpainting: the canvas grows by the margins, the margins are generated, the picture's
pixels come back unchanged outside an 8-pixel seam, for every family and both ways of
inpainting (a 9-channel inpainting model, blending with a 4-channel one).

Parity: outpainting is inpainting of the edge-padded canvas with the margins-plus-seam mask,
then the paste-back. So diffusers' inpainting pipeline on that canvas and mask, pasted back
by the closed form ``alpha * image + (1 - alpha) * canvas``, must give our image (1e-4 max
abs on fp32 images in [0, 1], as every pipeline test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit
from latentkit.outpainting import SEAM, extend

TOL = 1e-4
H, W = 24, 16  # the picture; the tiny VAEs downsample by 2, so 8-pixel margins are whole


def picture(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)


def kept(margins: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W) True where the picture's pixels must come back exactly: beyond SEAM pixels
    from every side that was extended."""
    left, top, right, bottom = margins
    keep = np.ones((H, W), dtype=bool)
    if left:
        keep[:, :SEAM] = False
    if right:
        keep[:, W - SEAM :] = False
    if top:
        keep[:SEAM] = False
    if bottom:
        keep[H - SEAM :] = False
    return keep


@pytest.fixture(scope="module")
def pipes(
    sd1_path: Path, inpaint_path: Path, sdxl_path: Path, sdxl_inpaint_path: Path
) -> dict[str, tuple[Path, latentkit.LatentDiffusion]]:
    paths = {"sd1": sd1_path, "inpaint": inpaint_path, "sdxl": sdxl_path}
    paths["sdxl_inpaint"] = sdxl_inpaint_path
    return {
        k: (p, latentkit.load_pipeline(p, device="cpu", progress=False)) for k, p in paths.items()
    }


# ---------------------------------------------------------------- the canvas, closed form


def test_extend_pads_by_edge_and_masks_the_margins_and_the_seam() -> None:
    pixels = torch.rand(1, 3, 12, 20) * 2 - 1
    out = extend(pixels, (8, 0, 4, 16))
    assert out.canvas.shape == (1, 3, 28, 32)
    assert torch.equal(out.canvas[..., :12, 8:28], pixels)  # the picture, in place
    assert torch.equal(out.canvas[..., :12, :8], pixels[..., :, :1].expand(-1, -1, -1, 8))
    assert torch.equal(out.canvas[..., 12:, 8:28], pixels[..., -1:, :].expand(-1, -1, 16, -1))
    assert torch.equal(out.canvas[..., 12:, :8], pixels[..., -1:, :1].expand(-1, -1, 16, 8))
    alpha, mask = out.alpha[0, 0], out.mask[0, 0]
    # Row 0 (no top margin): 1 on the left margin, (8-d)/9 for d = 0..7 into the picture, 0
    # from 8 in, up the seam of the right side (4 px margin), 1 on the right margin.
    row = torch.tensor([1.0] * 8 + [(8 - d) / 9 for d in range(8)] + [0.0] * 4)
    right_seam = torch.tensor([(8 - d) / 9 for d in range(8)]).flip(0)
    assert torch.allclose(alpha[0, :20], row)
    assert torch.allclose(alpha[0, 20:28], right_seam)
    assert torch.equal(alpha[0, 28:], torch.ones(4))
    assert torch.equal(alpha[12:], torch.ones(16, 32))  # the bottom margin
    assert torch.equal(mask, (alpha > 0).float())
    # Seam: every kept pixel is at least 8 px from an extended side's margin.
    assert torch.equal(alpha[:4, 16:20], torch.zeros(4, 4))


def test_paste_returns_the_canvas_where_alpha_is_zero() -> None:
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    out = extend(pixels, (0, 8, 0, 0))
    decoded = torch.randn(2, 3, 24, 16, dtype=torch.float16)
    pasted = out.paste(decoded)
    assert pasted.dtype == torch.float32
    keep = out.alpha[0, 0] == 0
    assert torch.equal(pasted[:, :, keep], out.canvas.expand(2, -1, -1, -1)[:, :, keep])
    # The margins are the decoded image as shown: clamped to [-1, 1].
    assert torch.equal(pasted[:, :, :8], decoded[:, :, :8].float().clamp(-1, 1))


# ---------------------------------------------------------------- every family


@pytest.mark.parametrize("kind", ["sd1", "inpaint", "sdxl", "sdxl_inpaint"])
@pytest.mark.parametrize("margins", [(8, 0, 16, 8), (0, 16, 0, 0)], ids=["three", "top"])
def test_size_and_kept_pixels(pipes: dict[str, Any], kind: str, margins: Any) -> None:
    _, pipe = pipes[kind]
    source = picture(1)
    left, top, right, bottom = margins
    result = pipe.generate(
        "a cat", image=Image.fromarray(source), outpaint=margins, steps=3, seed=2, progress=False
    )
    out = np.asarray(result.images[0])
    assert out.shape == (H + top + bottom, W + left + right, 3)
    assert (result.parameters[0].height, result.parameters[0].width) == out.shape[:2]
    inside = out[top : top + H, left : left + W]
    keep = kept(margins)
    assert np.array_equal(inside[keep], source[keep])  # exactly, outside the seam
    assert np.abs(inside[~keep].astype(int) - source[~keep]).mean() > 1  # the seam was redone
    new = np.ones(out.shape[:2], dtype=bool)
    new[top : top + H, left : left + W] = False
    assert out[new].std() > 5  # the margins were generated, not left as repeated edges


def test_kept_pixels_of_float_outputs(pipes: dict[str, Any]) -> None:
    _, pipe = pipes["sd1"]
    source = picture(2)
    out = pipe.generate(
        "a cat", image=source, outpaint=(0, 0, 8, 0), steps=2, seed=1, output_type="np",
        progress=False,
    ).images[0]  # fmt: skip
    keep = kept((0, 0, 8, 0))
    assert np.abs(out[:, :W][keep] - source[keep] / 255.0).max() <= 1e-6


@pytest.mark.parametrize(
    ("kind", "cls", "strength"),
    [
        ("sd1", "StableDiffusionInpaintPipeline", 1.0),  # blending, a 4-channel UNet
        ("sd1", "StableDiffusionInpaintPipeline", 0.8),  # the margins start from the edges
        ("inpaint", "StableDiffusionInpaintPipeline", 1.0),  # 9 channels
        ("sdxl", "StableDiffusionXLInpaintPipeline", None),  # SDXL's 0.9999
        ("sdxl_inpaint", "StableDiffusionXLInpaintPipeline", None),
    ],
)
def test_outpainting_is_diffusers_inpainting_of_the_canvas_pasted_back(
    pipes: dict[str, Any], kind: str, cls: str, strength: float | None
) -> None:
    import diffusers

    path, pipe = pipes[kind]
    margins = (8, 8, 0, 16)
    left, top, right, bottom = margins
    source = picture(3)
    canvas = np.pad(source, ((top, bottom), (left, right), (0, 0)), mode="edge")
    grown = extend(torch.from_numpy(source).permute(2, 0, 1)[None] / 127.5 - 1, margins)
    mask = Image.fromarray((grown.mask[0, 0].numpy() * 255).astype(np.uint8))
    ref = getattr(diffusers, cls).from_pretrained(str(path))
    ref.set_progress_bar_config(disable=True)
    # diffusers' SDXL inpainting guides with 7.5 by default, its text-to-image with 5.0 (ours).
    chosen: dict[str, Any] = {"guidance_scale": 7.5}
    if strength is not None:
        chosen["strength"] = strength
    theirs = ref(
        prompt="a cat",
        image=Image.fromarray(canvas),
        mask_image=mask,
        height=canvas.shape[0],
        width=canvas.shape[1],
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
        **chosen,
    ).images[0]
    alpha = grown.alpha[0, 0, :, :, None].numpy()
    expected = alpha * theirs + (1 - alpha) * canvas / 255.0
    got = pipe.generate(
        "a cat",
        image=Image.fromarray(source),
        outpaint=margins,
        steps=4,
        seed=5,
        output_type="np",
        progress=False,
        **chosen,
    ).images[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


def test_latent_output_is_the_canvas_latents(pipes: dict[str, Any]) -> None:
    _, pipe = pipes["sd1"]
    latents = pipe.generate(
        "a cat", image=picture(), outpaint=(8, 0, 0, 0), steps=2, output_type="latent",
        progress=False,
    ).images  # fmt: skip
    assert tuple(latents.shape) == (1, 4, H // 2, (W + 8) // 2)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(outpaint=(8, 0, 0, 0)), "outpaint needs image="),
        (dict(image=picture(), outpaint=(8, 0, 0)), "four ints"),
        (dict(image=picture(), outpaint=(0, 0, 0, 0)), "not all 0"),
        (dict(image=picture(), outpaint=(-8, 0, 0, 0)), "four ints"),
        (dict(image=picture(), outpaint=(8.0, 0, 0, 0)), "four ints"),
        (dict(image=picture(), outpaint=(8, 0, 0, 0), mask_image=picture()), "mask_image does not"),
        (dict(image=picture(), outpaint=(8, 0, 0, 0), height=32), "height does not"),
        (dict(image=picture(), outpaint=(3, 0, 0, 0)), "multiples of 2"),
        (dict(image=picture()[:, :15], outpaint=(8, 0, 0, 0)), "crop it to 24x14"),
        (dict(image=torch.zeros(1, 4, 12, 8), outpaint=(8, 0, 0, 0)), "no mask or outpaint"),
    ],
)
def test_refusals(pipes: dict[str, Any], kw: dict[str, Any], match: str) -> None:
    _, pipe = pipes["sd1"]
    with pytest.raises(latentkit.InvalidArgumentError, match=match):
        pipe.generate("a cat", steps=2, progress=False, **kw)


def test_depth_models_cannot_outpaint(depth_path: Path) -> None:
    depth = latentkit.load_pipeline(depth_path, device="cpu", progress=False)
    with pytest.raises(latentkit.InvalidArgumentError, match="cannot inpaint"):
        depth.generate("a cat", image=picture(), outpaint=(8, 0, 0, 0), steps=2, progress=False)


def test_canvas_over_the_pixel_limit_is_refused_before_allocation(pipes: dict[str, Any]) -> None:
    _, pipe = pipes["sd1"]
    with pytest.raises(latentkit.InvalidArgumentError, match="exceeds the limit"):
        pipe.generate("a cat", image=picture(), outpaint=(2**20, 0, 0, 2**20), progress=False)


def test_cli_outpaint(sd1_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from latentkit import cli

    Image.fromarray(picture(4)).save(tmp_path / "in.png")
    out = tmp_path / "wide.png"
    argv = ["generate", "a cat", "-o", str(out), "--model", str(sd1_path), "--image"]
    argv += [str(tmp_path / "in.png"), "--outpaint", "8,0,16,0", "--steps", "2", "--seed", "1"]
    assert cli.main([*argv, "-q", "--device", "cpu"]) == 0
    with Image.open(out) as image:
        assert image.size == (W + 24, H)
        kept_pixels = np.asarray(image)[:, 8 : 8 + W][kept((8, 0, 16, 0))]
    assert np.array_equal(kept_pixels, picture(4)[kept((8, 0, 16, 0))])
    with pytest.raises(SystemExit):
        cli.main(["generate", "a cat", "--outpaint", "8,0,16"])
    assert "LEFT,TOP,RIGHT,BOTTOM" in capsys.readouterr().err
    assert (
        cli.main(["generate", "a cat", "--outpaint", "8,0,0,0", "-o", str(tmp_path / "x.png")]) == 2
    )
    assert "--outpaint needs --image" in capsys.readouterr().err
