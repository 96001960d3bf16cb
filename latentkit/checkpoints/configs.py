"""The component configs of the published Stable Diffusion families, as data.

A single-file checkpoint holds weights only: these are the configs diffusers' repos publish
(stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stable-diffusion-xl-base-1.0 and
-refiner-1.0), so such a file loads offline with nothing else on disk. The CLIP tokenizers
are built from the BPE merges latentkit ships (``assets/clip``).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

from latentkit.checkpoints.keys import Family
from latentkit.tokenizer import CLIPTokenizer, byte_alphabet

_SD_UNET: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "norm_num_groups": 32,
    "out_channels": 4,
}
_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_CLIP_L: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
_OPEN_CLIP_H: dict[str, Any] = _CLIP_L | {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,  # SD 2.x conditions on the penultimate of OpenCLIP's 24 layers
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "pad_token_id": 1,
}
_OPEN_CLIP_G: dict[str, Any] = _CLIP_L | {
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "pad_token_id": 1,
}
_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
_SDXL_UNET: dict[str, Any] = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}

FAMILIES: dict[Family, dict[str, Any]] = {
    "sd1": {
        "model_index": {"_class_name": "StableDiffusionPipeline"},
        "unet": _SD_UNET | {"attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "scheduler": _SCHEDULER | {"_class_name": "PNDMScheduler", "skip_prk_steps": True},
    },
    "sd2": {
        "model_index": {"_class_name": "StableDiffusionPipeline"},
        "unet": _SD_UNET
        | {
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "sample_size": 96,
        },
        "vae": _VAE | {"sample_size": 768},
        "text_encoder": _OPEN_CLIP_H,
        "scheduler": _SCHEDULER
        | {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    },
    "sdxl-base": {
        "model_index": {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
        },
        "unet": _SDXL_UNET,
        "vae": _VAE | {"scaling_factor": 0.13025, "sample_size": 1024},
        "text_encoder": _CLIP_L,
        "text_encoder_2": _OPEN_CLIP_G,
        "scheduler": _SCHEDULER
        | {
            "_class_name": "EulerDiscreteScheduler",
            "interpolation_type": "linear",
            "timestep_spacing": "leading",
            "use_karras_sigmas": False,
        },
    },
    "sdxl-refiner": {
        "model_index": {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
        },
        "unet": _SDXL_UNET
        | {
            "attention_head_dim": [6, 12, 24, 24],
            "block_out_channels": [384, 768, 1536, 1536],
            "cross_attention_dim": 1280,
            "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
            "projection_class_embeddings_input_dim": 2560,
            "transformer_layers_per_block": 4,
        },
        "vae": _VAE | {"scaling_factor": 0.13025, "sample_size": 1024},
        "text_encoder_2": _OPEN_CLIP_G,
        "scheduler": _SCHEDULER
        | {
            "_class_name": "EulerDiscreteScheduler",
            "interpolation_type": "linear",
            "timestep_spacing": "leading",
            "use_karras_sigmas": False,
        },
    },
}
"""Per checkpoint family: ``model_index`` entries, and each component's diffusers config."""

MERGES = Path(__file__).parent.parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
"""CLIP's byte-pair merges (OpenAI, MIT licence), from which both CLIP vocabularies are built."""


@functools.cache
def clip_tokenizer(*, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's tokenizer (49,408 tokens), built as OpenAI's ``SimpleTokenizer`` builds its
    vocabulary: the 256 byte symbols, the same with the end-of-word mark, one token per merge
    (the first 48,894 of the file), then the start and end tokens. OpenCLIP's (SD 2.x,
    SDXL's second encoder) differs only in its padding token, ``"!"``."""
    lines = gzip.decompress(MERGES.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(byte_alphabet())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[(a, b) for a, b in merges],
        model_max_length=77,
        special_tokens={
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad_token,
        },
    )
