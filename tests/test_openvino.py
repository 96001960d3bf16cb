"""Performance(backend="openvino"): latentkit's own UNet and decoder converted and run by
OpenVINO, checked against the eager torch path on the same weights and seeds.

Tolerances: float32 images within 1e-4 of the torch path (float rounding of another set of
kernels); bf16 is lossy, so it is bounded by what it costs on the tiny random models
(measured 0.064 max abs on [0, 1] pixels; the bound leaves 2x); int8, with its statically
quantized activations, on the trained shapes model, where its error means something.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import latentkit
from latentkit.backends import OpenVINONetwork, weight_identity
from latentkit.errors import InvalidArgumentError, MissingDependencyError

pytest.importorskip("openvino")

FP32 = 1e-4
KW: dict[str, Any] = dict(steps=3, seed=1, height=64, width=64, output_type="pt", progress=False)


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def torch_pipe(sd1_path: Path) -> Any:
    return latentkit.load_pipeline(sd1_path, progress=False)


@pytest.fixture(scope="module")
def ov_pipe(sd1_path: Path, ov_cache: Path) -> Any:
    performance = latentkit.Performance(backend="openvino", cache_dir=ov_cache)
    return latentkit.load_pipeline(sd1_path, progress=False, performance=performance)


def _diff(a: Any, b: Any) -> float:
    return float((a.images - b.images).abs().max())


def test_float32_equals_the_torch_path(torch_pipe: Any, ov_pipe: Any) -> None:
    for prompt in ("a cat", ["a red square", "a blue circle"]):
        want = torch_pipe.generate(prompt, **KW)
        got = ov_pipe.generate(prompt, **KW)
        assert got.images.shape == want.images.shape
        assert _diff(got, want) <= FP32
    # img2img: the encoder stays torch, the UNet and the decoder are OpenVINO's.
    image = torch_pipe.generate("a cat", **KW).images
    want = torch_pipe.generate("a dog", image=image, strength=0.6, **KW)
    assert _diff(ov_pipe.generate("a dog", image=image, strength=0.6, **KW), want) <= FP32


def test_a_second_load_reads_the_converted_model_from_disk(
    sd1_path: Path, ov_cache: Path, ov_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ov_pipe.generate("a cat", **KW)
    files = sorted(p.name for p in ov_cache.iterdir())
    assert {f.split("-")[0] for f in files if f.endswith(".xml")} == {"unet", "vae"}

    def no_conversion(*args: Any) -> None:
        raise AssertionError("converted again although the disk cache has the network")

    monkeypatch.setattr(OpenVINONetwork, "_trace", no_conversion)
    performance = latentkit.Performance(backend="openvino", cache_dir=ov_cache)
    again = latentkit.load_pipeline(sd1_path, progress=False, performance=performance)
    assert torch.equal(again.generate("a cat", **KW).images, first.images)
    assert sorted(p.name for p in ov_cache.iterdir()) == files  # nothing added


def test_a_load_from_the_disk_cache_never_reads_the_unet_or_decoder_weights(
    sd1_path: Path, ov_cache: Path, ov_pipe: Any, torch_pipe: Any, sd1_lora_path: Path
) -> None:
    ov_pipe.generate("a cat", **KW)  # converted (and kept on disk) by now
    performance = latentkit.Performance(backend="openvino", cache_dir=ov_cache)
    again = latentkit.load_pipeline(sd1_path, progress=False, performance=performance)
    unread = [again.unet, again.vae]
    assert all(p.is_meta for m in unread for p in m.parameters())
    assert _diff(again.generate("a cat", **KW), torch_pipe.generate("a cat", **KW)) <= FP32
    assert all(p.is_meta for p in again.unet.parameters())  # still: nothing needed them
    # The encoder runs in torch, so img2img reads the autoencoder's weights then.
    image = torch_pipe.generate("a cat", **KW).images
    got = again.generate("a dog", image=image, strength=0.6, **KW)
    want = torch_pipe.generate("a dog", image=image, strength=0.6, **KW)
    assert _diff(got, want) <= FP32
    assert not any(p.is_meta for p in again.vae.parameters())
    # A LoRA wraps the base UNet's weights: they are read for it, and the result is exact.
    lora = latentkit.load_pipeline(sd1_path, progress=False, performance=performance)
    got = lora.with_lora(sd1_lora_path, scale=0.8).generate("a cat", **KW)
    want = torch_pipe.with_lora(sd1_lora_path, scale=0.8).generate("a cat", **KW)
    assert _diff(got, want) <= FP32
    # img2img on a pipeline made by with_lora reads the shared autoencoder's weights too.
    lazy = latentkit.load_pipeline(sd1_path, progress=False, performance=performance)
    got = lazy.with_lora(sd1_lora_path, scale=0.8).generate(
        "a dog", image=image, strength=0.6, **KW
    )
    want = torch_pipe.with_lora(sd1_lora_path, scale=0.8).generate(
        "a dog", image=image, strength=0.6, **KW
    )
    assert _diff(got, want) <= FP32


def test_a_conversion_shows_its_stages_unless_progress_is_off(
    sd1_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder, progress in (("quiet", False), ("shown", True)):
        performance = latentkit.Performance(backend="openvino", cache_dir=tmp_path / folder)
        pipe = latentkit.load_pipeline(sd1_path, progress=False, performance=performance)
        pipe.generate("a cat", **dict(KW, progress=progress))
        err = capsys.readouterr().err
        for network in ("unet", "vae"):
            assert (f"converting {network} for OpenVINO" in err) is progress
    pipe.generate("a cat", **dict(KW, progress=True))  # converted: nothing to show
    assert "converting" not in capsys.readouterr().err


def test_mapped_weights_are_released_without_changing_them(tmp_path: Path) -> None:
    import mmap

    from latentkit.backends import _release_mapped

    path = tmp_path / "w.bin"
    data = bytes(range(256)) * (16 << 12)  # 16 MiB
    path.write_bytes(data)

    def resident_kib() -> int:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
        for i, line in enumerate(lines):
            if line.endswith(str(path)):
                return next(int(x.split()[1]) for x in lines[i + 1 :] if x.startswith("Rss:"))
        raise AssertionError("not mapped")

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[:] == data  # every page read: resident
        assert resident_kib() >= 16 << 10
        _release_mapped(path)
        assert resident_kib() == 0
        assert mapped[:] == data  # mapped again from the file, unchanged


def test_changed_weights_are_not_read_from_the_cache(tmp_path: Path, sd1_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((sd1_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    before = weight_identity([weights])
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert weight_identity([weights]) != before  # rewritten: a new modification time
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(bytes(data))
    assert weight_identity([copy]) != weight_identity([weights])  # another file


def test_lora_converts_its_own_unet(
    torch_pipe: Any, ov_pipe: Any, sd1_lora_path: Path, ov_cache: Path
) -> None:
    want = torch_pipe.with_lora(sd1_lora_path, scale=0.8).generate("a cat", **KW)
    got = ov_pipe.with_lora(sd1_lora_path, scale=0.8).generate("a cat", **KW)
    assert _diff(got, want) <= FP32
    assert _diff(got, ov_pipe.generate("a cat", **KW)) > 1e-3  # the LoRA did change it
    assert len([p for p in ov_cache.iterdir() if p.name.startswith("unet-")]) >= 4


def test_controlnet_residuals_are_inputs_of_the_converted_unet(
    torch_pipe: Any, ov_pipe: Any, sd1_controlnet_path: Path
) -> None:
    control = torch.rand(1, 3, 64, 64)
    kw = dict(KW, control_image=control, control_scale=0.7)
    want = torch_pipe.with_controlnet(sd1_controlnet_path).generate("a cat", **kw)
    got = ov_pipe.with_controlnet(sd1_controlnet_path).generate("a cat", **kw)
    assert _diff(got, want) <= FP32


@pytest.mark.parametrize(("options", "bound"), [({"autocast": "bf16"}, 0.13)])
def test_lossy_precisions_stay_close(
    sd1_path: Path, ov_cache: Path, torch_pipe: Any, options: dict[str, Any], bound: float
) -> None:
    performance = latentkit.Performance(backend="openvino", cache_dir=ov_cache, **options)
    pipe = latentkit.load_pipeline(sd1_path, progress=False, performance=performance)
    got, want = pipe.generate("a cat", **KW), torch_pipe.generate("a cat", **KW)
    assert 0 < _diff(got, want) <= bound
    assert bool(torch.isfinite(got.images).all())


def test_int8_keeps_eight_bit_weights_on_disk(sd1_path: Path, tmp_path: Path) -> None:
    performance = latentkit.Performance(backend="openvino", cache_dir=tmp_path, quantize="int8")
    pipe = latentkit.load_pipeline(sd1_path, progress=False, performance=performance)
    got = pipe.generate("a cat", **KW)
    assert bool(torch.isfinite(got.images).all())
    import openvino as ov

    (xml,) = tmp_path.glob("unet-*.xml")
    model = ov.Core().read_model(xml)

    def weight_type(op: Any) -> str:  # the constant at the end of the weight input's chain
        node = op.input_value(1).get_node()
        while node.get_type_name() != "Constant":
            node = node.input_value(0).get_node()
        return str(node.get_output_element_type(0).get_type_name())

    ops = model.get_ordered_ops()
    convolutions = [op for op in ops if op.get_type_name() == "Convolution"]
    products = {weight_type(op) for op in ops if op.get_type_name() == "MatMul"} - {"f32"}
    # Static int8 convolutions but the first, the last and the residual shortcuts; 8-bit
    # matrix-product weights (only attention's products of activations have no constants).
    floats = {0, len(convolutions) - 1} | {
        i for i, op in enumerate(convolutions) if ".conv_shortcut/" in op.get_friendly_name()
    }
    assert len(floats) > 2  # the tiny UNet has shortcuts
    for i, op in enumerate(convolutions):
        assert weight_type(op) == ("f32" if i in floats else "i8"), op.get_friendly_name()
    assert products == {"u8"}
    # A quarter of the float32 weights, plus scales, zero points and the small layers.
    float32 = (sd1_path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert xml.with_suffix(".bin").stat().st_size < 0.4 * float32


def test_int8_calibration_is_fixed_noise_over_the_timesteps() -> None:
    from latentkit.backends import CALIBRATION_TIMESTEPS, calibration_inputs

    x, t, context = torch.ones(2, 4, 8, 8), torch.tensor(500.0), torch.randn(2, 77, 32)
    first = calibration_inputs([x, t, context], (-1, -1, -1))
    assert len(first) == CALIBRATION_TIMESTEPS
    assert [float(item[1]) for item in first] == pytest.approx(
        torch.linspace(999, 0, CALIBRATION_TIMESTEPS).tolist()
    )
    # Seeded noise of x's shape, the call's own conditioning; the same every time.
    again = calibration_inputs([x * 5, t, context], (-1, -1, -1))
    for a, b in zip(first, again, strict=True):
        assert all((u == v).all() for u, v in zip(a, b, strict=True))
    assert abs(float(first[0][0].std()) - 1) < 0.1 and (first[0][2] == context.numpy()).all()
    with pytest.raises(ValueError, match="needs a call"):  # not a UNet-style call
        calibration_inputs([x], (-1,))


def test_int8_on_the_trained_shapes_model_stays_close_to_float32(tmp_path: Path) -> None:
    """Static int8 on a trained model (random weights say little about quantization):
    measured mean |Δ| 0.0007 and 0.0012 of [0, 1] pixels on these prompts (weight-only
    int8: 0.0008; 0.0022 and 0.0038 with the residual shortcuts int8 too); the bound
    leaves 2x."""
    kw = dict(steps=12, seed=3, output_type="pt", progress=False)
    prompts = ["a red circle left of a blue square", "a green triangle above a yellow circle"]
    plain = latentkit.load_pipeline("latentkit/shapes", progress=False)
    performance = latentkit.Performance(backend="openvino", cache_dir=tmp_path, quantize="int8")
    int8 = latentkit.load_pipeline("latentkit/shapes", progress=False, performance=performance)
    for prompt in prompts:
        got, want = int8.generate(prompt, **kw).images, plain.generate(prompt, **kw).images
        assert 0 < float((got - want).abs().mean()) <= 0.0025


def test_threads_share_one_pipeline(torch_pipe: Any, ov_pipe: Any) -> None:
    want = {seed: torch_pipe.generate("a cat", **dict(KW, seed=seed)).images for seed in (3, 4)}
    got: dict[int, torch.Tensor] = {}

    def run(seed: int) -> None:
        got[seed] = ov_pipe.generate("a cat", **dict(KW, seed=seed)).images

    threads = [threading.Thread(target=run, args=(s,)) for s in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, images in want.items():
        assert float((got[seed] - images).abs().max()) <= FP32


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"backend": "onnx"}, "backend must be one of"),
        ({"quantize": "int8"}, "OpenVINO backend"),
        ({"backend": "openvino", "quantize": "int4"}, "quantize must be"),
        ({"backend": "openvino", "compile": True}, "compile=True"),
        ({"backend": "openvino", "cache_dir": 3}, "cache_dir must be a path"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        latentkit.Performance(**options)


def test_refusals_come_before_any_weight_is_read(
    sd1_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import latentkit.pipelines.base as base

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr(base, "load_into", no_loading)
    ov = latentkit.Performance(backend="openvino")
    with pytest.raises(InvalidArgumentError, match="float32 weights"):
        latentkit.load_pipeline(sd1_path, progress=False, performance=ov, dtype="bf16")
    monkeypatch.setattr("latentkit.backends.import_openvino", _missing)
    monkeypatch.setattr("latentkit.performance.import_openvino", _missing)
    with pytest.raises(MissingDependencyError, match=r"latentkit-sdk\[openvino\]"):
        latentkit.load_pipeline(sd1_path, progress=False, performance=ov)


def _missing() -> None:
    raise MissingDependencyError('needs OpenVINO: pip install "latentkit-sdk[openvino]"')


def test_feature_cache_is_refused(ov_pipe: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="feature_cache needs the eager torch"):
        ov_pipe.generate("a cat", feature_cache=2, **KW)


def test_sdxl_vector_conditioning_is_an_input_of_the_converted_unet(
    sdxl_path: Path, ov_cache: Path
) -> None:
    """SDXL's UNet takes the pooled text + size vector as a fourth input."""
    kw = dict(KW, height=64, width=64)
    want = latentkit.load_pipeline(sdxl_path, progress=False).generate("a cat", **kw)
    performance = latentkit.Performance(backend="openvino", cache_dir=ov_cache)
    pipe = latentkit.load_pipeline(sdxl_path, progress=False, performance=performance)
    assert _diff(pipe.generate("a cat", **kw), want) <= FP32
