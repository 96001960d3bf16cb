"""latentkit's CLIP text encoder against transformers' ``CLIPTextModel`` (fp32, CPU).

transformers is only the reference here: each test builds a tiny ``CLIPTextModel`` with
seeded random weights, saves it, and loads the file into our encoder the way the pipeline
loader does (built on meta, tensors assigned by name). The outputs must be bit-identical
(`TOLERANCE` is 0.0): both run the same float operations in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import latentkit
from latentkit.errors import InvalidArgumentError, UnsupportedModelError, WeightMismatchError
from latentkit.loading import load_into, read_state_dict
from latentkit.models.text_encoder import (
    IGNORED_KEYS,
    CLIPTextConfig,
    CLIPTextEncoder,
    rename_checkpoint_key,
)
from latentkit.saving import save_pipeline

TOLERANCE = 0.0
"""Largest absolute difference allowed between our outputs and transformers' (fp32, CPU)."""

VOCAB = 64
START, END = VOCAB - 2, VOCAB - 1  # as in CLIP's vocabulary, the end token has the highest id
LENGTH = 16


def reference_config(kind: str) -> dict[str, Any]:
    """Tiny SD-shaped configs. ``sd1``: quick GELU, and ``eos_token_id=2`` as in Stable
    Diffusion 1.x's published config (pooling then takes the highest id); ``sd2``: GELU and
    the real end token id, padding with another token (SD 2.x pads with "!")."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=LENGTH,
        layer_norm_eps=1e-5,
        bos_token_id=START,
        projection_dim=32,
    )
    if kind == "sd1":
        return {**common, "hidden_act": "quick_gelu", "eos_token_id": 2, "pad_token_id": END}
    return {**common, "hidden_act": "gelu", "eos_token_id": END, "pad_token_id": 0}


def reference_encoder(kind: str) -> Any:
    from transformers import CLIPTextConfig as ReferenceConfig
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(ReferenceConfig(**reference_config(kind))).eval()


def load_encoder(folder: Path) -> CLIPTextEncoder:
    """Our encoder from a ``text_encoder/`` folder, exactly as `StableDiffusion.from_files`
    loads it."""
    config = CLIPTextConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        encoder = CLIPTextEncoder(config)
    tensors = read_state_dict(
        sorted(folder.glob("*.safetensors")),
        device=torch.device("cpu"),
        dtype=torch.float32,
        rename=rename_checkpoint_key,
    )
    load_into(encoder, tensors, name="text_encoder")
    return encoder


def tokens(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (start, text, end, padding) of 3 prompts of different lengths, and the mask
    of their real tokens (start to end, as a tokenizer returns it)."""
    gen = torch.Generator().manual_seed(1)
    pad = reference_config(kind)["pad_token_id"]
    ids = torch.full((3, LENGTH), pad, dtype=torch.long)
    mask = torch.zeros(3, LENGTH, dtype=torch.long)
    for row, n in enumerate((3, 9, LENGTH - 2)):
        ids[row, : n + 2] = torch.cat(
            [
                torch.tensor([START]),
                torch.randint(1, START, (n,), generator=gen),
                torch.tensor([END]),
            ]
        )
        mask[row, : n + 2] = 1
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    reference = reference_encoder(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(str(folder))
    return request.param, reference, load_encoder(folder), folder


@pytest.mark.parametrize("masking", ["none", "padding", "all ones"])
def test_outputs_equal_transformers(pair: Any, masking: str) -> None:
    kind, reference, encoder, _ = pair
    ids, mask = tokens(kind)
    attention_mask = {"none": None, "padding": mask, "all ones": torch.ones_like(mask)}[masking]
    with torch.no_grad():
        theirs = reference(ids, attention_mask=attention_mask, output_hidden_states=True)
        ours = encoder(ids, attention_mask=attention_mask, output_hidden_states=True)
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= TOLERANCE
    assert ours[0] is ours.last_hidden_state and ours[1] is ours.pooler_output
    assert ours.hidden_states is not None
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3 + 1
    for mine, ref in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert max_diff(mine, ref) <= TOLERANCE
    assert max_diff(ours.pooler_output, theirs.pooler_output) <= TOLERANCE
    # Without output_hidden_states there are none, and the result is the same.
    with torch.no_grad():
        plain = encoder(ids, attention_mask=attention_mask)
    assert plain.hidden_states is None
    assert torch.equal(plain.last_hidden_state, ours.last_hidden_state)


def test_padding_mask_changes_the_padded_rows_only(pair: Any) -> None:
    kind, _, encoder, _ = pair
    ids, mask = tokens(kind)
    with torch.no_grad():
        free = encoder(ids).last_hidden_state
        masked = encoder(ids, attention_mask=mask).last_hidden_state
    # Causal attention: a real token never sees the padding after it, masked or not.
    real = mask.bool()
    assert torch.equal(free[real], masked[real])
    assert not torch.equal(free[~real], masked[~real])


def test_pooled_state_is_at_the_end_token(pair: Any) -> None:
    kind, _, encoder, _ = pair
    ids, mask = tokens(kind)
    with torch.no_grad():
        out = encoder(ids)
    end = mask.sum(dim=1) - 1  # the first end token: SD 1.x pads with it, so not the last
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(3), end])


def test_state_dict_keys_are_the_checkpoint_keys(pair: Any) -> None:
    _, _, encoder, folder = pair
    saved = load_file(str(folder / "model.safetensors"))  # transformers' own save_pretrained
    renamed = {rename_checkpoint_key(k): tuple(v.shape) for k, v in saved.items()}
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert renamed == ours
    assert all(k.startswith("text_model.") for k in ours)  # the published checkpoints' layout
    assert {
        "text_model.embeddings.token_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.final_layer_norm.weight",
    } <= set(ours)


def test_published_layout_with_position_ids_loads(pair: Any, tmp_path: Path) -> None:
    """SD 1.5's ``model.safetensors``: every key under ``text_model.``, plus the position ids
    older transformers saved, which are ignored."""
    kind, _, encoder, folder = pair
    state = {f"text_model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    (ignored,) = IGNORED_KEYS
    state[ignored] = torch.arange(LENGTH)[None]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    published = load_encoder(tmp_path)
    ids, _ = tokens(kind)
    with torch.no_grad():
        assert torch.equal(published(ids)[0], encoder(ids)[0])


def test_unexpected_or_misshapen_tensors_are_refused(pair: Any, tmp_path: Path) -> None:
    _, _, _, folder = pair
    state = load_file(str(folder / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    extra = {**state, "text_projection.weight": torch.zeros(32, 32)}
    save_file(extra, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError, match=r"unexpected tensor 'text_projection\.weight'"):
        load_encoder(tmp_path)
    wrong = {**state, "encoder.layers.1.mlp.fc1.weight": torch.zeros(36, 32)}
    save_file(wrong, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        WeightMismatchError,
        match=r"'text_model\.encoder\.layers\.1\.mlp\.fc1\.weight' has shape \(36, 32\)",
    ):
        load_encoder(tmp_path)


def test_too_many_tokens_or_a_wrong_mask_are_refused(pair: Any) -> None:
    _, _, encoder, _ = pair
    with pytest.raises(InvalidArgumentError, match="17 tokens"):
        encoder(torch.zeros(1, LENGTH + 1, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="attention_mask"):
        encoder(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_built_on_meta_without_data() -> None:
    with torch.device("meta"):
        encoder = CLIPTextEncoder(CLIPTextConfig.from_dict(reference_config("sd1")))
    assert all(p.is_meta for p in encoder.parameters())
    assert list(encoder.buffers()) == []


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_config_round_trip(kind: str) -> None:
    from transformers import CLIPTextConfig as ReferenceConfig

    reference = reference_encoder(kind)
    config = CLIPTextConfig.from_dict(reference.config.to_dict())
    d = config.to_dict()
    assert CLIPTextConfig.from_dict(d) == config
    assert d["architectures"] == ["CLIPTextModel"] and d["model_type"] == "clip_text_model"
    read = ReferenceConfig.from_dict(d)
    for key, value in d.items():
        if key != "architectures":
            assert getattr(read, key) == value, key
    assert not hasattr(read, "use_attention_mask")
    masked = CLIPTextConfig.from_dict({**d, "use_attention_mask": True})
    assert ReferenceConfig.from_dict(masked.to_dict()).use_attention_mask is True


# stable-diffusion-v1-5's text_encoder/config.json
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}


def test_published_config_and_unsupported_ones() -> None:
    config = CLIPTextConfig.from_dict(SD15_CONFIG)
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act) == (
        768,
        12,
        "quick_gelu",
    )
    assert config.eos_token_id == 2 and config.use_attention_mask is False
    sd21 = {**SD15_CONFIG, "hidden_act": "gelu", "hidden_size": 1024, "num_attention_heads": 16}
    assert CLIPTextConfig.from_dict(sd21).hidden_act == "gelu"
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu_new'"):
        CLIPTextConfig.from_dict({**SD15_CONFIG, "hidden_act": "gelu_new"})
    with pytest.raises(UnsupportedModelError, match="model_type='clip'"):
        CLIPTextConfig.from_dict({**SD15_CONFIG, "model_type": "clip"})
    with pytest.raises(InvalidArgumentError, match="num_attention_heads"):
        CLIPTextConfig.from_dict({**SD15_CONFIG, "num_attention_heads": 7})


# ---------------------------------------------------------------- in the pipeline


def test_pipeline_loads_our_encoder_and_refuses_a_wrong_shape(
    sd1_path: Path, tmp_path: Path
) -> None:
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    assert isinstance(pipe.text[0].text_encoder, CLIPTextEncoder)
    folder = shutil.copytree(sd1_path, tmp_path / "m")
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    config["intermediate_size"] = 36
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        WeightMismatchError, match=r"text_encoder: tensor .*mlp\.fc1\.(weight|bias).* has shape"
    ):
        latentkit.load_pipeline(folder, progress=False)


def test_saved_encoder_loads_in_transformers_and_diffusers(sd1_path: Path, tmp_path: Path) -> None:
    import diffusers
    from transformers import CLIPTextModel

    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    encoder = pipe.text[0].text_encoder
    assert isinstance(encoder, CLIPTextEncoder)
    saved = save_pipeline(
        tmp_path / "saved",
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=encoder,
        tokenizer=pipe.text[0].tokenizer,
        scheduler=pipe.scheduler,
    )
    index = json.loads((saved / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    # latentkit's tokenizer is listed as the transformers class diffusers reads it with.
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert sorted(p.name for p in (saved / "text_encoder").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]

    reference = CLIPTextModel.from_pretrained(str(saved / "text_encoder")).eval()
    ids = pipe.text[0].tokenize(["a photo of a red cat", ""]).ids[:, 0]
    with torch.no_grad():
        theirs = reference(ids, output_hidden_states=True)
        ours = encoder(ids, output_hidden_states=True)
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= TOLERANCE
    assert max_diff(ours.pooler_output, theirs.pooler_output) <= TOLERANCE
    # transformers writes a model it read from our file back with exactly our keys.
    reference.save_pretrained(str(tmp_path / "resaved"))
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    assert set(resaved) == set(encoder.state_dict())

    cpu = torch.device("cpu")
    loaded = latentkit.load_pipeline(saved, device="cpu", progress=False)
    prompts = ["a photo of a red cat", ""]
    expected = pipe.text[0].encode(prompts, device=cpu, dtype=torch.float32)
    assert torch.equal(loaded.text[0].encode(prompts, device=cpu, dtype=torch.float32), expected)
    other: Any = diffusers.StableDiffusionPipeline.from_pretrained(str(saved))
    embeds, _ = other.encode_prompt(prompts, cpu, 1, False)
    assert torch.equal(embeds, expected)


def test_loading_imports_no_transformers_model_code(sd1_path: Path) -> None:
    """The point of our own encoder: transformers' model code is not imported (with
    latentkit's own tokenizer, transformers is not imported at all: test_tokenizer.py)."""
    code = (
        "import sys, latentkit\n"
        f"latentkit.load_pipeline({str(sd1_path)!r}, device='cpu', progress=False)\n"
        "print(sorted(m for m in sys.modules if 'modeling' in m and m.startswith('transformers')))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]", out.stdout
