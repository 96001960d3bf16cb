"""Loading from local folders and from a (pre-filled, offline) Hugging Face cache, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit
from latentkit.loading import select_files
from latentkit.models.text_encoder import CLIPTextEncoder

# The file listing of stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hub.
SD15_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]

CONFIGS = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
]


def test_selects_only_needed_files_of_sd15() -> None:
    needed, _ = select_files(SD15_FILES, variant=None, allow_pickle=False, name="sd15")
    assert sorted(needed) == sorted(
        [
            *CONFIGS,
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        ]
    )
    needed16, weights16 = select_files(SD15_FILES, variant="fp16", allow_pickle=True, name="sd15")
    assert sorted(f for fs in weights16.values() for f in fs) == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert not any(
        f.startswith(("safety_checker", "feature_extractor")) or f.endswith((".bin", ".ckpt"))
        for f in needed16
    )


def test_variant_falls_back_per_component_and_pickle_needs_opt_in() -> None:
    files = [f for f in SD15_FILES if "vae/diffusion_pytorch_model.fp16" not in f]
    _, weights = select_files(files, variant="fp16", allow_pickle=False, name="x")
    assert weights["vae"] == ["vae/diffusion_pytorch_model.safetensors"]
    pickle_only = [f for f in SD15_FILES if not f.endswith(".safetensors")]
    with pytest.raises(latentkit.PickleWeightsError, match="allow_pickle=True"):
        select_files(pickle_only, variant=None, allow_pickle=False, name="x")
    _, weights = select_files(pickle_only, variant=None, allow_pickle=True, name="x")
    assert weights["unet"] == ["unet/diffusion_pytorch_model.bin"]


def test_sharded_weights_are_selected_whole() -> None:
    files = [
        *CONFIGS,
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    _, weights = select_files(files, variant=None, allow_pickle=False, name="x")
    assert len(weights["unet"]) == 3


def make_cache(folder: Path, cache: Path, repo_id: str) -> str:
    """Lay ``folder`` out as huggingface_hub's cache does for ``repo_id`` at one commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_offline_cache_loads_same_model(sd1_path: Path, tmp_path: Path, offline: None) -> None:
    commit = make_cache(sd1_path, tmp_path, "tiny/sd1")
    local = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    for revision in (None, commit):
        hub = latentkit.load_pipeline(
            "tiny/sd1", cache_dir=tmp_path, revision=revision, device="cpu", progress=False
        )
        assert hub.name == "tiny/sd1"
        a = local.generate("a cat", steps=2, seed=0, output_type="np", progress=False).images[0]
        b = hub.generate("a cat", steps=2, seed=0, output_type="np", progress=False).images[0]
        assert np.array_equal(a, b)


def test_offline_and_not_cached_says_so(tmp_path: Path, offline: None) -> None:
    with pytest.raises(latentkit.ModelNotCachedError, match="HF_HUB_OFFLINE") as info:
        latentkit.load_pipeline("nobody/nothing", cache_dir=tmp_path, progress=False)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_unreachable_hub_falls_back_to_cache(
    sd1_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def no_network(*a: Any, **k: Any) -> Any:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    with pytest.raises(latentkit.ModelNotCachedError, match="cannot be reached"):
        latentkit.load_pipeline("tiny/sd1", cache_dir=tmp_path, progress=False)
    make_cache(sd1_path, tmp_path, "tiny/sd1")
    assert (
        latentkit.load_pipeline("tiny/sd1", cache_dir=tmp_path, progress=False).name == "tiny/sd1"
    )


def test_online_downloads_only_needed_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a (mocked) Hub, the download asks for exactly the files the pipeline uses, pinned
    to the listed commit."""
    import huggingface_hub
    from huggingface_hub.hf_api import ModelInfo

    asked: dict[str, Any] = {}

    def model_info(self: Any, repo_id: str, **kw: Any) -> Any:
        return ModelInfo(id=repo_id, sha="c" * 40, siblings=[{"rfilename": f} for f in SD15_FILES])

    def snapshot_download(repo_id: str, **kw: Any) -> str:
        asked.update(kw)
        raise RuntimeError("stop here")  # the files are not real; we only check the request

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(RuntimeError, match="stop here"):
        latentkit.load_pipeline("some/sd15", variant="fp16", progress=False, cache_dir=tmp_path)
    assert asked["revision"] == "c" * 40
    assert sorted(asked["allow_patterns"]) == sorted(
        [
            *CONFIGS,
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.fp16.safetensors",
        ]
    )


def test_repo_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    class Response:  # the attributes huggingface_hub's HTTP errors read
        headers: dict[str, str] = {}  # noqa: RUF012
        request = None
        status_code = 404

    def missing(*a: Any, **k: Any) -> Any:
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=Response())  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(latentkit.ModelNotFoundError, match="not found on the Hub"):
        latentkit.load_pipeline("nobody/nothing", progress=False)


def test_missing_local_path() -> None:
    with pytest.raises(latentkit.ModelNotFoundError, match="does not exist"):
        latentkit.load_pipeline("./no/such/folder", progress=False)
    with pytest.raises(latentkit.ModelNotFoundError, match="does not exist"):
        latentkit.load_pipeline("/definitely/not/here", progress=False)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_component_file(sd1_path: Path, tmp_path: Path) -> None:
    folder = copy_model(sd1_path, tmp_path / "m")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(latentkit.MissingComponentError, match=r"vae/config\.json"):
        latentkit.load_pipeline(folder, progress=False)
    folder2 = copy_model(sd1_path, tmp_path / "m2")
    (folder2 / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(latentkit.MissingComponentError, match="no weights for unet"):
        latentkit.load_pipeline(folder2, progress=False)


def test_shape_mismatch_names_the_tensor(sd1_path: Path, tmp_path: Path) -> None:
    folder = copy_model(sd1_path, tmp_path / "m")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(latentkit.WeightMismatchError, match=r"attn2\.to_k\.weight.*shape"):
        latentkit.load_pipeline(folder, progress=False)


def test_pickle_weights_need_opt_in(sd1_path: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = copy_model(sd1_path, tmp_path / "m")
    for component, stem, pickled in [
        ("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model"),
        ("text_encoder", "model", "pytorch_model"),
    ]:
        st = folder / component / f"{stem}.safetensors"
        torch.save(load_file(st), folder / component / f"{pickled}.bin")
        st.unlink()
    with pytest.raises(latentkit.PickleWeightsError):
        latentkit.load_pipeline(folder, progress=False)
    pipe = latentkit.load_pipeline(folder, allow_pickle=True, progress=False)
    ref = latentkit.load_pipeline(sd1_path, progress=False)
    a = pipe.generate("a cat", steps=2, seed=0, output_type="np", progress=False).images[0]
    b = ref.generate("a cat", steps=2, seed=0, output_type="np", progress=False).images[0]
    assert np.array_equal(a, b)


def test_variant_weights_load(sd1_path: Path, tmp_path: Path) -> None:
    folder = copy_model(sd1_path, tmp_path / "m")
    for f in folder.rglob("*.safetensors"):
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    with pytest.raises(latentkit.MissingComponentError):
        latentkit.load_pipeline(folder, progress=False)
    pipe = latentkit.load_pipeline(folder, variant="fp16", progress=False)
    assert pipe.unet.conv_in.weight.dtype == torch.float32


def test_weights_are_not_randomly_initialised_first(
    sd1_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules are built on the meta device: no parameter is ever initialised for real."""
    calls = []

    def spy_on(name: str) -> None:
        real = getattr(torch.nn.init, name)

        def spy(tensor: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            if not tensor.is_meta:
                calls.append((name, tuple(tensor.shape)))
            return real(tensor, *a, **k)  # type: ignore[no-any-return]

        monkeypatch.setattr(torch.nn.init, name, spy)

    for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_"):
        spy_on(name)
    pipe = latentkit.load_pipeline(sd1_path, progress=False)
    assert calls == []
    assert isinstance(pipe.text[0].text_encoder, CLIPTextEncoder)
    for module in (pipe.unet, pipe.vae, pipe.text[0].text_encoder):
        assert not any(p.is_meta for p in module.parameters())


def test_cli_offline_from_cache_in_a_fresh_process(sd1_path: Path, tmp_path: Path) -> None:
    """Exactly how an offline user runs: HF_HUB_OFFLINE=1 and a filled cache, nothing else."""
    import os
    import subprocess
    import sys

    from PIL import Image

    cache = tmp_path / "hub"
    make_cache(sd1_path, cache, "tiny/sd1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = tmp_path / "x.png"
    cmd = [
        sys.executable,
        "-m",
        "latentkit",
        "generate",
        "a cat",
        "-o",
        str(out),
        "--model",
        "tiny/sd1",
        "--steps",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--quiet",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Model: tiny/sd1" in Image.open(out).text["parameters"]
    cmd[cmd.index("tiny/sd1")] = "nobody/nothing"
    cmd[cmd.index(str(out))] = str(tmp_path / "y.png")
    missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert "HF_HUB_OFFLINE=1 is set" in missing.stderr


def test_depth_repos_also_fetch_their_estimator() -> None:
    files = [
        *SD15_FILES,
        "depth_estimator/config.json",
        "depth_estimator/model.safetensors",
        "depth_estimator/pytorch_model.bin",
    ]
    needed, weights = select_files(files, variant=None, allow_pickle=False, name="sd2-depth")
    assert weights["depth_estimator"] == ["depth_estimator/model.safetensors"]
    assert "feature_extractor/preprocessor_config.json" in needed
    # Without a depth estimator, the feature extractor (the safety checker's) is never fetched.
    plain, weights = select_files(SD15_FILES, variant=None, allow_pickle=False, name="sd15")
    assert "depth_estimator" not in weights and not any(
        f.startswith("feature_extractor") for f in plain
    )


def test_builtin_model_names(
    sd1_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import latentkit.loading as loading

    assert (
        loading.builtin_model("latentkit/shapes")
        == Path(loading.__file__).parent / "assets" / "shapes"
    )
    assert loading.builtin_model("someone/else") is None
    monkeypatch.setattr(
        loading, "builtin_model", lambda name: sd1_path if name == "latentkit/shapes" else None
    )
    assert latentkit.load_pipeline("latentkit/shapes", progress=False).name == "latentkit/shapes"
    monkeypatch.setattr(
        loading,
        "builtin_model",
        lambda name: tmp_path / "absent" if name == "latentkit/shapes" else None,
    )
    with pytest.raises(latentkit.MissingComponentError, match="not installed"):
        latentkit.load_pipeline("latentkit/shapes", progress=False)
