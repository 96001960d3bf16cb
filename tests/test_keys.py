"""The original (ldm/sgm) ↔ diffusers key maps of `latentkit.checkpoints.keys`.

The strongest check: a tiny diffusers pipeline's weights, written in the original layout by
our inverse map, load through diffusers' own single-file converter (``from_single_file``)
to exactly the pipeline's weights, and through our forward map to the same. Both converters
then agree on every key of the layout. Spot checks name published keys of the full-size
SD 1.5 and SDXL UNets, and the map is checked to be one-to-one on the full-size networks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import tiny_models
import torch
from safetensors.torch import save_file

from latentkit.checkpoints import keys as K
from latentkit.errors import UnsupportedModelError, WeightMismatchError
from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from latentkit.models.text_encoder import rename_checkpoint_key
from latentkit.models.unet import UNet2DCondition, UNetConfig

FAMILY = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl-base", "sdxl_refiner": "sdxl-refiner"}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def our_state(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's weights under our names (``component.key``): diffusers' keys for the
    UNet and VAE; transformers 5 drops CLIPTextModel's ``text_model.`` level, ours keeps it."""
    state: dict[str, torch.Tensor] = {}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            renamed = rename_checkpoint_key(key) if name.startswith("text") else key
            if renamed is not None:
                state[f"{name}.{renamed}"] = tensor
    return state


def layout_of(pipe: Any, family: K.Family, *, file_layers: int | None = None) -> K.CheckpointLayout:
    unet = K.UNetLayout.from_config(UNetConfig.from_dict(dict(pipe.unet.config)))
    vae = K.VAELayout.from_config(AutoencoderKLConfig.from_dict(dict(pipe.vae.config)))
    open_clip = None
    if family != "sd1":
        encoder = pipe.text_encoder if family == "sd2" else pipe.text_encoder_2
        layers = encoder.config.num_hidden_layers
        open_clip = K.OpenCLIPLayout(
            layers=layers, file_layers=file_layers, projection=family != "sd2"
        )
    return K.checkpoint_layout(family, unet=unet, vae=vae, open_clip=open_clip)


class Written(NamedTuple):
    family: K.Family
    pipe: Any
    root: Path
    layout: K.CheckpointLayout
    ours: dict[str, torch.Tensor]
    original: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=list(FAMILY))
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Written:
    """A tiny pipeline of each family, its diffusers folder and its original single file."""
    kind = request.param
    family: K.Family = FAMILY[kind]  # type: ignore[assignment]
    pipe = tiny_models.build_pipeline(kind)
    root = tmp_path_factory.mktemp(kind)
    pipe.save_pretrained(str(root / "folder"), safe_serialization=True)
    layout = layout_of(pipe, family)
    ours = our_state(pipe)
    original = {k: v.contiguous() for k, v in K.to_original(ours, layout=layout)}
    save_file(original, str(root / "model.safetensors"))
    return Written(family, pipe, root, layout, ours, original)


def test_diffusers_single_file_loader_reads_our_original_layout(written: Written) -> None:
    """diffusers' converter maps the file we wrote to exactly the pipeline's weights."""
    import diffusers

    family, pipe, root = written.family, written.pipe, written.root
    cls = {
        "sd1": diffusers.StableDiffusionPipeline,
        "sd2": diffusers.StableDiffusionPipeline,
        "sdxl-base": diffusers.StableDiffusionXLPipeline,
        "sdxl-refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
    }[family]
    loaded = cls.from_single_file(
        str(root / "model.safetensors"), config=str(root / "folder"), local_files_only=True
    )
    compared = 0
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        expected, got = module.state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(tensor, got[key]), f"{name}.{key}"
            compared += 1
    assert compared > 300


def test_convert_reads_the_original_layout_back_bit_identical(written: Written) -> None:
    back = dict(K.convert(written.original, layout=written.layout))
    assert back.keys() == written.ours.keys()
    for key, tensor in written.ours.items():
        assert torch.equal(back[key], tensor), key


def test_detect_layout_reads_family_channels_and_layout(written: Written) -> None:
    family, pipe, layout = written.family, written.pipe, written.layout
    shapes = {k: tuple(v.shape) for k, v in written.original.items()}
    if family == "sd2":
        # SD 2.x files carry one more OpenCLIP layer than the encoder uses (the penultimate
        # layer's output conditions the UNet): add it, and see it dropped.
        prefix = "cond_stage_model.model.transformer.resblocks."
        layers = pipe.text_encoder.config.num_hidden_layers
        extra = {
            k.replace(f"{prefix}0.", f"{prefix}{layers}."): v
            for k, v in shapes.items()
            if k.startswith(f"{prefix}0.")
        }
        shapes |= extra
        layout = layout_of(pipe, family, file_layers=layers + 1)
        assert K.plan(extra, layout=layout) == ([], [])  # known, and skipped on purpose
    detected = K.detect_layout(shapes)
    assert detected.family == family
    assert detected.in_channels == pipe.unet.config.in_channels
    assert detected.context_dim == pipe.unet.config.cross_attention_dim
    assert detected.layout == layout


def test_detect_layout_of_inpainting_and_unet_only_files() -> None:
    layout = K.UNetLayout(levels=2, layers_per_block=1)
    unet = K.unet_keys(layout)
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 1024),
        "model.diffusion_model.input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "model.diffusion_model.input_blocks.3.0.in_layers.2.weight": (64, 32, 3, 3),
        **{
            f"model.diffusion_model.output_blocks.{i}.0.in_layers.2.weight": (32, 32, 3, 3)
            for i in range(4)
        },
        "model.diffusion_model.output_blocks.2.1.proj_in.weight": (32, 32),
    }
    detected = K.detect_layout(shapes)
    assert (detected.family, detected.in_channels, detected.context_dim) == ("sd2", 9, 1024)
    assert detected.layout.component("unet").keys == unet
    assert [c.component for c in detected.layout.components] == ["unet", "vae", "text_encoder"]


def test_detect_layout_refuses_diffusers_layout_and_other_models() -> None:
    with pytest.raises(UnsupportedModelError, match="diffusers layout"):
        K.detect_layout({"down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)})
    with pytest.raises(UnsupportedModelError, match="none of"):
        K.detect_layout(
            {
                "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
                    8,
                    4096,
                ),
            }
        )


# Published key names of the full-size networks, each with ours, written from the layout
# rules (SD 1.5: 4 levels x 2 layers, attention on the top three; SDXL: 3 levels x 2 layers,
# attention on the lower two, depths 1/2/10).
SD15_NAMES = {
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "input_blocks.2.0.in_layers.0.bias": "down_blocks.0.resnets.1.norm1.bias",
    "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
    "input_blocks.11.0.out_layers.3.weight": "down_blocks.3.resnets.1.conv2.weight",
    "middle_block.1.proj_out.weight": "mid_block.attentions.0.proj_out.weight",
    "middle_block.2.emb_layers.1.bias": "mid_block.resnets.1.time_emb_proj.bias",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.3.1.norm.weight": "up_blocks.1.attentions.0.norm.weight",
    "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
    "output_blocks.11.0.skip_connection.weight": "up_blocks.3.resnets.2.conv_shortcut.weight",
    "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight",
    "time_embed.2.weight": "time_embedding.linear_2.weight",
    "out.0.weight": "conv_norm_out.weight",
    "out.2.bias": "conv_out.bias",
}
SDXL_NAMES = {
    "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
    "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
    "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.weight",
    "middle_block.1.transformer_blocks.9.norm3.bias": "mid_block.attentions.0.transformer_blocks.9.norm3.bias",
    "output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
    "output_blocks.8.0.skip_connection.bias": "up_blocks.2.resnets.2.conv_shortcut.bias",
    "label_emb.0.0.weight": "add_embedding.linear_1.weight",
    "label_emb.0.2.bias": "add_embedding.linear_2.bias",
}
SDXL_CONFIG = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.mark.parametrize(
    ("config", "names"),
    [({"cross_attention_dim": 768}, SD15_NAMES), (SDXL_CONFIG, SDXL_NAMES)],
    ids=["sd15", "sdxl"],
)
def test_full_size_unet_names_and_one_to_one(config: dict[str, Any], names: dict[str, str]) -> None:
    unet_config = UNetConfig.from_dict(config)
    keys = K.unet_keys(K.UNetLayout.from_config(unet_config))
    for original, ours in names.items():
        assert keys.ours(original) == (ours,), original
        assert keys.original(ours) == original, ours
    with torch.device("meta"):
        ours_keys = list(UNet2DCondition(unet_config).state_dict())
    originals = [keys.original(k) for k in ours_keys]
    assert None not in originals
    assert len(set(originals)) == len(ours_keys)  # one to one
    assert [keys.ours(o) for o in originals] == [(k,) for k in ours_keys]  # type: ignore[arg-type]
    assert K.UNetLayout.from_keys(originals) == K.UNetLayout.from_config(unet_config)  # type: ignore[arg-type]


def test_full_size_vae_is_one_to_one() -> None:
    config = AutoencoderKLConfig.from_dict(
        {
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        }
    )
    keys = K.vae_keys(K.VAELayout.from_config(config))
    with torch.device("meta"):
        ours_keys = list(AutoencoderKL(config).state_dict())
    originals = [keys.original(k) for k in ours_keys]
    assert None not in originals and len(set(originals)) == len(ours_keys)
    assert keys.ours("decoder.up.0.block.0.nin_shortcut.weight") == (
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
    )
    assert keys.ours("encoder.mid.attn_1.proj_out.weight") == (
        "encoder.mid_block.attentions.0.to_out.0.weight",
    )
    assert K.VAELayout.from_keys(originals) == K.VAELayout.from_config(config)  # type: ignore[arg-type]


def test_open_clip_split_and_transpose_are_views_and_exact() -> None:
    """The fused q/k/v splits into row blocks of the same storage (no copy); the projection
    is transposed; an SD 2.x file's last layer and projection are skipped on purpose."""
    width = 8
    in_proj = torch.randn(3 * width, width)
    projection = torch.randn(width, 5)
    prefix = "conditioner.embedders.1.model."
    layout = K.checkpoint_layout(
        "sdxl-base",
        unet=K.UNetLayout(levels=2, layers_per_block=1),
        vae=K.VAELayout(levels=2, layers_per_block=1),
        open_clip=K.OpenCLIPLayout(layers=1, projection=True),
    )
    state = {
        f"{prefix}transformer.resblocks.0.attn.in_proj_weight": in_proj,
        f"{prefix}text_projection": projection,
    }
    out = dict(K.convert(state, layout=layout))
    layer = "text_encoder_2.text_model.encoder.layers.0.self_attn"
    for i, part in enumerate("qkv"):
        piece = out[f"{layer}.{part}_proj.weight"]
        assert torch.equal(piece, in_proj[i * width : (i + 1) * width])
        assert piece.untyped_storage().data_ptr() == in_proj.untyped_storage().data_ptr()
    assert torch.equal(out["text_encoder_2.text_projection.weight"], projection.T)
    assert dict(K.to_original(out, layout=layout)).keys() == state.keys()
    sd2 = K.checkpoint_layout(
        "sd2",
        unet=K.UNetLayout(levels=2, layers_per_block=1),
        vae=K.VAELayout(levels=2, layers_per_block=1),
    )
    for skipped in (
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight",
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
        "alphas_cumprod",
    ):
        assert sd2.ours(skipped) == (), skipped
    assert sd2.ours("cond_stage_model.model.transformer.resblocks.22.ln_2.bias") == (
        "text_encoder.text_model.encoder.layers.22.layer_norm2.bias",
    )


class _Unreadable(Mapping[str, torch.Tensor]):
    """Keys without tensors: reading one fails the test."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = keys

    def __getitem__(self, key: str) -> torch.Tensor:
        raise AssertionError(f"read {key}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def test_unknown_keys_are_refused_before_any_tensor_is_read() -> None:
    layout = K.checkpoint_layout(
        "sd1",
        unet=K.UNetLayout(levels=2, layers_per_block=1),
        vae=K.VAELayout(levels=2, layers_per_block=1),
    )
    state = _Unreadable(
        [
            "model.diffusion_model.out.2.weight",
            "model.diffusion_model.input_blocks.9.0.in_layers.0.weight",  # no 9th block
            "cond_stage_model.transformer.text_model.embeddings.position_ids",
            "something.else",
        ]
    )
    with pytest.raises(WeightMismatchError, match=r"2 tensors .*input_blocks\.9.*something\.else"):
        next(K.convert(state, layout=layout))
    known, unknown = K.plan(state, layout=layout)
    assert known == ["model.diffusion_model.out.2.weight"]
    assert len(unknown) == 2
    skipping = K.convert(
        {"model.diffusion_model.out.2.weight": torch.ones(1), "something.else": torch.ones(1)},
        layout=layout,
        unknown="skip",
    )
    assert [k for k, _ in skipping] == ["unet.conv_out.weight"]


def test_old_clip_files_without_text_model_level() -> None:
    keys = K.clip_keys()
    assert keys.ours("encoder.layers.0.mlp.fc1.weight") == (
        "text_model.encoder.layers.0.mlp.fc1.weight",
    )
    assert keys.ours("text_model.embeddings.position_ids") == ()
    assert keys.original("text_model.encoder.layers.0.mlp.fc1.weight") == (
        "text_model.encoder.layers.0.mlp.fc1.weight"
    )
