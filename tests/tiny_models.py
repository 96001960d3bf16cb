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
    """A diffusers pipeline with random tiny weights: ``"sd1"``, ``"sd2"`` or ``"inpaint"``."""
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


@cache
def _saved(kind: str, root: str) -> Path:
    pipe = build_pipeline(kind)
    folder = Path(root) / kind
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_pipeline(kind: str, root: Path) -> Path:
    """Write the tiny pipeline ``kind`` under ``root`` (once per root) and return its folder."""
    return _saved(kind, str(root))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
