"""Textual-inversion embeddings (Gal et al. 2022): new tokens whose input embeddings were learned.

A textual inversion adds a word to the text encoder's vocabulary: its token gets one or more
learned rows of the token-embedding matrix, and the rest of the encoder is unchanged. The
files (`read_textual_inversion`, `textual_inversion_from_state_dict`):

- diffusers' ``learned_embeds.safetensors``: ``{token: vectors}``;
- A1111's ``.pt`` (``string_to_param["*"]``, with the token in ``name``) and ``.safetensors``
  (``emb_params``);
- SDXL's, with ``clip_l`` (for ``text_encoder``, CLIP ViT-L) and ``clip_g`` (for
  ``text_encoder_2``, OpenCLIP bigG) vectors.

A file of ``N`` vectors is a multi-vector embedding: as in diffusers, the token becomes the
tokens ``token``, ``token_1``, ..., ``token_{N-1}`` and the token in a prompt stands for all
of them (diffusers' ``maybe_convert_prompt``), so prompts give the same ids.

`add_tokens` returns a new tokenizer (the base's vocabulary plus the added tokens) and a new
text encoder whose token embedding reads the new rows from a small extra table (the base's
embedding matrix is shared, not copied); the base tokenizer and encoder are never modified.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentkit.adapters.common import (
    AdapterMismatchError,
    PartialAdapterWarning,
    find_adapter_file,
    get_module,
    read_adapter_file,
    replace_modules,
)
from latentkit.errors import InvalidArgumentError, WeightMismatchError
from latentkit.tokenizer import SPECIAL_TOKEN_NAMES, AddedToken, CLIPTokenizer

DEFAULT_WEIGHT_NAMES = ("learned_embeds.safetensors",)
"""The file an embedding folder or Hub repo is read from when ``weight_name`` is not given
(diffusers' name); otherwise a folder's only safetensors file (or, with ``allow_pickle``,
``learned_embeds.bin`` / the only pickle)."""
PICKLE_WEIGHT_NAMES = ("learned_embeds.bin",)

SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
"""SDXL embedding files: the vectors for each of the two text encoders."""

TOKEN_EMBEDDING_PATHS = ("text_model.embeddings.token_embedding", "embeddings.token_embedding")
"""Where a CLIP text encoder keeps its token embedding: latentkit's and transformers 4's
``CLIPTextModel`` (and ``...WithProjection``), and transformers 5's ``CLIPTextModel``."""


@dataclass(frozen=True)
class TextualInversion:
    """The vectors of an embedding file, per text encoder (``text_encoder``, ``text_encoder_2``),
    each (N, width): N vectors for one token."""

    vectors: Mapping[str, Tensor]
    token: str | None = None
    """The token the file names (diffusers' key, A1111's ``name``), if it names one."""
    name: str = "embedding"
    """Where it came from (a file path), for messages."""


def _vectors(value: Any, where: str) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise WeightMismatchError(
            f"{where}: an embedding is one vector or (N, width) vectors, got {shape}"
        )
    return value.detach()[None] if value.ndim == 1 else value.detach()


def textual_inversion_from_state_dict(
    state: Mapping[str, Any], *, name: str = "embedding"
) -> TextualInversion:
    """The embedding in a file's contents (safetensors tensors or an A1111 pickle's dict).

    Raises `AdapterMismatchError` (nothing matched) for contents in none of the formats.
    """
    keys = set(state)
    if keys & SDXL_KEYS.keys():
        extra = keys - SDXL_KEYS.keys()
        if extra:
            raise AdapterMismatchError(
                f"{name}: an SDXL embedding holds clip_l and clip_g only, not {sorted(extra)}",
                matched=0,
                total=len(keys),
            )
        return TextualInversion(
            {SDXL_KEYS[k]: _vectors(v, f"{name}[{k}]") for k, v in state.items()}, None, name
        )
    if "string_to_param" in state:  # A1111's .pt
        params = state["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise AdapterMismatchError(
                f"{name}: string_to_param has no '*' entry", matched=0, total=len(keys)
            )
        token = state.get("name")
        return TextualInversion(
            {"text_encoder": _vectors(params["*"], f"{name}[string_to_param][*]")},
            token if isinstance(token, str) and token else None,
            name,
        )
    if keys == {"emb_params"}:  # A1111's .safetensors
        return TextualInversion({"text_encoder": _vectors(state["emb_params"], name)}, None, name)
    if len(keys) == 1:  # diffusers' {token: vectors}, or a bare tensor ("")
        (token,) = keys
        return TextualInversion({"text_encoder": _vectors(state[token], name)}, token or None, name)
    raise AdapterMismatchError(
        f"{name}: not a textual-inversion embedding (0 of {len(keys)} entries in a known format: "
        "diffusers' {token: vectors}, A1111's string_to_param / emb_params, SDXL's clip_l / clip_g)",
        matched=0,
        total=len(keys),
    )


def read_textual_inversion(
    source: str | os.PathLike[str],
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    hub_token: str | bool | None = None,
) -> TextualInversion:
    """Read the embedding at ``source``: a file, a folder or a Hub repo id (diffusers'
    ``learned_embeds.safetensors`` unless ``weight_name`` says otherwise). A1111's ``.pt``
    files are pickles: they need ``allow_pickle=True`` (read with ``weights_only=True``)."""
    path = find_adapter_file(
        source,
        weight_name=weight_name,
        default_names=DEFAULT_WEIGHT_NAMES + (PICKLE_WEIGHT_NAMES if allow_pickle else ()),
        allow_pickle=allow_pickle,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=hub_token,
    )
    return textual_inversion_from_state_dict(read_adapter_file(path).state, name=str(path))


# ---------------------------------------------------------------- the tokenizer


class EmbeddingTokenizer(CLIPTokenizer):
    """A `CLIPTokenizer` with textual-inversion tokens added; a multi-vector token stands for
    its ``N`` tokens (``token token_1 ... token_{N-1}``) wherever it appears in a text.

    Made by `add_tokens` from a base tokenizer, which it leaves unchanged.
    """

    def __init__(
        self,
        base: CLIPTokenizer,
        tokens: Sequence[str],
        *,
        vectors: Mapping[str, int],
    ) -> None:
        """``tokens``: the new tokens in order; ``vectors``: the multi-vector tokens among
        them (the first of each group) and how many tokens each stands for."""
        decoder = base.added_tokens_decoder
        super().__init__(
            vocab=base.vocab,
            merges=base.merges,
            model_max_length=base.model_max_length,
            # None for a named token the base lacks: not CLIP's default.
            special_tokens={n: base.special_tokens.get(n) for n in SPECIAL_TOKEN_NAMES},
            # transformers' add_tokens: not special, matched in the normalised text.
            added_tokens=[*(decoder[i] for i in sorted(decoder)), *map(AddedToken, tokens)],
            split_special_tokens=base.split_special_tokens,
        )
        expansions = dict(base.expansions) if isinstance(base, EmbeddingTokenizer) else {}
        for token, count in vectors.items():
            first = self._added[token]
            names = [token, *(f"{token}_{i}" for i in range(1, count))]
            expansions[first] = tuple(self._added[t] for t in names)
        self.expansions: dict[int, tuple[int, ...]] = expansions
        """Token id → the ids it stands for (multi-vector embeddings)."""

    def _encode(self, text: str) -> list[int]:
        ids = super()._encode(text)
        if not self.expansions:
            return ids
        out: list[int] = []
        for i in ids:
            out.extend(self.expansions.get(i, (i,)))
        return out


# ---------------------------------------------------------------- the text encoder


class ExtendedEmbedding(nn.Module):
    """A token embedding with rows added after the base's: ids below the base's row count
    read the base matrix (shared, not copied), the others the ``extra`` rows.

    ``weight`` is the base's own parameter, so a state dict keeps the base's keys and shapes;
    ``extra`` is a non-persistent buffer (it moves with ``.to()``, it is not saved).
    """

    weight: Tensor
    extra: Tensor

    def __init__(self, weight: nn.Parameter, extra: Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("extra", extra, persistent=False)

    @property
    def num_embeddings(self) -> int:
        return int(self.weight.shape[0] + self.extra.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, input: Tensor) -> Tensor:
        rows = self.weight.shape[0]
        # Both lookups run on clamped ids and one is chosen per token: the rows read are
        # exactly those a single resized matrix would give.
        base = F.embedding(input.clamp(max=rows - 1), self.weight)
        added = F.embedding((input - rows).clamp(min=0), self.extra)
        out: Tensor = torch.where((input >= rows)[..., None], added, base)
        return out


def token_embedding_path(text_encoder: nn.Module) -> str:
    """The module path of a CLIP text encoder's token embedding (see `TOKEN_EMBEDDING_PATHS`)."""
    for path in TOKEN_EMBEDDING_PATHS:
        if isinstance(get_module(text_encoder, path), (nn.Embedding, ExtendedEmbedding)):
            return path
    raise InvalidArgumentError(
        f"{type(text_encoder).__name__} has no token embedding at {' or '.join(TOKEN_EMBEDDING_PATHS)}"
    )


def add_tokens(
    *,
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    vectors: Tensor,
    token: str,
    name: str = "embedding",
) -> tuple[EmbeddingTokenizer, nn.Module]:
    """A new tokenizer with ``token`` (and ``token_1``, ... for N > 1 vectors) and a new text
    encoder whose embedding gives each new token its vector; the given ones are unchanged.

    The new ids are the next free ones (``len(tokenizer)`` on), as transformers'
    ``add_tokens`` gives them. Raises `InvalidArgumentError` when a token is already in the
    vocabulary, `AdapterMismatchError` when the vectors' width is not the encoder's.
    """
    vectors = _vectors(vectors, name)
    count = vectors.shape[0]
    tokens = [token, *(f"{token}_{i}" for i in range(1, count))]
    if not token or token != token.strip():
        raise InvalidArgumentError(f"{name}: the token must be a non-empty word, got {token!r}")
    taken = [t for t in tokens if tokenizer.token_to_id(t) is not None]
    if taken:
        raise InvalidArgumentError(
            f"{name}: {', '.join(taken)} is already in the tokenizer's vocabulary; choose another token"
        )
    path = token_embedding_path(text_encoder)
    embedding = get_module(text_encoder, path)
    assert isinstance(embedding, (nn.Embedding, ExtendedEmbedding))
    if vectors.shape[1] != embedding.embedding_dim:
        raise AdapterMismatchError(
            f"{name}: {count} vectors {vectors.shape[1]} wide, but this text encoder's tokens are "
            f"{embedding.embedding_dim} wide (an embedding for another model)",
            matched=0,
            total=1,
        )
    new_tokenizer = EmbeddingTokenizer(
        tokenizer, tokens, vectors={token: count} if count > 1 else {}
    )
    ids = [new_tokenizer.token_to_id(t) for t in tokens]
    weight = embedding.weight
    rows = weight.shape[0]
    old_extra = (
        embedding.extra
        if isinstance(embedding, ExtendedEmbedding)
        else weight.new_zeros(0, weight.shape[1])
    )
    first = rows + old_extra.shape[0]
    if ids != list(range(first, first + count)):
        # The tokenizer's next ids are not the matrix's next rows (an encoder with spare
        # rows, or a tokenizer not made for it): a private copy of the whole matrix.
        table = torch.cat([weight.detach(), old_extra])
        needed = max(i for i in ids if i is not None) + 1
        if needed > table.shape[0]:
            table = torch.cat([table, table.new_zeros(needed - table.shape[0], table.shape[1])])
        table[ids] = vectors.to(table)
        copy = nn.Embedding(table.shape[0], table.shape[1], device="meta")
        copy.weight = nn.Parameter(table, requires_grad=weight.requires_grad)
        replacement: nn.Module = copy
    else:
        extra = torch.cat([old_extra, vectors.to(weight)])
        replacement = ExtendedEmbedding(
            weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight), extra
        )
    return new_tokenizer, replace_modules(text_encoder, {path: replacement})


Encoders = Mapping[str, tuple[CLIPTokenizer, nn.Module] | None]
"""A pipeline's text encoders: component name → (tokenizer, text encoder), None if it lacks one."""


def apply_textual_inversion(
    encoders: Encoders,
    embedding: TextualInversion,
    *,
    token: str | None = None,
) -> dict[str, tuple[CLIPTokenizer, nn.Module] | None]:
    """Add ``embedding`` to the pipeline's text encoders (``{"text_encoder": (tokenizer,
    encoder), "text_encoder_2": ...}``; None or missing: the pipeline lacks it).

    ``token`` names the new word (default: the file's own token, if it names one). A
    one-encoder file goes to ``text_encoder``; SDXL files' ``clip_l`` / ``clip_g`` to
    ``text_encoder`` / ``text_encoder_2``. Vectors for an encoder the pipeline lacks are left
    out with a `PartialAdapterWarning`; none applying, or a width mismatch, is an
    `AdapterMismatchError`. Returns all of ``encoders``, new pairs where vectors were added.
    """
    word = token or embedding.token
    if word is None:
        raise InvalidArgumentError(
            f"{embedding.name}: the file names no token; pass token= (the word to use in prompts)"
        )
    result: dict[str, tuple[CLIPTokenizer, nn.Module] | None] = dict(encoders)
    plan = [(c, v, encoders.get(c)) for c, v in embedding.vectors.items()]
    absent = [c for c, _, pair in plan if pair is None]
    present = [(c, v, pair) for c, v, pair in plan if pair is not None]
    if not present:
        raise AdapterMismatchError(
            f"{embedding.name}: 0 of {len(plan)} vector sets match: it has vectors for "
            f"{', '.join(absent)}, which this pipeline does not have",
            matched=0,
            total=len(plan),
        )
    # Check every encoder before building anything.
    for component, vectors, pair in present:
        _, encoder = pair
        table = get_module(encoder, token_embedding_path(encoder))
        assert isinstance(table, (nn.Embedding, ExtendedEmbedding))
        if vectors.shape[1] != table.embedding_dim:
            raise AdapterMismatchError(
                f"{embedding.name}: {component} vectors are {vectors.shape[1]} wide, its tokens "
                f"{table.embedding_dim} ({len(present) - 1} of {len(plan)} vector sets match; "
                "an embedding for another model)",
                matched=len(present) - 1,
                total=len(plan),
            )
    for component, vectors, pair in present:
        tokenizer, encoder = pair
        result[component] = add_tokens(
            tokenizer=tokenizer,
            text_encoder=encoder,
            vectors=vectors,
            token=word,
            name=f"{embedding.name} ({component})",
        )
    if absent:
        warnings.warn(
            f"{embedding.name}: left out the vectors for {', '.join(absent)}, which this "
            f"pipeline does not have ({len(present)} of {len(plan)} vector sets applied)",
            PartialAdapterWarning,
            stacklevel=2,
        )
    return result


def load_textual_inversion(
    source: str | os.PathLike[str],
    *,
    encoders: Encoders,
    token: str | None = None,
    weight_name: str | None = None,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    hub_token: str | bool | None = None,
) -> dict[str, tuple[CLIPTokenizer, nn.Module] | None]:
    """`read_textual_inversion` then `apply_textual_inversion`.

    >>> pairs = load_textual_inversion("cat-toy/learned_embeds.safetensors", token="<cat-toy>",
    ...     encoders={"text_encoder": (tokenizer, text_encoder)})  # doctest: +SKIP
    """
    embedding = read_textual_inversion(
        source,
        weight_name=weight_name,
        allow_pickle=allow_pickle,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        hub_token=hub_token,
    )
    return apply_textual_inversion(encoders, embedding, token=token)
