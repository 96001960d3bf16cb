"""Text conditioning: CLIP hidden states as the UNet's cross-attention context.

Prompts of any length are encoded in chunks of the encoder's window (75 tokens between a
start and an end token) and the chunks' hidden states concatenated, so nothing is cut
off. A1111-style emphasis scales the hidden states of the tokens it covers:
``(word)`` × 1.1, ``[word]`` ÷ 1.1, ``(word:1.3)`` × 1.3, nested brackets multiply, and
``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets. A plain prompt of at most 75 tokens
encodes exactly as diffusers encodes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from latentkit.conditioners import register
from latentkit.errors import InvalidArgumentError
from latentkit.protocols import ConditionTarget, Generators

if TYPE_CHECKING:
    import transformers
    from transformers import CLIPTextModel

    from latentkit.models.text_encoder import CLIPTextEncoder
    from latentkit.tokenizer import CLIPTokenizer

EMPHASIS = 1.1
"""The factor of one pair of round brackets (and the divisor of square ones), as in A1111."""

MAX_NESTING = 32
"""Deepest bracket nesting a prompt may have (1.1 ** 32 ≈ 21: far beyond any useful weight)."""
MAX_WEIGHT = 100.0
"""Largest magnitude of an explicit ``(word:weight)``."""

_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash: literal text
    r"|\(|\["  # an opening bracket
    r"|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)"  # ":1.3)" closes a round bracket with a weight
    r"|\)|\]"  # a closing bracket
    r"|[^\\()\[\]:]+|:|\\",  # plain text
)


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """Split ``prompt`` into ``(text, weight)`` runs by A1111's emphasis syntax.

    >>> parse_emphasis("a (red:1.5) cat [on a mat]")
    [('a ', 1.0), ('red', 1.5), (' cat ', 1.0), ('on a mat', 0.9090909090909091)]
    """
    runs: list[list[str | float]] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] = float(run[1]) * factor

    for match in _TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if len(open_round) + len(open_square) > MAX_NESTING:
            # Each closing bracket rescales what it encloses: unbounded nesting is quadratic.
            raise InvalidArgumentError(
                f"the prompt nests brackets more than {MAX_NESTING} deep; escape literal "
                "brackets as \\( \\) \\[ \\]"
            )
        if weight is not None and not (
            math.isfinite(float(weight)) and abs(float(weight)) <= MAX_WEIGHT
        ):
            raise InvalidArgumentError(
                f"emphasis weight {weight} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]"
            )
        if text.startswith("\\") and len(text) == 2:
            runs.append([text[1], 1.0])
        elif text == "(":
            open_round.append(len(runs))
        elif text == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale(open_round.pop(), float(weight))
        elif text == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif text == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        else:
            runs.append([text, 1.0])
    # Brackets left open apply to the rest of the prompt, as in A1111.
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)
    merged: list[tuple[str, float]] = []
    for text, weight in ((str(t), float(w)) for t, w in runs):
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


TextLayer = Literal["last", "penultimate"]
"""Which hidden states condition the UNet: the last layer's through the final layer norm
(SD 1.x/2.x) or the penultimate layer's without it (SDXL)."""


PromptSyntax = Literal["a1111", "plain"]
"""How prompts are read: A1111's emphasis brackets, or plain text."""


@dataclass(frozen=True)
class TextEmbeddings:
    """What text encoders give the denoiser: per-token states and a pooled vector."""

    hidden: torch.Tensor
    """(B, tokens, D): the cross-attention context."""
    pooled: torch.Tensor | None = None
    """(B, P): the projected end-token embedding (SDXL's ``text_embeds``), if the encoder has one."""


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of a batch of prompts, in chunks of the encoder's window.

    ``ids``, ``weights`` and ``mask`` are (batch, chunks, window); every chunk starts with
    the start token and ends its text with the end token, then padding.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor

    @property
    def chunks(self) -> int:
        return int(self.ids.shape[1])


@register("text")
class TextConditioner:
    """Prompts → CLIP token embeddings, the context of the UNet's cross-attention
    (Rombach et al. 2022, eq. 3: ``K = W_K · τθ(y)``, ``V = W_V · τθ(y)``)."""

    name: ClassVar[str] = "text"
    target: ClassVar[ConditionTarget] = "cross_attention"

    def __init__(
        self,
        *,
        tokenizer: CLIPTokenizer | transformers.CLIPTokenizer,
        text_encoder: CLIPTextEncoder | CLIPTextModel,
        component: str = "text_encoder",
    ) -> None:
        """``tokenizer`` is latentkit's `CLIPTokenizer` (what `load_pipeline` builds) or
        transformers' (e.g. from `latentkit.lab.training.build_word_tokenizer`); ``text_encoder``
        is latentkit's `CLIPTextEncoder` or a transformers ``CLIPTextModel`` (e.g. one
        being trained)."""
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.component = component
        """The model component this encoder is (``text_encoder`` or ``text_encoder_2``)."""

    @property
    def window(self) -> int:
        """Tokens the encoder sees at once (77 for CLIP), start and end tokens included."""
        return int(self.tokenizer.model_max_length)

    @property
    def width(self) -> int:
        """Width of the hidden states (768 for SD 1.x, 1024 for SD 2.x)."""
        return int(self.text_encoder.config.hidden_size)

    def encode(
        self,
        value: Sequence[str],
        *,
        device: torch.device,
        dtype: torch.dtype,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Encode a batch of prompts to (B, 77 × chunks, D) hidden states (deterministic)."""
        return self.embed(self.tokenize(value), device=device, dtype=dtype)

    def tokenize(
        self, prompts: Sequence[str], *, chunks: int = 1, syntax: PromptSyntax = "a1111"
    ) -> PromptTokens:
        """Token ids, emphasis weights and masks of ``prompts``, in at least ``chunks`` chunks
        (all prompts get as many as the longest needs; extra chunks encode an empty prompt)."""
        inner = self.window - 2
        per_prompt = [self._tokens_and_weights(p, syntax) for p in prompts]
        count = max([chunks, *((len(ids) + inner - 1) // inner for ids, _ in per_prompt)])
        start, end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), count, self.window), pad, dtype=torch.long)
        weights = torch.ones(ids.shape)
        mask = torch.zeros(ids.shape, dtype=torch.long)
        for b, (tokens, token_weights) in enumerate(per_prompt):
            for c in range(count):
                piece = tokens[c * inner : (c + 1) * inner]
                n = len(piece)
                ids[b, c, : n + 2] = torch.tensor([start, *piece, end])
                weights[b, c, 1 : n + 1] = torch.tensor(token_weights[c * inner : c * inner + n])
                mask[b, c, : n + 2] = 1
        return PromptTokens(ids=ids, weights=weights, mask=mask)

    def embed(
        self,
        tokens: PromptTokens,
        *,
        device: torch.device,
        dtype: torch.dtype,
        clip_skip: int | None = None,
        layer: TextLayer = "last",
    ) -> torch.Tensor:
        """Hidden states (B, window × chunks, D) of tokenized prompts (see `encode_tokens`)."""
        return self.encode_tokens(
            tokens, device=device, dtype=dtype, clip_skip=clip_skip, layer=layer
        ).hidden

    def encode_tokens(
        self,
        tokens: PromptTokens,
        *,
        device: torch.device,
        dtype: torch.dtype,
        clip_skip: int | None = None,
        layer: TextLayer = "last",
    ) -> TextEmbeddings:
        """Hidden states (B, window × chunks, D) and, for an encoder with a projection, the
        pooled embedding (B, P) of each prompt's first chunk.

        ``layer="last"`` (SD 1.x/2.x): the last layer's states through the final layer norm;
        ``clip_skip=k`` takes the states ``k`` layers before the last, through the final
        layer norm (A1111's and diffusers' convention; 1 = the penultimate layer).
        ``layer="penultimate"`` (SDXL, Podell et al. 2023 sec. 2.1): the penultimate layer's
        states without the final norm; ``clip_skip=k`` goes ``k`` layers further back.
        """
        batch, count, window = tokens.ids.shape
        ids = tokens.ids.reshape(batch * count, window).to(device)
        # Most CLIP encoders used by Stable Diffusion were trained without an attention
        # mask (padding is attended to); honour the config of those that were.
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.mask.reshape(batch * count, window).to(device)
        layers = self.text_encoder.config.num_hidden_layers
        skip = 0 if clip_skip is None else clip_skip
        first = 2 if layer == "penultimate" else 1  # hidden_states[-first] without clip_skip
        if not isinstance(skip, int) or isinstance(skip, bool) or not 0 <= skip <= layers - first:
            raise InvalidArgumentError(
                f"clip_skip must be an int in [0, {layers - first}] for this text encoder, "
                f"got {clip_skip!r}"
            )
        back = skip + first
        if layer == "last" and clip_skip is None:
            out = self.text_encoder(ids, attention_mask=mask)
            hidden: torch.Tensor = out[0]
        else:
            out = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-back]
            if layer == "last":
                # latentkit's encoder and transformers 4's CLIPTextModel nest the layers in
                # .text_model (the checkpoints' key prefix); transformers 5's has them at the top.
                core: Any = getattr(self.text_encoder, "text_model", self.text_encoder)
                hidden = core.final_layer_norm(hidden)
        pooled = getattr(out, "text_embeds", None)
        if pooled is not None:
            # One pooled vector per prompt: the first chunk's (A1111 does the same).
            pooled = pooled.reshape(batch, count, -1)[:, 0].to(dtype=dtype, device=device)
        hidden = hidden.to(dtype=dtype, device=device)
        weights = tokens.weights.reshape(batch * count, window, 1)
        if not torch.all(weights == 1):
            # A1111's emphasis: scale each token's state, then restore the chunk's mean so
            # the overall magnitude is unchanged (per prompt here, so batching changes nothing).
            weights = weights.to(device=device, dtype=hidden.dtype)
            before = hidden.mean(dim=(1, 2), keepdim=True)
            hidden = hidden * weights
            hidden = hidden * (before / hidden.mean(dim=(1, 2), keepdim=True))
        return TextEmbeddings(hidden=hidden.reshape(batch, count * window, -1), pooled=pooled)

    def chunks(self, prompts: Sequence[str], *, syntax: PromptSyntax = "a1111") -> int:
        """How many window chunks the longest of ``prompts`` needs."""
        return self.tokenize(prompts, syntax=syntax).chunks

    def _tokens_and_weights(
        self, prompt: str, syntax: PromptSyntax = "a1111"
    ) -> tuple[list[int], list[float]]:
        tokens: list[int] = []
        weights: list[float] = []
        runs = parse_emphasis(prompt) if syntax == "a1111" else [(prompt, 1.0)]
        for text, weight in runs:
            ids = self.tokenizer(
                text, add_special_tokens=False, truncation=False, verbose=False
            ).input_ids
            tokens += ids
            weights += [weight] * len(ids)
        return tokens, weights


def encode_prompts(
    encoders: Sequence[TextConditioner],
    prompts: Sequence[Sequence[str]],
    *,
    chunks: int,
    layer: TextLayer,
    clip_skip: int | None,
    device: torch.device,
    dtype: torch.dtype,
    syntax: PromptSyntax = "a1111",
) -> TextEmbeddings:
    """Encode ``prompts[i]`` with ``encoders[i]`` in ``chunks`` chunks each and concatenate the
    hidden states along the width (SDXL: CLIP ViT-L's 768 then OpenCLIP bigG's 1280, Podell
    et al. 2023 sec. 2.1); the pooled vector is the last encoder's."""
    hidden = []
    pooled = None
    for encoder, texts in zip(encoders, prompts, strict=True):
        out = encoder.encode_tokens(
            encoder.tokenize(texts, chunks=chunks, syntax=syntax),
            device=device,
            dtype=dtype,
            clip_skip=clip_skip,
            layer=layer,
        )
        hidden.append(out.hidden)
        pooled = out.pooled
    return TextEmbeddings(hidden=torch.cat(hidden, dim=-1), pooled=pooled)
