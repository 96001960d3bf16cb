"""CLIP's byte-level BPE tokenizer on Hugging Face's ``tokenizers``, with transformers' ids.

`CLIPTokenizer` reads the ``tokenizer/`` folder of a Stable Diffusion model and gives, for
any text, the ids transformers' ``CLIPTokenizer`` (version 5) gives for the same files,
without importing transformers (about a second of a pipeline's load time). latentkit reads
and checks the files itself (`latentkit.readers`, typed errors); the text is tokenized by a
``tokenizers.Tokenizer`` built here from the vocabulary and merges with the components
transformers gives CLIP (``models/clip/tokenization_clip.py``), which run CLIP's steps
(Radford et al. 2021; ``simple_tokenizer.py`` in OpenAI's CLIP):

1. added tokens (start/end, textual-inversion tokens) are cut out first, so text equal to
   one is that one token;
2. the rest is normalised: NFC, every run of whitespace to one space, lower case;
3. split into words by CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|
   'll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (whitespace between words is dropped);
4. each word's UTF-8 bytes are written in `byte_alphabet` and merged by byte-pair
   encoding (Sennrich et al. 2016), its last symbol marked with ``</w>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

from latentkit.errors import (
    CorruptFileError,
    InvalidArgumentError,
    InvalidConfigError,
    MissingComponentError,
    UnsupportedModelError,
)
from latentkit.readers import read_json_object, read_text

if TYPE_CHECKING:
    import tokenizers
    import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""The named special tokens of a tokenizer config, in the order transformers adds them."""

_NAMES = frozenset(SPECIAL_TOKEN_NAMES)
_DEFAULTS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
"""transformers' CLIPTokenizer defaults for named tokens a config leaves out."""

VERY_LARGE_INTEGER = int(1e30)
"""transformers' ``model_max_length`` when a config does not give one ("no limit")."""
LARGE_INTEGER = int(1e20)

T = TypeVar("T")


_PRINTABLE = (
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
)
"""The bytes byte-level BPE writes as the characters they are in Latin-1."""


@cache
def byte_alphabet() -> tuple[str, ...]:
    """The 256 characters byte-level BPE writes bytes as, in CLIP's vocabulary order:
    printable bytes stand for themselves, the others for code points from 256 up
    (Radford et al. 2019, sec. 2.2; ``bytes_to_unicode`` in OpenAI's CLIP)."""
    others = 256 - len(_PRINTABLE)
    return tuple(map(chr, _PRINTABLE)) + tuple(chr(256 + i) for i in range(others))


@dataclass(frozen=True)
class AddedToken:
    """A token cut out of the text before BPE (transformers' ``AddedToken`` fields)."""

    content: str
    special: bool = False
    """Start, end, padding and other named tokens; transformers skips them when decoding."""
    normalized: bool = True
    """Matched in the normalised text (lower case), rather than in the text as given."""
    lstrip: bool = False
    """Takes the whitespace on its left."""
    rstrip: bool = False
    """Takes the whitespace on its right."""
    single_word: bool = False
    """Matches only where no word character touches it."""

    @classmethod
    def read(cls, value: object, *, special: bool | None = None, where: str) -> AddedToken:
        """A token from a config value: a string (a special token, matched as written) or a
        dict with ``content``. Flags the dict leaves out take transformers' defaults:
        ``special`` as given here, else False; ``normalized`` when not special."""
        if isinstance(value, str):
            return cls(value, special=True, normalized=False)
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            is_special = bool(value.get("special", False)) if special is None else special
            flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word") if k in value}
            normalized = bool(value.get("normalized", not is_special))
            return cls(value["content"], special=is_special, normalized=normalized, **flags)
        raise UnsupportedModelError(f"{where}: a token must be a string or {{'content': ...}}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
            "special": self.special,
        }


@dataclass(frozen=True)
class Encoding(Generic[T]):
    """Token ids and attention mask: lists for one text, lists of lists for a batch, or
    (batch, length) tensors with ``return_tensors="pt"``."""

    input_ids: T
    attention_mask: T
    """1 for the tokens of the text, 0 for padding."""


class CLIPTokenizer:
    """CLIP's tokenizer: text → token ids, exactly as transformers' ``CLIPTokenizer``.

    Build one with `from_pretrained`. It is called like transformers' tokenizer:

    >>> tok = CLIPTokenizer.from_pretrained("latentkit/assets/shapes/tokenizer")
    >>> tok("a red circle").input_ids
    [558, 320, 513, 529, 559]
    >>> tok.convert_ids_to_tokens([320, 513, 529])
    ['a</w>', 'red</w>', 'circle</w>']
    """

    def __init__(
        self,
        *,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        model_max_length: int = VERY_LARGE_INTEGER,
        special_tokens: Mapping[str, str | AddedToken | None] | None = None,
        extra_special_tokens: Sequence[str | AddedToken] = (),
        added_tokens: Sequence[AddedToken] = (),
        split_special_tokens: bool = False,
    ) -> None:
        """``vocab`` and ``merges`` are the BPE model (merges in rank order).
        ``special_tokens`` maps names of `SPECIAL_TOKEN_NAMES` to tokens (CLIP's start,
        end, unknown and padding tokens by default; None for none);
        ``extra_special_tokens`` are special tokens without a name. As transformers adds
        them: ``added_tokens`` in their order, then the named and the extra special tokens
        not among them; a token not in ``vocab`` takes the next free id."""
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.model_max_length = model_max_length
        self.split_special_tokens = split_special_tokens
        given_named = {**_DEFAULTS, **(special_tokens or {})}
        unknown = set(given_named) - _NAMES
        if unknown:
            raise InvalidArgumentError(
                f"unknown special token names {sorted(unknown)}; use {SPECIAL_TOKEN_NAMES}"
            )
        given = {t.content for t in added_tokens}
        # transformers 5 adds a config's added tokens, then the named tokens it lacks. A
        # token already in the vocabulary keeps its id; a repeated token takes the flags of
        # its last occurrence.
        self.special_tokens = {
            name: _special(t, name) for name in SPECIAL_TOKEN_NAMES if (t := given_named.get(name))
        }
        for name in ("bos_token", "eos_token", "pad_token"):
            if not self.special_tokens.get(name, AddedToken("")).content:
                raise InvalidArgumentError(f"{name} is missing; CLIP's tokenizer needs one")
        specials = [
            *self.special_tokens.values(),
            *(_special(t, "extra") for t in extra_special_tokens),
        ]
        ordered = [*added_tokens, *(t for t in specials if t.content not in given)]
        added: dict[str, AddedToken] = {}
        for token in ordered:
            if token.content:  # a repeated token keeps its place and takes its last flags
                added[token.content] = token
        unk = self.special_tokens.get("unk_token")
        unk_content = unk.content if unk is not None and unk.content in self.vocab else None
        if unk_content is None:
            # tokenizers' BPE drops a byte it has no symbol for when it has no unknown token
            # (and fails mid-text when that token is not in the vocabulary): refuse here.
            symbols = [*byte_alphabet(), *(c + END_OF_WORD for c in byte_alphabet())]
            lacking = next((s for s in symbols if s not in self.vocab), None)
            if lacking is not None:
                raise UnsupportedModelError(
                    f"the vocabulary lacks the byte symbol {lacking!r}, and the tokenizer has no "
                    "unknown token in the vocabulary to stand for it"
                )
        self.backend_tokenizer = _clip_backend(self.vocab, self.merges, unk_token=unk_content)
        """The ``tokenizers.Tokenizer`` that tokenizes (transformers' ``backend_tokenizer``)."""
        # tokenizers gives each added token its id as transformers 5 does: a token in the
        # vocabulary keeps its id, the others take the next free ids in order.
        self.backend_tokenizer.add_tokens([_backend_token(t) for t in added.values()])
        self.backend_tokenizer.encode_special_tokens = split_special_tokens
        self._added: dict[str, int] = {}
        for content in added:
            token_id = self.backend_tokenizer.token_to_id(content)
            assert token_id is not None  # just added
            self._added[content] = token_id
        self.added_tokens_decoder: dict[int, AddedToken] = {
            self._added[c]: t for c, t in added.items()
        }
        """The added tokens by id, special ones included."""
        for name, token in self.special_tokens.items():
            self.special_tokens[name] = added[token.content]

    # ------------------------------------------------------------ reading and writing

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> CLIPTokenizer:
        """Read a tokenizer folder as transformers does: ``tokenizer.json`` (what
        transformers 5 writes) when it is there, else ``vocab.json`` and ``merges.txt``
        (the Hub's Stable Diffusion repos); ``tokenizer_config.json`` in both, and
        ``special_tokens_map.json`` / ``added_tokens.json`` where the config lists no
        ``added_tokens_decoder``.

        Raises `MissingComponentError` naming a missing file, and `UnsupportedModelError`
        when the files describe another tokenizer than CLIP's.
        """
        root = Path(folder).expanduser()
        where = f"{root.parent.name}/{root.name}" if root.parent.name else root.name
        if not root.is_dir():
            raise MissingComponentError(f"{where}: missing the tokenizer folder")
        config = _read_json(root / "tokenizer_config.json", where)
        kind = config.get("tokenizer_class")
        if kind is not None and kind not in ("CLIPTokenizer", "CLIPTokenizerFast"):
            raise UnsupportedModelError(
                f"{where}/tokenizer_config.json: tokenizer_class {kind!r} is not CLIP's tokenizer "
                "(CLIPTokenizer or CLIPTokenizerFast), the only one latentkit reads"
            )
        for key in ("padding_side", "truncation_side"):
            if config.get(key, "right") != "right":
                raise UnsupportedModelError(
                    f"{where}/tokenizer_config.json: {key} {config[key]!r} (only 'right' is supported)"
                )
        backend = (
            _read_json(root / "tokenizer.json", where)
            if (root / "tokenizer.json").is_file()
            else None
        )
        if backend is not None:
            vocab, merges = _backend_model(backend, where)
        else:
            vocab = _read_json(root / "vocab.json", where)
            merges = _read_merges(root / "merges.txt", where)
        ids = vocab.values()
        # `_is_id` for every id, in one pass each: type(i) is int leaves out bools (JSON
        # true/false), the only int subclass JSON gives.
        if not all(type(i) is int for i in ids) or not (
            min(ids, default=0) >= 0 and max(ids, default=0) <= MAX_TOKEN_ID
        ):
            raise UnsupportedModelError(
                f"{where}: the vocabulary must map tokens to int ids from 0 to {MAX_TOKEN_ID}"
            )

        # Named special tokens: the config's, or CLIP's defaults. Without an
        # added_tokens_decoder, transformers takes the legacy files' tokens instead.
        named = {n: _named_token(config[n], where, legacy=False) for n in config if n in _NAMES}
        extras = _extra_tokens(config, where, legacy=False)
        decoder: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            entries = config["added_tokens_decoder"]
            if not isinstance(entries, dict):
                raise CorruptFileError(
                    f"{where}/tokenizer_config.json: added_tokens_decoder must map ids to tokens",
                    path=root / "tokenizer_config.json",
                )
            for index, value in entries.items():
                decoder[_token_id(index, root / "tokenizer_config.json")] = AddedToken.read(
                    value, where=f"{where} added token {index}"
                )
        else:
            if (root / "special_tokens_map.json").is_file():
                legacy = _read_json(root / "special_tokens_map.json", where)
                named |= {
                    n: _named_token(legacy[n], where, legacy=True) for n in legacy if n in _NAMES
                }
                extras += [t for t in _extra_tokens(legacy, where, legacy=True) if t not in extras]
            if (root / "added_tokens.json").is_file():
                specials = {t.content for t in [*named.values(), *extras] if t is not None}
                for content, index in _read_json(root / "added_tokens.json", where).items():
                    special = content in specials
                    decoder[_token_id(index, root / "added_tokens.json")] = AddedToken(
                        content, special=special, normalized=not special
                    )
            entries = backend.get("added_tokens", []) if backend is not None else []
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise CorruptFileError(
                    f"{where}/tokenizer.json: added_tokens must be a list of objects",
                    path=root / "tokenizer.json",
                )
            for entry in entries:
                fields = {k: v for k, v in entry.items() if k != "id"}
                decoder[_token_id(entry.get("id"), root / "tokenizer.json")] = AddedToken.read(
                    fields, where=f"{where} added token"
                )
        added = [decoder[i] for i in sorted(decoder)]
        for name in ("bos_token", "eos_token", "pad_token"):
            if name in named and named[name] is None:
                raise UnsupportedModelError(f"{where}: {name} is null; CLIP's tokenizer needs one")
        # A named token that is an added token takes its flags from there.
        by_content = {t.content: t for t in added}
        special_tokens = {
            n: None if t is None else by_content.get(t.content, t) for n, t in named.items()
        }

        length = config.get("model_max_length", VERY_LARGE_INTEGER)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise UnsupportedModelError(
                f"{where}/tokenizer_config.json: model_max_length must be a positive int, got {length!r}"
            )
        try:
            return cls(
                vocab=vocab,
                merges=merges,
                model_max_length=length,
                special_tokens=special_tokens,
                extra_special_tokens=[by_content.get(t.content, t) for t in extras],
                added_tokens=added,
                split_special_tokens=bool(config.get("split_special_tokens", False)),
            )
        except (InvalidArgumentError, UnsupportedModelError) as e:
            # The constructor's checks (a merge of unknown tokens, a missing special token)
            # know no file: say which folder's files they are about.
            e.args = (f"{where}: {e.args[0]}", *e.args[1:]) if e.args else e.args
            raise

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write the tokenizer in the Hub's layout (``vocab.json``, ``merges.txt``,
        ``tokenizer_config.json``, ``special_tokens_map.json``), which transformers'
        ``CLIPTokenizer`` and diffusers read to the same ids; returns the folder."""
        root = Path(folder).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        if any(" " in a or " " in b or "\n" in a + b for a, b in self.merges):
            raise InvalidArgumentError("a merge holds a space or newline; merges.txt cannot")
        _write_json(root / "vocab.json", self.vocab, indent=None)
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        (root / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        names = {name: t.content for name, t in self.special_tokens.items()}
        config: dict[str, Any] = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            **names,
            "added_tokens_decoder": {
                str(i): t.to_dict() for i, t in sorted(self.added_tokens_decoder.items())
            },
        }
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        _write_json(root / "tokenizer_config.json", config)
        legacy = {
            name: {k: v for k, v in t.to_dict().items() if k != "special"}
            for name, t in self.special_tokens.items()
        }
        _write_json(root / "special_tokens_map.json", legacy)
        return root

    # ------------------------------------------------------------ the vocabulary

    def __len__(self) -> int:
        """Tokens in the vocabulary, added tokens included."""
        return len(self.vocab.keys() | self._added.keys())

    @property
    def max_token_id(self) -> int:
        """The largest id this tokenizer gives (vocabulary and added tokens); -1 if none."""
        return max([*self.vocab.values(), *self._added.values()], default=-1)

    def check_encoder(
        self, *, vocab_size: int, max_positions: int, where: str = "the text encoder"
    ) -> None:
        """Raise `InvalidConfigError` if this tokenizer does not fit a text encoder with
        ``vocab_size`` embeddings and ``max_positions`` positions (``where``'s config): an
        id it gives would index past the embedding table, or its window
        (``model_max_length``, start and end tokens included) is longer than the encoder's
        positions or shorter than 3. Either would fail only at generation time, inside the
        text encoder (``IndexError``) or while chunking a prompt."""
        if self.max_token_id >= vocab_size:
            raise InvalidConfigError(
                f"the tokenizer gives token ids up to {self.max_token_id} but {where} has "
                f"vocab_size={vocab_size} embeddings (ids 0 to {vocab_size - 1}); the tokenizer "
                "and the text encoder do not belong together"
            )
        if not 3 <= self.model_max_length <= max_positions:
            raise InvalidConfigError(
                f"the tokenizer's model_max_length={self.model_max_length} must be from 3 (start, "
                f"one token, end) to {where}'s max_position_embeddings={max_positions}; set "
                "model_max_length in tokenizer_config.json (77 for CLIP)"
            )

    def get_vocab(self) -> dict[str, int]:
        """Token → id, added tokens included."""
        return {**self.vocab, **self._added}

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (added tokens included), or None."""
        return self._added.get(token, self.vocab.get(token))

    def _special_id(self, name: str) -> int:
        return self._added[self.special_tokens[name].content]

    @property
    def bos_token_id(self) -> int:
        """The start token's id (``<|startoftext|>``)."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int:
        """The end token's id (``<|endoftext|>``)."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int:
        """The padding token's id (the end token for SD 1.x, ``!`` for SD 2.x)."""
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        """The unknown token's id (the end token for CLIP), or None without one."""
        return self._special_id("unk_token") if "unk_token" in self.special_tokens else None

    def _id_to_token(self, token_id: int) -> str | None:
        # tokenizers takes ids as u32: any other int is out of the vocabulary, not an OverflowError.
        return self.backend_tokenizer.id_to_token(token_id) if 0 <= token_id < 2**32 else None

    @overload
    def convert_ids_to_tokens(self, ids: int) -> str: ...
    @overload
    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...
    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """The token (string) of each id; `InvalidArgumentError` for an id out of the vocabulary."""
        if isinstance(ids, int):
            return self.convert_ids_to_tokens([ids])[0]
        tokens = [self._id_to_token(i) for i in ids]
        unknown = [i for i, t in zip(ids, tokens, strict=True) if t is None]
        if unknown:
            raise InvalidArgumentError(f"token ids {unknown[:5]} are not in the vocabulary")
        return [t for t in tokens if t is not None]

    # ------------------------------------------------------------ encoding

    def _encode(self, text: str) -> list[int]:
        """The token ids of ``text``, without start and end tokens."""
        return self.backend_tokenizer.encode(text, add_special_tokens=False).ids

    @overload
    def __call__(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: None = None,
        verbose: bool = True,
    ) -> Encoding[list[int]]: ...
    @overload
    def __call__(
        self,
        text: list[str] | tuple[str, ...],
        *,
        add_special_tokens: bool = True,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: None = None,
        verbose: bool = True,
    ) -> Encoding[list[list[int]]]: ...
    @overload
    def __call__(
        self,
        text: str | list[str] | tuple[str, ...],
        *,
        add_special_tokens: bool = True,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: Literal["pt"],
        verbose: bool = True,
    ) -> Encoding[torch.Tensor]: ...
    def __call__(
        self,
        text: str | list[str] | tuple[str, ...],
        *,
        add_special_tokens: bool = True,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: Literal["pt"] | None = None,
        verbose: bool = True,
    ) -> Encoding[Any]:
        """Token ids of a text or a batch of texts, with transformers' keywords.

        ``add_special_tokens`` wraps each text in start and end tokens. ``truncation``
        cuts ids (special tokens included) to ``max_length`` (default: `model_max_length`);
        left at None it is on when ``max_length`` is given without ``padding``.
        ``padding="max_length"`` pads to ``max_length`` (or `model_max_length`);
        ``True`` / ``"longest"`` to the batch's longest. ``return_tensors="pt"`` gives
        (batch, length) tensors. ``verbose`` is accepted for compatibility and ignored.
        """
        batch = [text] if isinstance(text, str) else list(text)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise InvalidArgumentError("text must be a string or a non-empty list of strings")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise InvalidArgumentError(
                f"padding must be a bool, 'longest' or 'max_length', got {padding!r}"
            )
        # transformers' rules: max_length alone switches truncation on; without max_length
        # both use model_max_length, unless that is the "no limit" placeholder.
        if truncation is None:
            truncation = max_length is not None and padding is False
        pad_to = {True: "longest", "longest": "longest", "max_length": "max_length"}.get(padding)
        length = self.model_max_length if max_length is None else max_length
        if max_length is None and length > LARGE_INTEGER:
            truncation = False
            pad_to = None if pad_to == "max_length" else pad_to
        extra = 2 if add_special_tokens else 0
        if truncation and length < extra:
            raise InvalidArgumentError(
                f"max_length {length} leaves no room for the start and end tokens"
            )
        rows: list[list[int]] = []
        for t in batch:
            ids = self._encode(t)
            if truncation:
                ids = ids[: length - extra]
            rows.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids)
        masks = [[1] * len(r) for r in rows]
        if pad_to is not None and rows:
            target = length if pad_to == "max_length" else max(len(r) for r in rows)
            for r, m in zip(rows, masks, strict=True):
                missing = max(0, target - len(r))
                r += [self.pad_token_id] * missing
                m += [0] * missing
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise InvalidArgumentError(
                    "texts of different lengths make no tensor; pass padding=True or 'max_length'"
                )
            return Encoding(
                input_ids=torch.tensor(rows, dtype=torch.long),
                attention_mask=torch.tensor(masks, dtype=torch.long),
            )
        if return_tensors is not None:
            raise InvalidArgumentError(
                f"return_tensors must be None or 'pt', got {return_tensors!r}"
            )
        if isinstance(text, str):
            return Encoding(input_ids=rows[0], attention_mask=masks[0])
        return Encoding(input_ids=rows, attention_mask=masks)

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer({len(self)} tokens, {len(self.merges)} merges, "
            f"model_max_length={self.model_max_length})"
        )


def _special(token: str | AddedToken, where: str) -> AddedToken:
    return (
        AddedToken.read(token, where=where)
        if isinstance(token, str)
        else replace(token, special=True)
    )


def _named_token(value: object, where: str, *, legacy: bool) -> AddedToken | None:
    """A named special token from tokenizer_config.json, or special_tokens_map.json when
    ``legacy``, with the flags transformers gives it (see `AddedToken.read`)."""
    if value is None:
        return None
    token = AddedToken.read(value, special=True if legacy else None, where=where)
    return replace(token, special=True)


def _extra_tokens(data: Mapping[str, Any], where: str, *, legacy: bool) -> list[AddedToken]:
    """The special tokens without a name of a config (or of special_tokens_map.json)."""
    values = data.get("extra_special_tokens") or data.get("additional_special_tokens") or []
    if isinstance(values, dict):  # transformers 5: named model-specific tokens
        values = list(values.values())
    if not isinstance(values, list):
        raise UnsupportedModelError(f"{where}: extra_special_tokens must be a list of tokens")
    tokens = [_named_token(v, where, legacy=legacy) for v in values]
    return [t for t in tokens if t is not None]


MAX_TOKEN_ID = 2**31 - 1
"""Largest token id a tokenizer file may give (ids index an embedding table)."""


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def _token_id(value: object, path: Path) -> int:
    """A token id from a tokenizer file: an int, or the decimal string of one (JSON object
    keys), from 0 to `MAX_TOKEN_ID`."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not _is_id(value):
        raise CorruptFileError(
            f"{path.parent.name}/{path.name}: token id {value!r} is not an int from 0 to "
            f"{MAX_TOKEN_ID}",
            path=path,
        )
    assert isinstance(value, int)
    return value


def _read_json(path: Path, where: str) -> dict[str, Any]:
    """A tokenizer file's JSON object, through latentkit's checked reader (a missing file
    is `MissingComponentError`, a malformed or oversized one `CorruptFileError`)."""
    if not path.is_file() and not path.exists():
        raise MissingComponentError(f"{where}: missing {path.name}")
    return read_json_object(path, label=f"{where}/{path.name}")


def _write_json(path: Path, data: Mapping[str, Any], indent: int | None = 2) -> None:
    text = json.dumps(data, indent=indent, sort_keys=indent is not None, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def _read_merges(path: Path, where: str) -> list[tuple[str, str]]:
    """merges.txt as tokenizers reads it: one "a b" pair a line (ended by LF or CRLF);
    lines starting with "#version" are skipped, any other line must be a pair."""
    if not path.exists():
        raise MissingComponentError(f"{where}: missing {path.name}")
    lines = read_text(path, label=f"{where}/{path.name}").replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    try:  # unpacking checks each line has two parts (one pass: CLIP's file has 48,894)
        return [(a, b) for a, b in (s.split(" ") for s in lines if not s.startswith("#version"))]
    except ValueError:
        number, line = next(
            (n, line)
            for n, line in enumerate(lines, start=1)
            if not line.startswith("#version") and len(line.split(" ")) != 2
        )
        raise UnsupportedModelError(
            f"{where}/{path.name} line {number}: {line!r} is not a merge 'a b'"
        ) from None


_CLIP_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "NFC"},
        {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
        {"type": "Lowercase"},
    ],
}
_CLIP_PATTERNS = (
    # transformers 5 writes the first; transformers 4 wrote the second. transformers 5
    # tokenizes with the first whichever the file holds, and so do we.
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
)


def _clip_backend(
    vocab: dict[str, int], merges: list[tuple[str, str]], *, unk_token: str | None
) -> tokenizers.Tokenizer:
    """CLIP's tokenizer in tokenizers' parts, as transformers 5's ``CLIPTokenizer`` builds
    it: a BPE model with CLIP's end-of-word mark, CLIP's normaliser and word pattern, then
    GPT-2's byte-level step (which also splits each word again by GPT-2's pattern, so
    ``<|endoftext|>`` typed as text is "<|", "endoftext", "|>")."""
    # Imported here, not at module level: `import latentkit` stays free of it.
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    try:
        model = BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=unk_token,
        )
    except Exception as e:  # tokenizers' errors are plain Exceptions
        # tokenizers checks each merge's two tokens and their join against the vocabulary;
        # find the merge, which its message does not name.
        bad = next(((a, b, t) for a, b in merges for t in (a, b, a + b) if t not in vocab), None)
        if bad is None:
            raise
        raise UnsupportedModelError(
            f"the merge {bad[0]!r} {bad[1]!r} needs {bad[2]!r}, which is not in the vocabulary"
        ) from e
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_PATTERNS[0]), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _backend_token(token: AddedToken) -> tokenizers.AddedToken:
    from tokenizers import AddedToken as BackendToken

    return BackendToken(
        token.content,
        single_word=token.single_word,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=token.normalized,
        special=token.special,
    )


def _backend_model(
    backend: Mapping[str, Any], where: str
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a tokenizer.json, after checking it describes CLIP's
    tokenizer: its normaliser, its pre-tokenizer and a BPE model with CLIP's options."""
    name = f"{where}/tokenizer.json"
    for key in ("normalizer", "pre_tokenizer", "model"):
        if backend.get(key) is not None and not isinstance(backend[key], dict):
            raise UnsupportedModelError(f"{name}: {key} must be a JSON object")
    if backend.get("normalizer") != _CLIP_NORMALIZER:
        raise UnsupportedModelError(
            f"{name}: the normalizer {json.dumps(backend.get('normalizer'))} is not CLIP's "
            "(NFC, whitespace runs to one space, lower case)"
        )
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    split, byte_level = (
        steps
        if isinstance(steps, list) and len(steps) == 2 and all(isinstance(x, dict) for x in steps)
        else [{}, {}]
    )
    if not (
        split.get("type") == "Split"
        and split.get("pattern") in [{"Regex": p} for p in _CLIP_PATTERNS]
        and split.get("behavior") == "Removed"
        and split.get("invert") is True
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("add_prefix_space") is False
        and byte_level.get("use_regex", True) is True
    ):
        raise UnsupportedModelError(
            f"{name}: the pre_tokenizer {json.dumps(pre)} is not CLIP's (its word pattern, "
            "then byte-level)"
        )
    model = backend.get("model") or {}
    clip: dict[str, tuple[object, ...]] = {  # the accepted values, CLIP's first
        "type": ("BPE",),
        "end_of_word_suffix": (END_OF_WORD,),
        "continuing_subword_prefix": ("", None),
        "dropout": (None,),
        "fuse_unk": (False, None),
        "byte_fallback": (False, None),
        "ignore_merges": (False, None),
    }
    wrong = [k for k, accepted in clip.items() if model.get(k) not in accepted]
    if wrong:
        given = ", ".join(f"{k}={model.get(k)!r}" for k in wrong)
        expected = ", ".join(f"{k}={clip[k][0]!r}" for k in wrong)
        raise UnsupportedModelError(
            f"{name}: the model is not CLIP's BPE ({given}; CLIP's: {expected})"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise UnsupportedModelError(f"{name}: model.vocab must map tokens to ids")
    listed = model.get("merges", [])
    if not isinstance(listed, list):
        raise UnsupportedModelError(f"{name}: model.merges must be a list of merges")
    merges: list[tuple[str, str]] = []
    for merge in listed:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not (
            isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)
        ):
            raise UnsupportedModelError(f"{name}: {merge!r} is not a merge of two tokens")
        merges.append((parts[0], parts[1]))
    return vocab, merges
