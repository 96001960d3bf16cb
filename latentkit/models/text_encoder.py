"""The CLIP text encoders of Stable Diffusion 1.x, 2.x and XL (Radford et al. 2021, sec. 2.4).

A causal Transformer (Vaswani et al. 2017) over byte-pair tokens: token plus learned
position embeddings, pre-norm self-attention and MLP blocks, a final layer norm. Stable
Diffusion conditions on its last hidden states (Rombach et al. 2022, sec. 3.3).

`CLIPTextConfig` reads a transformers ``text_encoder/config.json``; `CLIPTextEncoder` is the
network, with module paths equal to the published checkpoint keys
(``text_model.encoder.layers.0.self_attn.q_proj.weight``, ...) so weights load by name.
Its outputs equal those of transformers' ``CLIPTextModel`` on the same weights, or of
``CLIPTextModelWithProjection`` (SDXL's second encoder, OpenCLIP ViT-bigG/14) when the config
names that architecture: then a ``text_projection`` maps the pooled state into CLIP's joint
embedding space (`TextEncoderOutput.text_embeds`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError, UnsupportedModelError
from latentkit.models.config_checks import check_config


def quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": quick_gelu,  # OpenAI's CLIP ViT-L/14 (Stable Diffusion 1.x)
    "gelu": F.gelu,  # OpenCLIP ViT-H/14 (SD 2.x), ViT-bigG/14 (SDXL); the exact, erf-based GELU
}
"""The MLP activations (``hidden_act``) of the CLIP text encoders Stable Diffusion uses."""

PROJECTION_ARCHITECTURE = "CLIPTextModelWithProjection"
"""The transformers class, named in a config's ``architectures``, whose checkpoints carry a
``text_projection`` (SDXL's ``text_encoder_2``)."""

DEFAULT_PROJECTION_DIM = 512
"""transformers' ``projection_dim`` when a config omits it."""

CHECKPOINT_PREFIX = "text_model."
"""The prefix of every key in published checkpoints (and of our module paths). transformers 5
saves a freshly built ``CLIPTextModel`` without it; `rename_checkpoint_key` adds it back."""

_UNPREFIXED_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")

IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids"})
"""Checkpoint tensors with no parameter here: transformers before 4.31 saved the position
ids (``arange(max_position_embeddings)``, a buffer) with the weights."""


def rename_checkpoint_key(key: str) -> str | None:
    """The parameter name of checkpoint tensor ``key``, or None for a key in `IGNORED_KEYS`.

    >>> rename_checkpoint_key("encoder.layers.0.mlp.fc1.weight")
    'text_model.encoder.layers.0.mlp.fc1.weight'
    >>> rename_checkpoint_key("text_model.embeddings.position_ids") is None
    True
    """
    if key.startswith(_UNPREFIXED_ROOTS):
        key = CHECKPOINT_PREFIX + key
    return None if key in IGNORED_KEYS else key


@dataclass(frozen=True)
class CLIPTextConfig:
    """The settings of a CLIP text encoder, read from transformers' ``text_encoder/config.json``.

    Defaults are transformers' own, so a config file that omits a key means the same here.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    """Width of the hidden states (768 for SD 1.x, 1024 for SD 2.x)."""
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    """Longest token sequence the encoder reads (its window)."""
    hidden_act: str = "quick_gelu"
    """``"quick_gelu"`` (SD 1.x) or ``"gelu"`` (SD 2.x); see `ACTIVATIONS`."""
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    """The end token, whose state is `TextEncoderOutput.pooler_output`. Configs written before
    transformers 4.31 say 2; that value means "the highest token id", see `CLIPTextEncoder`."""
    pad_token_id: int = 1
    projection_dim: int | None = None
    """Width of CLIP's joint embedding: the output of ``text_projection`` when
    `with_projection`, else unused (kept for the config file)."""
    use_attention_mask: bool = False
    """Whether the encoder was trained to ignore padding; read by `TextConditioner`. Stable
    Diffusion's encoders were not (their configs omit the key)."""
    with_projection: bool = False
    """Whether the encoder has CLIP's ``text_projection`` (a bias-free linear map of the pooled
    state to ``projection_dim``): transformers' ``CLIPTextModelWithProjection``, SDXL's
    second encoder. Read from (and written as) the config's ``architectures``."""

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"text encoder config hidden_act={self.hidden_act!r} is not supported; "
                f"latentkit implements {', '.join(map(repr, ACTIVATIONS))}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise InvalidArgumentError(
                f"text encoder config hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.with_projection and self.projection_dim is None:
            raise InvalidArgumentError(
                "a text encoder with a projection needs projection_dim (the projection's width)"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Parse transformers' ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` config,
        raising `UnsupportedModelError` for another kind of model (a full CLIP config, another
        activation, ...)."""
        check_config(
            "text_encoder", d
        )  # types and ranges first: InvalidConfigError, not a TypeError
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise UnsupportedModelError(
                f"text encoder config model_type={model_type!r} is not supported; latentkit "
                "reads the CLIP text encoder of Stable Diffusion 1.x/2.x ('clip_text_model')"
            )
        with_projection = PROJECTION_ARCHITECTURE in (d.get("architectures") or ())
        projection = d.get("projection_dim", DEFAULT_PROJECTION_DIM if with_projection else None)
        return cls(
            vocab_size=int(d.get("vocab_size", cls.vocab_size)),
            hidden_size=int(d.get("hidden_size", cls.hidden_size)),
            intermediate_size=int(d.get("intermediate_size", cls.intermediate_size)),
            num_hidden_layers=int(d.get("num_hidden_layers", cls.num_hidden_layers)),
            num_attention_heads=int(d.get("num_attention_heads", cls.num_attention_heads)),
            max_position_embeddings=int(
                d.get("max_position_embeddings", cls.max_position_embeddings)
            ),
            hidden_act=str(d.get("hidden_act", cls.hidden_act)),
            layer_norm_eps=float(d.get("layer_norm_eps", cls.layer_norm_eps)),
            bos_token_id=int(d.get("bos_token_id", cls.bos_token_id)),
            eos_token_id=int(d.get("eos_token_id", cls.eos_token_id)),
            pad_token_id=int(d.get("pad_token_id", cls.pad_token_id)),
            projection_dim=None if projection is None else int(projection),
            use_attention_mask=bool(d.get("use_attention_mask", False)),
            with_projection=with_projection,
        )

    def to_dict(self) -> dict[str, Any]:
        """This config as a transformers ``text_encoder/config.json`` (`from_dict` reads it
        back equal; transformers' and diffusers' loaders read it as a ``CLIPTextModel``, or a
        ``CLIPTextModelWithProjection`` with `with_projection`)."""
        d: dict[str, Any] = {
            "architectures": [PROJECTION_ARCHITECTURE if self.with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.projection_dim is not None:
            d["projection_dim"] = self.projection_dim
        if self.use_attention_mask:
            d["use_attention_mask"] = True
        return d


@dataclass(frozen=True)
class TextEncoderOutput:
    """What `CLIPTextEncoder` returns; ``output[0]`` is ``last_hidden_state`` and ``output[1]``
    ``pooler_output``, as in transformers' ``CLIPTextModel`` output (not as in its
    ``CLIPTextModelWithProjection`` output, whose ``[0]`` is ``text_embeds``: use the names)."""

    last_hidden_state: Tensor
    """(B, N, D): the last layer's states through the final layer norm."""
    pooler_output: Tensor
    """(B, D): ``last_hidden_state`` at each sequence's end token."""
    hidden_states: tuple[Tensor, ...] | None = None
    """When asked for: the embeddings, then each layer's output (before the final layer norm).
    SDXL conditions on ``hidden_states[-2]`` (the penultimate layer, no final norm), or on
    ``hidden_states[-(clip_skip + 2)]``."""
    text_embeds: Tensor | None = None
    """(B, projection_dim): ``text_projection(pooler_output)``, for an encoder
    `CLIPTextConfig.with_projection` (SDXL's pooled text condition); None otherwise."""

    def __getitem__(self, index: int) -> Tensor:
        return (self.last_hidden_state, self.pooler_output)[index]


class Embedding(nn.Embedding):
    """``nn.Embedding`` that skips its random init on the meta device, where there is nothing
    to initialise: torch's ``normal_`` on a meta tensor imports ``torch._dynamo`` (about a
    second) the first time it runs."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding (Radford et al. 2021)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = self.position_embedding.weight[: input_ids.shape[-1]]
        out: Tensor = self.token_embedding(input_ids) + positions
        return out


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, sec. 3.2.2), with biased projections."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.scale = (width // self.heads) ** -0.5
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``mask`` (B, 1, N, N), True where a query may attend; None means causal only."""
        b, n, width = x.shape

        def split_heads(t: Tensor) -> Tensor:  # (B, N, H*D) -> (B, H, N, D)
            return t.view(b, n, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = (split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, is_causal=mask is None
        )
        projected: Tensor = self.out_proj(out.transpose(1, 2).reshape(b, n, width))
        return projected


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.activation(self.fc1(x)))
        return out


class EncoderLayer(nn.Module):
    """Pre-norm residual self-attention, then a pre-norm residual MLP."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        out: Tensor = x + self.mlp(self.layer_norm2(x))
        return out


class Encoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class TextTransformer(nn.Module):
    """Embeddings, the layers, the final layer norm: the ``text_model`` of the checkpoints."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """The CLIP text Transformer (Radford et al. 2021, sec. 2.4) as Stable Diffusion uses it.

    Build it with ``CLIPTextEncoder(CLIPTextConfig.from_dict(config_json))``; its
    ``state_dict()`` keys are those of the published checkpoints (``text_model.*``, plus
    ``text_projection.weight`` with `CLIPTextConfig.with_projection`), and ``encoder(ids)``
    equals transformers' ``CLIPTextModel(ids)`` (``CLIPTextModelWithProjection(ids)``) on the
    same weights.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False)
            if config.with_projection and config.projection_dim is not None
            else None
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> TextEncoderOutput:
        """Encode token ids (B, N), N at most ``max_position_embeddings``.

        Attention is causal: each token sees itself and the tokens before it. An
        ``attention_mask`` (B, N; 1 = token, 0 = padding) also hides the padded keys.
        """
        model = self.text_model
        ids = input_ids.reshape(-1, input_ids.shape[-1])
        batch, n = ids.shape
        if n > self.config.max_position_embeddings:
            raise InvalidArgumentError(
                f"{n} tokens exceed the text encoder's {self.config.max_position_embeddings}"
            )
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, n):
                raise InvalidArgumentError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, n)}"
                )
            keep = attention_mask.to(device=ids.device, dtype=torch.bool)
            # Without padding, the causal mask alone: SDPA's `is_causal`, as transformers does.
            if not bool(keep.all()):
                causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
                mask = causal[None, None] & keep[:, None, None, :]
        x = model.embeddings(ids)
        states = [x] if output_hidden_states else None
        for layer in model.encoder.layers:
            x = layer(x, mask)
            if states is not None:
                states.append(x)
        last = model.final_layer_norm(x)
        rows = torch.arange(batch, device=last.device)
        tokens = ids.to(dtype=torch.int, device=last.device)
        if self.config.eos_token_id == 2:
            # Configs from before transformers 4.31 name the wrong end token (2); the end token
            # is then taken to be each sequence's highest id, as in OpenAI's CLIP.
            end = tokens.argmax(dim=-1)
        else:
            end = (tokens == self.config.eos_token_id).int().argmax(dim=-1)  # the first one
        pooled = last[rows, end]
        return TextEncoderOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=None if states is None else tuple(states),
            # CLIP's joint-space text embedding (Radford et al. 2021, fig. 3: T_f @ W_t).
            text_embeds=None if self.text_projection is None else self.text_projection(pooled),
        )
