"""Text conditioning: a CLIP text encoder's last hidden states as cross-attention context."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from latentkit.conditioners import register
from latentkit.protocols import ConditionTarget

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer


@register("text")
class TextConditioner:
    """Prompts → CLIP token embeddings, the context of the UNet's cross-attention
    (Rombach et al. 2022, eq. 3: ``K = W_K · τθ(y)``, ``V = W_V · τθ(y)``)."""

    name: ClassVar[str] = "text"
    target: ClassVar[ConditionTarget] = "cross_attention"

    def __init__(self, *, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def encode(
        self, value: Sequence[str], *, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Encode a batch of prompts to (B, 77, D) embeddings."""
        prompts = list(value)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        full = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > self.max_length:
            warnings.warn(
                f"a prompt is longer than the text encoder's {self.max_length} tokens; "
                "the end was cut off",
                stacklevel=3,
            )
        # Most CLIP encoders used by Stable Diffusion were trained without an attention mask
        # (padding tokens are attended to); honour the config of those that were.
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden: torch.Tensor = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[
            0
        ]
        return hidden.to(dtype=dtype, device=device)
