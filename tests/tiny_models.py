"""Tiny random Stable Diffusion pipelines written by diffusers' own ``save_pretrained``.

The tests build these on the fly (no network): the files are the real diffusers folder
layout, so latentkit's loader reads exactly what it would read from the Hub.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/stable-diffusion-2-1's scheduler: DDIM with v-prediction.
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to 256+.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>") -> int:
    """Write a tiny CLIP BPE tokenizer (byte alphabet + a few merges); returns its vocab size."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = [
        ("a", "t</w>"),
        ("c", "at</w>"),
        ("p", "h"),
        ("o", "t"),
        ("ph", "ot"),
        ("phot", "o</w>"),
        ("r", "e"),
        ("re", "d</w>"),
    ]
    vocab_list += [a + b for a, b in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)
    tok.save_pretrained(str(folder))
    return len(vocab)


def _text_encoder(hidden: int, vocab_size: int, *, act: str = "quick_gelu") -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        hidden_act=act,
        projection_dim=hidden,
    )
    return CLIPTextModel(config).eval()


def sd1_unet_kwargs() -> dict[str, Any]:
    """An SD 1.x-shaped UNet, tiny: epsilon, int head count, conv projections, 768→32-d context."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def sd2_unet_kwargs() -> dict[str, Any]:
    """An SD 2.x-shaped UNet, tiny: per-block head counts, linear projections, 1024-d context,
    upcast attention (used with v-prediction)."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    )


def vae_kwargs() -> dict[str, Any]:
    return dict(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def depth_estimator() -> tuple[Any, Any]:
    """A tiny random DPT depth estimator and its image processor (transformers classes)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(2)
    config = DPTConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        backbone_out_indices=(0, 1, 2, 3),
        is_hybrid=False,
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return DPTForDepthEstimation(config).eval(), processor


def build_pipeline(kind: str) -> Any:
    """A diffusers pipeline with random tiny weights: ``"sd1"``, ``"sd2"``, ``"inpaint"``,
    ``"depth"``, ``"upscale"`` (see `build_upscale_pipeline`), or one of `SDXL_KINDS` (see
    `build_sdxl_pipeline`)."""
    if kind in SDXL_KINDS:
        return build_sdxl_pipeline(kind)
    if kind == "upscale":
        return build_upscale_pipeline()
    import tempfile

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.schedulers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        pad = "!" if kind == "sd2" else "<|endoftext|>"
        vocab_size = write_tokenizer(Path(tmp), pad_token=pad)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    if kind in ("sd1", "inpaint"):
        # "inpaint": SD 1.x inpainting, whose UNet reads latents, mask and masked image (9 channels).
        unet = UNet2DConditionModel(
            **{**sd1_unet_kwargs(), "in_channels": 9 if kind == "inpaint" else 4}
        )
        text_encoder = _text_encoder(32, vocab_size)
        scheduler: Any = PNDMScheduler.from_config(SD15_SCHEDULER)
    elif kind == "depth":
        # SD 2 depth: latents plus one depth channel (5), epsilon prediction, a DPT estimator.
        unet = UNet2DConditionModel(**{**sd2_unet_kwargs(), "in_channels": 5})
        text_encoder = _text_encoder(1024, vocab_size, act="gelu")
        scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
    elif kind == "sd2":
        unet = UNet2DConditionModel(**sd2_unet_kwargs())
        text_encoder = _text_encoder(1024, vocab_size, act="gelu")
        scheduler = DDIMScheduler.from_config(SD21_SCHEDULER)
    else:
        raise ValueError(kind)
    torch.manual_seed(1)
    vae = AutoencoderKL(**vae_kwargs())
    # Random weights make tiny outputs: scale the output convs up so images are not all grey.
    with torch.no_grad():
        unet.conv_out.weight.mul_(5.0)
    from diffusers import StableDiffusionInpaintPipeline

    if kind == "depth":
        from diffusers import StableDiffusionDepth2ImgPipeline

        estimator, processor = depth_estimator()
        return StableDiffusionDepth2ImgPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet.eval(),
            scheduler=scheduler,
            depth_estimator=estimator,
            feature_extractor=processor,
        )
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    return cls(
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------- SDXL

SDXL_KINDS = ("sdxl", "sdxl_refiner", "sdxl_inpaint")

# stabilityai/stable-diffusion-xl-base-1.0's scheduler (the refiner's is the same).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SDXL_TIME_EMBED_DIM = 8
"""``addition_time_embed_dim`` of the tiny SDXL UNets (256 in the real ones)."""
SDXL_TEXT_HIDDEN = (32, 48)
"""Hidden widths of the tiny ``text_encoder`` (CLIP ViT-L's role) and ``text_encoder_2``
(OpenCLIP bigG's role); they differ so a swapped concatenation shows."""
SDXL_PROJECTION_DIM = 40
"""``projection_dim`` of the tiny ``text_encoder_2``: unlike bigG (1280 = hidden) it differs
from the hidden width, so pooling the wrong tensor fails loudly."""


def sdxl_text_encoder_kwargs(which: int) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` kwargs of the tiny SDXL encoder ``which`` (1 or 2).

    Like the published configs: bos 0, eos 2 (the pre-4.31 value: the pooled token is then the
    highest id, the end token), pad 1; quick_gelu for the first, gelu and a projection for the
    second. Three layers, so ``hidden_states[-2]`` and ``[-3]`` (clip skip) are distinct layers.
    """
    vocab_size = tokenizer_vocab_size()
    kwargs: dict[str, Any] = dict(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=SDXL_TEXT_HIDDEN[which - 1],
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=vocab_size,
        hidden_act="quick_gelu" if which == 1 else "gelu",
        projection_dim=SDXL_TEXT_HIDDEN[0] if which == 1 else SDXL_PROJECTION_DIM,
    )
    return kwargs


def tokenizer_vocab_size() -> int:
    """The vocabulary size of `write_tokenizer`'s tokenizer."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_tokenizer(Path(tmp))


def sdxl_unet_kwargs(in_channels: int = 4) -> dict[str, Any]:
    """An SDXL-base-shaped UNet, tiny: three levels, the first without attention; per-block
    transformer depth and heads; linear projections; the two encoders' widths concatenated
    as context; a vector of pooled text (40) and six size/crop ids (6 x 8)."""
    return dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 3),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_PROJECTION_DIM + 6 * SDXL_TIME_EMBED_DIM,
        cross_attention_dim=sum(SDXL_TEXT_HIDDEN),
        norm_num_groups=8,
    )


def sdxl_refiner_unet_kwargs() -> dict[str, Any]:
    """An SDXL-refiner-shaped UNet, tiny: four levels, attention in the middle two; one
    transformer depth for all; context from the second encoder only; a vector of pooled text
    (40) and five ids (size, crop, aesthetic score: 5 x 8)."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4, 4),
        transformer_layers_per_block=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_PROJECTION_DIM + 5 * SDXL_TIME_EMBED_DIM,
        cross_attention_dim=SDXL_TEXT_HIDDEN[1],
        norm_num_groups=8,
    )


def build_sdxl_pipeline(kind: str) -> Any:
    """A diffusers SDXL pipeline with random tiny weights.

    ``"sdxl"``: ``StableDiffusionXLPipeline`` (two encoders, ``force_zeros_for_empty_prompt``);
    ``"sdxl_refiner"``: ``StableDiffusionXLImg2ImgPipeline`` with only ``text_encoder_2`` /
    ``tokenizer_2`` and ``requires_aesthetics_score``; ``"sdxl_inpaint"``:
    ``StableDiffusionXLInpaintPipeline`` with a 9-channel UNet. The second tokenizer pads with
    ``"!"``, the scheduler is SDXL's Euler, the VAE has SDXL's scaling factor and upcast flag.
    """
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    if kind not in SDXL_KINDS:
        raise ValueError(kind)
    refiner = kind == "sdxl_refiner"
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "1")
        write_tokenizer(Path(tmp) / "2", pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / "1"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(Path(tmp) / "2"))
    torch.manual_seed(0)
    if refiner:
        unet = UNet2DConditionModel(**sdxl_refiner_unet_kwargs())
    else:
        unet = UNet2DConditionModel(**sdxl_unet_kwargs(9 if kind == "sdxl_inpaint" else 4))
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**sdxl_text_encoder_kwargs(1))).eval()
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**sdxl_text_encoder_kwargs(2))
    ).eval()
    torch.manual_seed(3)
    vae = AutoencoderKL(**vae_kwargs(), scaling_factor=0.13025, force_upcast=True)
    # Random weights make tiny outputs: scale the output convs up so images are not all grey.
    with torch.no_grad():
        unet.conv_out.weight.mul_(5.0)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    parts: dict[str, Any] = dict(
        vae=vae.eval(),
        text_encoder=None if refiner else text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None if refiner else tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        add_watermarker=False,
    )
    if kind == "sdxl":
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            **parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    return StableDiffusionXLInpaintPipeline(
        **parts, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True
    )


# ---------------------------------------------------------------- x4 upscaler

# stabilityai/stable-diffusion-x4-upscaler's schedulers: DDIM with v-prediction for sampling,
# DDPM (epsilon) for noising the low-resolution input.
UPSCALE_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}
UPSCALE_LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small",
}


def upscale_unet_kwargs() -> dict[str, Any]:
    """An x4-upscaler-shaped UNet, tiny: 7 input channels (latents and the noised low-res
    picture), no attention at the first level, only cross-attention (no self-attention) at the
    high-resolution levels with attention, linear projections, and a class embedding of the
    noise level (``num_class_embeds`` 1000, ``class_embed_type`` None) as in the real one."""
    return dict(
        sample_size=8,
        in_channels=7,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=1000,
        norm_num_groups=8,
    )


def build_upscale_pipeline() -> Any:
    """diffusers' ``StableDiffusionUpscalePipeline`` with random tiny weights: the UNet of
    `upscale_unet_kwargs`, a 3-level VAE (factor 4) with the x4 scaling factor 0.08333, an
    SD 2-style text encoder (gelu, pad "!"), the x4 schedulers, ``max_noise_level`` 350."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer(Path(tmp), pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**upscale_unet_kwargs())
    text_encoder = _text_encoder(32, vocab_size, act="gelu")
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.08333,
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(5.0)  # random weights: images that are not all grey
        # The noise level must matter: make its embedding as large as the time embedding's.
        unet.class_embedding.weight.mul_(5.0)
    return StableDiffusionUpscalePipeline(
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        low_res_scheduler=DDPMScheduler.from_config(UPSCALE_LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler.from_config(UPSCALE_SCHEDULER),
        max_noise_level=350,
    )


# ---------------------------------------------------------------- ControlNet

CONTROLNET_KINDS = ("sd1", "sd2", "sdxl")
"""The tiny pipelines a tiny ControlNet can be built for (its encoder copies their UNet)."""


def build_controlnet(kind: str, root: Path, seed: int = 0) -> Any:
    """A diffusers ``ControlNetModel`` for the tiny pipeline ``kind`` (one of
    `CONTROLNET_KINDS`), made by ``ControlNetModel.from_unet`` from that pipeline's UNet, with
    a two-step control image embedding (the tiny VAE downsamples by 2, not 8). Every weight is
    then perturbed (``seed``), so the zero convolutions are not zero and the encoder is not
    the UNet's: a ControlNet that is ignored, or read as the UNet, changes the images."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    if kind not in CONTROLNET_KINDS:
        raise ValueError(kind)
    unet = UNet2DConditionModel.from_pretrained(str(save_pipeline(kind, root) / "unet"))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return controlnet.eval()


@cache
def _saved_controlnet(kind: str, root: str, seed: int) -> Path:
    folder = Path(root) / f"controlnet-{kind}-{seed}"
    build_controlnet(kind, Path(root), seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_controlnet(kind: str, root: Path, seed: int = 0) -> Path:
    """Write the tiny ControlNet for ``kind`` (`build_controlnet`) under ``root`` (once per
    root and seed) and return its folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, diffusers' layout)."""
    return _saved_controlnet(kind, str(root), seed)


@cache
def _saved(kind: str, root: str) -> Path:
    pipe = build_pipeline(kind)
    folder = Path(root) / kind
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_pipeline(kind: str, root: Path) -> Path:
    """Write the tiny pipeline ``kind`` under ``root`` (once per root) and return its folder."""
    return _saved(kind, str(root))


# ---------------------------------------------------------------- TAESD and an LCM-LoRA stand-in


TAESD_KWARGS: dict[str, Any] = dict(
    encoder_block_out_channels=(16, 16),
    decoder_block_out_channels=(16, 16),
    num_encoder_blocks=(1, 2),
    num_decoder_blocks=(2, 1),
)
"""A tiny diffusers ``AutoencoderTiny`` (TAESD's structure) with the tiny SD's factor 2."""


@cache
def _saved_taesd(root: str) -> Path:
    from diffusers import AutoencoderTiny

    folder = Path(root) / "taesd"
    torch.manual_seed(3)
    AutoencoderTiny(**TAESD_KWARGS).save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_taesd(root: Path) -> Path:
    """Write the tiny TAESD (`TAESD_KWARGS`, random) under ``root`` once; its folder has
    diffusers' layout, as ``madebyollin/taesd`` on the Hub."""
    return _saved_taesd(str(root))


@cache
def _saved_lora(root: str) -> Path:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd1_unet_kwargs())
    generator = torch.Generator().manual_seed(4)
    state: dict[str, torch.Tensor] = {}
    for path, layer in unet.named_modules():
        if path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            name = "lora_unet_" + path.replace(".", "_")
            down = torch.randn(4, layer.in_features, generator=generator)
            state[f"{name}.lora_down.weight"] = down * 0.05
            state[f"{name}.lora_up.weight"] = torch.randn(
                layer.out_features, 4, generator=generator
            )
            state[f"{name}.alpha"] = torch.tensor(4.0)
    folder = Path(root) / "lora-sd1"
    folder.mkdir()
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def save_lora(root: Path) -> Path:
    """Write a random rank-4 LoRA (kohya keys) on the tiny SD 1.x UNet's attention
    projections under ``root`` once, as ``pytorch_lora_weights.safetensors`` in a folder
    (the layout of LCM-LoRA's Hub repo)."""
    return _saved_lora(str(root))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
