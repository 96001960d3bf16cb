"""SDXL's networks against diffusers' and transformers' on identical weights (fp32, CPU).

The UNet with per-block transformer depth and the ``text_time`` vector condition, the
``time_ids_embedding`` helper, and the CLIP text encoder with projection (``text_encoder_2``),
on the tiny SDXL base / refiner / inpainting configs of `tiny_models`; then the published
full-size architectures built on the meta device (no memory) in both libraries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers as _diffusers
import pytest
import tiny_models
import torch
import transformers as _transformers
from diffusers.models.embeddings import Timesteps

from latentkit.errors import InvalidArgumentError, UnsupportedModelError
from latentkit.loading import load_into, read_state_dict
from latentkit.models.text_encoder import CLIPTextConfig, CLIPTextEncoder, rename_checkpoint_key
from latentkit.models.unet import UNet2DCondition, UNetConfig, time_ids_embedding

diffusers: Any = _diffusers  # untyped; the references are used as Any throughout
transformers: Any = _transformers

UNET_ATOL = 1e-5
"""Largest absolute difference allowed between our UNet's output and diffusers' (fp32, CPU)."""
TEXT_ATOL = 1e-5
"""Largest absolute difference allowed between our text encoder's outputs and transformers'."""

UNET_KWARGS = {
    "sdxl": tiny_models.sdxl_unet_kwargs,
    "sdxl_refiner": tiny_models.sdxl_refiner_unet_kwargs,
    "sdxl_inpaint": lambda: tiny_models.sdxl_unet_kwargs(in_channels=9),
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def reference_unet(kwargs: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**kwargs).eval()
    # Random init leaves the output small; scale it (as the fixtures do) so a wrong vector
    # or depth shows in the output, not only in the rounding.
    with torch.no_grad():
        reference.conv_out.weight.mul_(5.0)
    return reference


def our_unet(reference: Any) -> UNet2DCondition:
    """Built on meta and loaded with assign=True, as the loader does."""
    with torch.device("meta"):
        unet = UNet2DCondition(UNetConfig.from_dict(dict(reference.config)))
    unet.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return unet.eval()


def time_ids(batch: int, count: int) -> torch.Tensor:
    """SDXL's size/crop (and, for the refiner, aesthetic score) ids, different per row."""
    rows = [
        [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],  # base: original, crop, target
        [768.0, 1344.0, 17.0, 33.0, 896.0, 1152.0],
        [512.0, 512.0, 0.0, 0.0, 6.0, 0.0],  # refiner: original, crop, aesthetic score
    ]
    return torch.tensor([rows[i % len(rows)][:count] for i in range(batch)])


def unet_inputs(
    config: UNetConfig, size: tuple[int, int], *, batch: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sample, context, pooled text embedding and time ids for ``config``."""
    assert config.addition_time_embed_dim is not None and config.vector_dim is not None
    ids = config.vector_dim - tiny_models.SDXL_PROJECTION_DIM
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, config.in_channels, *size, generator=gen)
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=gen)
    pooled = torch.randn(batch, tiny_models.SDXL_PROJECTION_DIM, generator=gen)
    return sample, context, pooled, time_ids(batch, ids // config.addition_time_embed_dim)


def vector_for(config: UNetConfig, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The vector condition as a conditioner assembles it: pooled text, then the ids' sinusoids."""
    assert config.addition_time_embed_dim is not None
    sinusoids = time_ids_embedding(
        ids,
        config.addition_time_embed_dim,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=config.freq_shift,
    )
    return torch.cat([pooled, sinusoids], dim=-1)


# ---------------------------------------------------------------- time ids


@pytest.mark.parametrize(("dim", "flip", "shift"), [(8, True, 0), (256, True, 0), (7, False, 1)])
def test_time_ids_embedding_equals_diffusers_add_time_proj(
    dim: int, flip: bool, shift: int
) -> None:
    ids = time_ids(3, 6)
    # diffusers' UNet: add_time_proj(time_ids.flatten()).reshape((batch, -1))
    theirs = Timesteps(dim, flip, shift)(ids.flatten()).reshape((3, -1))
    ours = time_ids_embedding(ids, dim, flip_sin_to_cos=flip, freq_shift=shift)
    assert ours.shape == (3, 6 * dim) and ours.dtype == torch.float32
    assert max_diff(ours, theirs) == 0.0
    # Each id's sinusoid is its own block of `dim` columns, in the ids' order.
    assert not torch.equal(ours[:, :dim], ours[:, dim : 2 * dim])


def test_time_ids_embedding_refuses_a_flat_tensor() -> None:
    with pytest.raises(InvalidArgumentError, match="time_ids"):
        time_ids_embedding(torch.zeros(6), 8, flip_sin_to_cos=True, freq_shift=0)


# ---------------------------------------------------------------- UNet outputs


@pytest.mark.parametrize(
    ("kind", "size", "timestep"),
    [
        ("sdxl", (8, 8), 999),  # python int
        ("sdxl", (9, 11), torch.tensor([10.0, 700.5])),  # odd latents, one timestep per item
        ("sdxl_refiner", (8, 8), torch.tensor(500)),  # four levels, 5 ids, 0-d tensor
        ("sdxl_refiner", (9, 11), 250.25),
        ("sdxl_inpaint", (8, 8), 1),  # 9 input channels
    ],
)
def test_unet_matches_diffusers(kind: str, size: tuple[int, int], timestep: Any) -> None:
    reference = reference_unet(UNET_KWARGS[kind]())
    unet = our_unet(reference)
    sample, context, pooled, ids = unet_inputs(unet.config, size)
    with torch.no_grad():
        theirs = reference(
            sample, timestep, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
        ours = unet(sample, timestep, context, vector_for(unet.config, pooled, ids))
        # The vector matters: another time id changes the output well beyond the tolerance.
        other = unet(sample, timestep, context, vector_for(unet.config, pooled, ids + 1.0))
    assert ours.shape == (2, 4, *size)
    assert max_diff(ours, theirs) <= UNET_ATOL
    assert max_diff(other, theirs) > 100 * UNET_ATOL


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner", "sdxl_inpaint"])
def test_unet_keys_equal_diffusers(kind: str) -> None:
    reference = reference_unet(UNET_KWARGS[kind]())
    unet = our_unet(reference)
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert "add_embedding.linear_1.weight" in ours and "add_embedding.linear_2.bias" in ours


def test_saved_fixture_unet_matches_diffusers(sdxl_path: Path) -> None:
    """The UNet of the saved tiny SDXL pipeline, read from its files by name."""
    reference = diffusers.UNet2DConditionModel.from_pretrained(sdxl_path / "unet").eval()
    config = UNetConfig.from_dict(tiny_models.read_json(sdxl_path / "unet" / "config.json"))
    with torch.device("meta"):
        unet = UNet2DCondition(config)
    tensors = read_state_dict(
        sorted((sdxl_path / "unet").glob("*.safetensors")),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    load_into(unet, tensors, name="unet")
    sample, context, pooled, ids = unet_inputs(config, (8, 8))
    with torch.no_grad():
        theirs = reference(
            sample, 321, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
        ours = unet.eval()(sample, 321, context, vector_for(config, pooled, ids))
    assert max_diff(ours, theirs) <= UNET_ATOL


def test_vector_is_required_exactly_when_the_unet_takes_one() -> None:
    sdxl = our_unet(reference_unet(tiny_models.sdxl_unet_kwargs()))
    sample, context, pooled, ids = unet_inputs(sdxl.config, (8, 8))
    with pytest.raises(InvalidArgumentError, match="needs a vector condition"):
        sdxl(sample, 1, context)
    vector = vector_for(sdxl.config, pooled, ids)
    with pytest.raises(InvalidArgumentError, match="vector has shape"):
        sdxl(sample, 1, context, vector[:, :-1])
    with pytest.raises(InvalidArgumentError, match="vector has shape"):
        sdxl(sample, 1, context, vector[:1])
    sd = UNet2DCondition(UNetConfig.from_dict(tiny_models.sd2_unet_kwargs()))
    with pytest.raises(InvalidArgumentError, match="takes no vector"):
        sd(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 7, 1024), torch.zeros(1, 8))


# ---------------------------------------------------------------- UNet config


def test_per_block_transformer_depth_follows_diffusers() -> None:
    """Down block i has depth[i] layers, the mid block depth[-1], up block i depth[-1 - i]."""
    unet = UNet2DCondition(UNetConfig.from_dict(tiny_models.sdxl_unet_kwargs()))
    assert unet.config.transformer_depths == (1, 2, 3)

    def depth(block: Any) -> list[int]:
        return [len(a.transformer_blocks) for a in block.attentions]

    assert [depth(b) for b in unet.down_blocks] == [[], [2, 2], [3, 3]]
    assert depth(unet.mid_block) == [3]
    assert [depth(b) for b in unet.up_blocks] == [[3, 3, 3], [2, 2, 2], []]
    refiner = UNetConfig.from_dict(tiny_models.sdxl_refiner_unet_kwargs())
    assert refiner.transformer_layers_per_block == 2
    assert refiner.transformer_depths == (2, 2, 2, 2)


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner", "sdxl_inpaint"])
def test_config_round_trip(kind: str) -> None:
    config = UNetConfig.from_dict(UNET_KWARGS[kind]())
    d = config.to_dict()
    assert UNetConfig.from_dict(d) == config
    assert config.vector_dim == config.projection_class_embeddings_input_dim
    reference = diffusers.UNet2DConditionModel.from_config(d)
    assert reference.config.addition_embed_type == "text_time"
    ours = {k: tuple(v.shape) for k, v in UNet2DCondition(config).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_sd_config_has_no_vector_and_ignores_unused_addition_fields() -> None:
    config = UNetConfig.from_dict({**tiny_models.sd1_unet_kwargs(), "addition_time_embed_dim": 256})
    assert config.addition_embed_type is None and config.vector_dim is None
    assert config.addition_time_embed_dim is None
    assert UNet2DCondition(config).add_embedding is None


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"projection_class_embeddings_input_dim": None}, InvalidArgumentError, "needs proj"),
        ({"addition_time_embed_dim": None}, InvalidArgumentError, "needs addition_time"),
        ({"addition_embed_type": "image"}, UnsupportedModelError, "addition_embed_type='image'"),
        ({"transformer_layers_per_block": (1, 2)}, InvalidArgumentError, "has 2 entries"),
        (
            {"transformer_layers_per_block": [[1, 1], [2, 2], [3, 3]]},
            UnsupportedModelError,
            "transformer_layers_per_block",
        ),
        ({"reverse_transformer_layers_per_block": [[3], [2], [1]]}, UnsupportedModelError, "rev"),
        ({"cross_attention_norm": "group_norm"}, UnsupportedModelError, "cross_attention_norm"),
    ],
)
def test_unusable_configs_are_refused(change: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        UNetConfig.from_dict(tiny_models.sdxl_unet_kwargs() | change)


# ---------------------------------------------------------------- text encoder with projection


def load_encoder(folder: Path) -> CLIPTextEncoder:
    """Our encoder from a ``text_encoder*/`` folder, built on meta and loaded by name."""
    config = CLIPTextConfig.from_dict(tiny_models.read_json(folder / "config.json"))
    with torch.device("meta"):
        encoder = CLIPTextEncoder(config)
    tensors = read_state_dict(
        sorted(folder.glob("*.safetensors")),
        device=torch.device("cpu"),
        dtype=torch.float32,
        rename=rename_checkpoint_key,
    )
    load_into(encoder, tensors, name=folder.name)
    return encoder.eval()


def prompt_ids(folder: Path) -> torch.Tensor:
    """Prompts tokenized by the pipeline's own tokenizer, padded to 77 as SDXL does."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    batch = tokenizer(
        ["a photo of a cat", "red", "a red cat at a photo shoot " * 3],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids: torch.Tensor = batch.input_ids
    return ids


def test_text_encoder_2_matches_transformers(sdxl_path: Path) -> None:
    reference = transformers.CLIPTextModelWithProjection.from_pretrained(
        str(sdxl_path / "text_encoder_2")
    ).eval()
    encoder = load_encoder(sdxl_path / "text_encoder_2")
    assert encoder.config.with_projection and encoder.text_projection is not None
    ids = prompt_ids(sdxl_path / "tokenizer_2")
    # The second tokenizer pads with "!", which is not the end token: the pooled state is at
    # the real end token (the highest id, as the published config's eos_token_id=2 says).
    assert int(ids[0, -1]) != int(ids[0].max())
    with torch.no_grad():
        theirs = reference(ids, output_hidden_states=True)
        ours = encoder(ids, output_hidden_states=True)
    assert ours.text_embeds is not None and ours.hidden_states is not None
    assert ours.text_embeds.shape == (3, tiny_models.SDXL_PROJECTION_DIM)
    assert max_diff(ours.text_embeds, theirs.text_embeds) <= TEXT_ATOL
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= TEXT_ATOL
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4  # embeddings + 3 layers
    # SDXL's context: the penultimate layer without the final norm; clip_skip=1 goes one deeper.
    for index in (-2, -3):
        assert max_diff(ours.hidden_states[index], theirs.hidden_states[index]) <= TEXT_ATOL
    assert max_diff(ours.hidden_states[-2], ours.hidden_states[-1]) > 100 * TEXT_ATOL
    norm = encoder.text_model.final_layer_norm
    assert max_diff(norm(ours.hidden_states[-1]), ours.last_hidden_state) == 0.0


def test_text_encoder_1_has_no_projection(sdxl_path: Path) -> None:
    reference = transformers.CLIPTextModel.from_pretrained(str(sdxl_path / "text_encoder")).eval()
    encoder = load_encoder(sdxl_path / "text_encoder")
    assert not encoder.config.with_projection and encoder.text_projection is None
    ids = prompt_ids(sdxl_path / "tokenizer")
    with torch.no_grad():
        theirs = reference(ids, output_hidden_states=True)
        ours = encoder(ids, output_hidden_states=True)
    assert ours.text_embeds is None and ours.hidden_states is not None
    assert max_diff(ours.hidden_states[-2], theirs.hidden_states[-2]) <= TEXT_ATOL
    assert max_diff(ours.pooler_output, theirs.pooler_output) <= TEXT_ATOL


def test_projection_keys_and_config_round_trip(sdxl_refiner_path: Path) -> None:
    folder = sdxl_refiner_path / "text_encoder_2"
    reference = transformers.CLIPTextModelWithProjection.from_pretrained(str(folder))
    encoder = load_encoder(folder)
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours["text_projection.weight"] == (
        tiny_models.SDXL_PROJECTION_DIM,
        tiny_models.SDXL_TEXT_HIDDEN[1],
    )
    d = encoder.config.to_dict()
    assert d["architectures"] == ["CLIPTextModelWithProjection"]
    assert CLIPTextConfig.from_dict(d) == encoder.config
    read = transformers.CLIPTextConfig.from_dict(d)
    assert read.projection_dim == tiny_models.SDXL_PROJECTION_DIM
    # transformers' default projection width when a config omits it.
    del d["projection_dim"]
    assert CLIPTextConfig.from_dict(d).projection_dim == 512
    with pytest.raises(InvalidArgumentError, match="projection_dim"):
        CLIPTextConfig(with_projection=True)


# ---------------------------------------------------------------- published sizes, on meta

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json (the keys that differ from base;
# sgm's sd_xl_refiner.yaml: model_channels 384, channel_mult [1, 2, 4, 4], 64-wide heads,
# attention at the middle two levels, transformer_depth 4, context_dim 1280, adm_in 2560).
SDXL_REFINER_UNET = SDXL_BASE_UNET | {
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

# diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the base with latents, mask, masked image.
SDXL_INPAINT_UNET = SDXL_BASE_UNET | {"in_channels": 9}

# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
SDXL_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}


def parameter_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    assert all(p.is_meta for p in module.parameters())  # nothing was allocated
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


@pytest.mark.parametrize(
    ("config", "count"),
    [
        (SDXL_BASE_UNET, 2_567_463_684),  # the published SDXL base UNet size
        (SDXL_REFINER_UNET, None),
        (SDXL_INPAINT_UNET, None),
    ],
    ids=["base", "refiner", "inpaint"],
)
def test_full_size_unet_equals_diffusers_on_meta(config: dict[str, Any], count: int | None) -> None:
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
        unet = UNet2DCondition(UNetConfig.from_dict(config))
    ours, theirs = parameter_shapes(unet), parameter_shapes(reference)
    assert ours == theirs
    total = sum(p.numel() for p in unet.parameters())
    assert total == sum(p.numel() for p in reference.parameters())
    if count is not None:
        assert total == count
    time_width = 4 * config["block_out_channels"][0]
    vector_width = config["projection_class_embeddings_input_dim"]
    assert ours["add_embedding.linear_1.weight"] == (time_width, vector_width)


def test_full_size_text_encoder_2_equals_transformers_on_meta() -> None:
    with torch.device("meta"):
        reference = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig.from_dict(SDXL_TEXT_ENCODER_2)
        )
        encoder = CLIPTextEncoder(CLIPTextConfig.from_dict(SDXL_TEXT_ENCODER_2))
    ours = parameter_shapes(encoder)
    assert ours == parameter_shapes(reference)
    assert ours["text_projection.weight"] == (1280, 1280)
    total = sum(p.numel() for p in encoder.parameters())
    assert total == sum(p.numel() for p in reference.parameters()) == 694_659_840
