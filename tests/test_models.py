"""latentkit's UNet and VAE against diffusers' on identical weights and inputs (fp32, CPU).

diffusers is only the reference here: each test builds a tiny diffusers model with seeded
random weights, builds ours from its config, loads its state dict by name (strict) and
compares outputs.
"""

from __future__ import annotations

from typing import Any

import diffusers as _diffusers
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from latentkit.errors import UnsupportedModelError
from latentkit.models.autoencoder import AutoencoderKL, AutoencoderKLConfig, rename_legacy_key
from latentkit.models.layers import timestep_embedding
from latentkit.models.unet import UNet2DCondition, UNetConfig

diffusers: Any = _diffusers  # untyped; the reference is used as Any throughout

ATOL = 1e-5
"""Largest absolute difference allowed between our output and diffusers' (fp32, CPU)."""

# Stable Diffusion's block layout (three cross-attention levels, then one without), tiny widths.
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def sd1_kwargs(in_channels: int = 4) -> dict[str, Any]:
    """SD 1.x-shaped: int `attention_head_dim` (read as a head count), conv projections."""
    return dict(
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        attention_head_dim=4,
        cross_attention_dim=24,
        norm_num_groups=8,
        sample_size=8,
    )


def sd2_kwargs(in_channels: int = 4) -> dict[str, Any]:
    """SD 2.x-shaped: per-block head counts, linear projections, upcast attention, 1024-d text."""
    return dict(
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        attention_head_dim=(2, 4, 8, 8),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
        transformer_layers_per_block=2,
        norm_num_groups=8,
        sample_size=8,
    )


UNET_KWARGS = {"sd1": sd1_kwargs, "sd2": sd2_kwargs}


def vae_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    return kwargs | overrides


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def reference_unet(kwargs: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**kwargs).eval()


def our_unet(reference: Any) -> UNet2DCondition:
    """Built on meta and loaded with assign=True, exactly as the loader does."""
    with torch.device("meta"):
        unet = UNet2DCondition(UNetConfig.from_dict(dict(reference.config)))
    unet.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return unet.eval()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet_pair(request: pytest.FixtureRequest) -> tuple[Any, UNet2DCondition]:
    reference = reference_unet(UNET_KWARGS[request.param]())
    return reference, our_unet(reference)


# ---------------------------------------------------------------- timestep embedding


@pytest.mark.parametrize(("dim", "flip", "shift"), [(32, True, 0), (33, False, 1), (320, True, 0)])
def test_timestep_embedding_matches_reference(dim: int, flip: bool, shift: int) -> None:
    t = torch.tensor([0, 1, 499, 999])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert max_diff(ours, theirs) == 0.0


# ---------------------------------------------------------------- UNet


@pytest.mark.parametrize(
    ("kind", "in_channels", "size", "timestep"),
    [
        ("sd1", 4, (8, 8), 999),  # python int
        ("sd1", 9, (9, 11), torch.tensor(500.5)),  # inpainting channels, odd latents, 0-d float
        ("sd2", 4, (8, 8), torch.tensor([10, 700])),  # one timestep per batch item
        ("sd2", 5, (9, 11), 250.25),  # depth channels, odd latents, python float
    ],
)
def test_unet_matches_diffusers(
    kind: str, in_channels: int, size: tuple[int, int], timestep: Any
) -> None:
    kwargs = UNET_KWARGS[kind](in_channels)
    reference = reference_unet(kwargs)
    unet = our_unet(reference)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, in_channels, *size, generator=gen)
    context = torch.randn(2, 7, kwargs["cross_attention_dim"], generator=gen)
    with torch.no_grad():
        theirs = reference(sample, timestep, context).sample
        ours = unet(sample, timestep, context)
    assert ours.shape == (2, 4, *size)
    assert max_diff(ours, theirs) <= ATOL


def test_unet_state_dict_keys_equal_diffusers(unet_pair: tuple[Any, UNet2DCondition]) -> None:
    reference, unet = unet_pair
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs


def test_unet_is_built_on_meta_without_data() -> None:
    config = UNetConfig.from_dict(sd1_kwargs())
    with torch.device("meta"):
        unet = UNet2DCondition(config)
    assert all(p.is_meta for p in unet.parameters())
    assert list(unet.buffers()) == []


@pytest.mark.parametrize(
    "config",
    [
        # runwayml / stable-diffusion-v1-5 unet/config.json
        {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.6.0",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": list(SD_DOWN),
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": list(SD_UP),
        },
        # stabilityai / stable-diffusion-2-1 unet/config.json (the keys that differ from 1.5)
        {
            "_class_name": "UNet2DConditionModel",
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "dual_cross_attention": False,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "resnet_time_scale_shift": "default",
            "sample_size": 96,
            "upcast_attention": True,
            "use_linear_projection": True,
        },
    ],
    ids=["sd15", "sd21"],
)
def test_full_size_unet_keys_equal_diffusers_on_meta(config: dict[str, Any]) -> None:
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
        unet = UNet2DCondition(UNetConfig.from_dict(config))
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_attention_head_dim_is_read_as_head_count() -> None:
    def heads(d: dict[str, Any]) -> tuple[int, ...]:
        return UNetConfig.from_dict(d).num_attention_heads

    assert heads({"attention_head_dim": [5, 10, 20, 20]}) == (5, 10, 20, 20)
    assert heads({"attention_head_dim": 8}) == (8, 8, 8, 8)
    assert heads({"attention_head_dim": 8, "num_attention_heads": 4}) == (4, 4, 4, 4)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("addition_embed_type", "text"),  # SDXL's "text_time" is supported, others not
        ("transformer_layers_per_block", [[1, 2]] * 4),  # per layer: asymmetric UNets
        ("class_embed_type", "timestep"),
        ("time_cond_proj_dim", 256),  # LCM distilled
        ("encoder_hid_dim", 32),
        ("resnet_time_scale_shift", "scale_shift"),
        ("conv_in_kernel", 7),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["AttnDownBlock2D", *SD_DOWN[1:]]),
    ],
)
def test_unet_config_rejects_unsupported_settings(key: str, value: Any) -> None:
    config = sd1_kwargs() | {key: value}
    with pytest.raises(UnsupportedModelError) as info:
        UNetConfig.from_dict(config)
    message = str(info.value)
    assert key in message
    shown = value[0] if key == "down_block_types" else value
    assert repr(shown) in message


# ---------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae_pair() -> tuple[Any, AutoencoderKL]:
    return _vae_pair(vae_kwargs())


def _vae_pair(kwargs: dict[str, Any]) -> tuple[Any, AutoencoderKL]:
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**kwargs).eval()
    with torch.device("meta"):
        vae = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(reference.config)))
    assert all(p.is_meta for p in vae.parameters())
    vae.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return reference, vae.eval()


def test_vae_posterior_matches_diffusers(vae_pair: tuple[Any, AutoencoderKL]) -> None:
    reference, vae = vae_pair
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        theirs = reference.encode(images).latent_dist
        ours = vae.posterior(images)
        assert max_diff(ours.mean, theirs.mean) <= ATOL
        assert max_diff(ours.logvar, theirs.logvar) <= ATOL
        assert max_diff(ours.std, theirs.std) <= ATOL
        assert torch.equal(ours.mode(), ours.mean)
        sampled = theirs.sample(torch.Generator().manual_seed(3))
        assert max_diff(ours.sample(torch.Generator().manual_seed(3)), sampled) <= ATOL
        latents = vae.encode(images, generator=torch.Generator().manual_seed(3))
    assert latents.shape == (2, 4, 8, 6)
    assert max_diff(latents, sampled * reference.config.scaling_factor) <= ATOL


def test_vae_decode_matches_diffusers(vae_pair: tuple[Any, AutoencoderKL]) -> None:
    reference, vae = vae_pair
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = reference.decode(latents / reference.config.scaling_factor).sample
        ours = vae.decode(latents)
    assert ours.shape == (2, 3, 32, 24)
    assert max_diff(ours, theirs) <= ATOL


def test_vae_properties(vae_pair: tuple[Any, AutoencoderKL]) -> None:
    _, vae = vae_pair
    assert (vae.scale_factor, vae.latent_channels, vae.scaling_factor) == (4, 4, 0.18215)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}],
    ids=["default", "no-attention-no-quant"],
)
def test_vae_state_dict_keys_equal_diffusers(overrides: dict[str, Any]) -> None:
    reference, vae = _vae_pair(vae_kwargs(**overrides))
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_diff(vae.decode(latents), reference.decode(latents / 0.18215).sample) <= ATOL


def test_legacy_attention_keys_are_renamed(vae_pair: tuple[Any, AutoencoderKL]) -> None:
    reference, _ = vae_pair
    current = set(reference.state_dict())
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def legacy(key: str) -> str:
        if ".mid_block.attentions." not in key:
            return key
        for new, old in old_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        return key

    legacy_keys = {legacy(k) for k in current}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy_keys
    assert {rename_legacy_key(k) for k in legacy_keys} == current
    # Keys that are already current, and UNet attention keys, pass through unchanged.
    unet_key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert rename_legacy_key(unet_key) == unet_key
    assert all(rename_legacy_key(k) == k for k in current)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("shift_factor", 0.1159),
        ("down_block_types", ["AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 2),
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_vae_config_rejects_unsupported_settings(key: str, value: Any) -> None:
    with pytest.raises(UnsupportedModelError, match=key):
        AutoencoderKLConfig.from_dict(vae_kwargs(**{key: value}))
