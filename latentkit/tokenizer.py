"""CLIP's byte-level BPE tokenizer in pure Python, with transformers' token ids.

`CLIPTokenizer` reads the ``tokenizer/`` folder of a Stable Diffusion model and gives, for
any text, the ids transformers' ``CLIPTokenizer`` (version 5) gives for the same files,
without importing transformers (about a second of a pipeline's load time). Text runs
through CLIP's steps (Radford et al. 2021; ``simple_tokenizer.py`` in OpenAI's CLIP):

1. added tokens (start/end, textual-inversion tokens) are cut out first, so text equal to
   one is that one token;
2. the rest is normalised: NFC, every run of whitespace to one space, lower case;
3. split into words by CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|
   'll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (whitespace between words is dropped);
4. each word's UTF-8 bytes are written in `byte_alphabet` and merged by byte-pair
   encoding (Sennrich et al. 2016), its last symbol marked with ``</w>``.

Characters unassigned in the Unicode version of Python's ``unicodedata`` (14.0 for Python
3.11) may be classified differently from the newer tables tokenizers uses.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
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

_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
"""``\\s`` of tokenizers' regex engines: Unicode White_Space. Python's ``str.isspace`` also
counts U+001C..U+001F, which CLIP's pattern keeps as punctuation."""
_WHITESPACE_RUN = re.compile(f"[{re.escape(''.join(sorted(_WHITESPACE)))}]+")

_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
_SPECIAL_WORDS = (BOS, EOS)

_CACHE_SIZE = 10_000
"""Words whose BPE result is kept (tokenizers keeps as many)."""

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


_BYTE_TABLE = dict(
    zip(
        [*_PRINTABLE, *(b for b in range(256) if b not in _PRINTABLE)],
        byte_alphabet(),
        strict=True,
    )
)
"""`str.translate` table from the Latin-1 view of UTF-8 bytes to `byte_alphabet`."""


def _bpe(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word, as tokenizers does it: merge the lowest-ranked
    adjacent pair (the leftmost of equals), one at a time, until no pair has a rank.

    One at a time matters: a merge can make a pair that outranks the remaining
    occurrences of the pair just merged. A heap of (rank, position) keeps a long word
    from costing a scan of all its pairs per merge."""
    merged = list(symbols)  # merged[i] == "" once symbol i has joined the one before it
    after = [*range(1, len(merged)), -1]
    before = list(range(-1, len(merged) - 1))
    heap = [
        (r, i)
        for i, pair in enumerate(itertools.pairwise(merged))
        if (r := ranks.get(pair)) is not None
    ]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = after[i] if merged[i] else -1
        if j < 0 or ranks.get((merged[i], merged[j])) != rank:
            continue  # the pair changed since it was queued
        merged[i], merged[j] = merged[i] + merged[j], ""
        after[i] = after[j]
        if after[i] >= 0:
            before[after[i]] = i
        for k in (before[i], i):  # the new pairs on either side of the merged symbol
            if k >= 0 and after[k] >= 0:
                r = ranks.get((merged[k], merged[after[k]]))
                if r is not None:
                    heapq.heappush(heap, (r, k))
    return [s for s in merged if s]


def normalize(text: str) -> str:
    """CLIP's normaliser: NFC, every run of whitespace to one space, lower case."""
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    # Lower case character by character, as tokenizers does: str.lower() alone would give
    # a final sigma ('ς') at the end of a word where tokenizers gives 'σ'.
    return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


def _kind(c: str) -> str:
    if c in _WHITESPACE:
        return " "
    category = unicodedata.category(c)[0]
    return category if category in "LN" else "P"


def pre_tokenize(text: str) -> list[str]:
    """Normalised text split into words by CLIP's pattern (see the module docstring)."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "<" and text.startswith(_SPECIAL_WORDS, i):
            # CLIP's pattern keeps "<|endoftext|>" whole; the byte-level step after it then
            # splits the word again by GPT-2's pattern, into "<|", "endoftext", "|>".
            end = text.index("|>", i + 2)
            words += [text[i : i + 2], text[i + 2 : end], "|>"]
            i = end + 2
            continue
        if c == "'":
            rest = next((s for s in _CONTRACTIONS if text.startswith(s, i + 1)), None)
            if rest is not None:
                words.append(c + rest)
                i += 1 + len(rest)
                continue
        kind = _kind(c)
        j = i + 1
        if kind == "L" or kind == "P":  # a run of letters, or of anything but those
            while j < n and _kind(text[j]) == kind:
                j += 1
        if kind != " ":  # whitespace separates words and is dropped; a number is one digit
            words.append(text[i:j])
        i = j
    return words


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
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        for a, b in self.merges:
            missing = [t for t in (a, b, a + b) if t not in self.vocab]
            if missing:
                raise UnsupportedModelError(
                    f"the merge {a!r} {b!r} needs {missing[0]!r}, which is not in the vocabulary"
                )
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
        self._added: dict[str, int] = {}
        self.added_tokens_decoder: dict[int, AddedToken] = {}
        """The added tokens by id, special ones included."""
        next_id = len(self.vocab)
        for token in ordered:
            if not token.content:
                continue
            known = self._added.get(token.content, self.vocab.get(token.content))
            if known is None:
                known, next_id = next_id, next_id + 1
            self._added[token.content] = known
            self.added_tokens_decoder[known] = token
        for name, token in self.special_tokens.items():
            self.special_tokens[name] = self.added_tokens_decoder[self._added[token.content]]
        self._ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self._ids_to_tokens.update({i: t.content for i, t in self.added_tokens_decoder.items()})
        matched = [
            (i, t)
            for i, t in self.added_tokens_decoder.items()
            if not (split_special_tokens and t.special)
        ]
        self._raw_patterns = _Patterns({t.content: (i, t) for i, t in matched if not t.normalized})
        self._normalized_patterns = _Patterns(
            {normalize(t.content): (i, t) for i, t in matched if t.normalized}
        )
        self._cache: dict[str, list[int]] = {}

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
        if not all(_is_id(i) for i in vocab.values()):
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

    @overload
    def convert_ids_to_tokens(self, ids: int) -> str: ...
    @overload
    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...
    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """The token (string) of each id; `InvalidArgumentError` for an id out of the vocabulary."""
        if isinstance(ids, int):
            return self.convert_ids_to_tokens([ids])[0]
        unknown = [i for i in ids if i not in self._ids_to_tokens]
        if unknown:
            raise InvalidArgumentError(f"token ids {unknown[:5]} are not in the vocabulary")
        return [self._ids_to_tokens[i] for i in ids]

    # ------------------------------------------------------------ encoding

    def _encode(self, text: str) -> list[int]:
        """The token ids of ``text``, without start and end tokens."""
        ids: list[int] = []
        for raw, token in self._raw_patterns.split(text):
            if token is not None:
                ids.append(token)
                continue
            for piece, added in self._normalized_patterns.split(normalize(raw)):
                if added is not None:
                    ids.append(added)
                    continue
                for word in pre_tokenize(piece):
                    ids += self._word_ids(word)
        return ids

    def _word_ids(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = list(word.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE))
        chars[-1] += END_OF_WORD
        unk = self.special_tokens.get("unk_token")
        symbols = []
        for c in chars:
            if c in self.vocab:
                symbols.append(c)
            elif unk is not None and unk.content in self.vocab:
                # tokenizers looks the unknown token up in the BPE vocabulary only.
                symbols.append(unk.content)
            else:
                raise InvalidArgumentError(
                    f"{c!r} is not in the vocabulary, and the tokenizer has no unknown token for it"
                )
        ids = [self.vocab[s] for s in _bpe(symbols, self._ranks)]
        if len(self._cache) < _CACHE_SIZE:
            self._cache[word] = ids
        return ids

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


class _Patterns:
    """Added tokens found in text as tokenizers finds them: leftmost first, the longest
    there, not overlapping; then each token's single_word, lstrip and rstrip apply."""

    def __init__(self, patterns: Mapping[str, tuple[int, AddedToken]]) -> None:
        self.patterns = dict(patterns)
        self._by_first: dict[str, list[str]] = {}
        for p in sorted(self.patterns, key=len, reverse=True):
            self._by_first.setdefault(p[0], []).append(p)

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        """``text`` cut into (text, None) and (token text, token id) parts, in order."""
        if not self._by_first:
            yield text, None
            return
        done = 0  # the end of the last part given
        i, n = 0, len(text)
        while i < n:
            candidates = self._by_first.get(text[i], ())
            found = next((p for p in candidates if text.startswith(p, i)), None)
            if found is None:
                i += 1
                continue
            start, stop = i, i + len(found)
            i = stop  # the search goes on after the match, whether it is kept or not
            token_id, token = self.patterns[found]
            if token.single_word and (
                (start > 0 and _is_word_char(text[start - 1]))
                or (stop < n and _is_word_char(text[stop]))
            ):
                continue
            if token.lstrip:
                left = len(text[:start].rstrip("".join(_WHITESPACE)))
                start = max(left, done)
            if token.rstrip:
                stop = n - len(text[stop:].lstrip("".join(_WHITESPACE)))
            if done < start:
                yield text[done:start], None
            yield text[start:stop], token_id
            done = stop
        if done != n:
            yield text[done:], None


_WORD_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Nl", "Nd", "Mn", "Mc", "Me", "Pc"})
_ALPHABETIC_SYMBOLS = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))
"""Symbols (So) with Unicode's Other_Alphabetic property: circled and squared letters."""


def _is_word_char(c: str) -> bool:
    """``\\w`` of Rust's regex crate (Unicode's word characters), for single_word tokens."""
    if unicodedata.category(c) in _WORD_CATEGORIES or c in "\u200c\u200d":
        return True
    return any(a <= ord(c) <= b for a, b in _ALPHABETIC_SYMBOLS)


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
    pairs = [line.split(" ") for line in lines if not line.startswith("#version")]
    if any(len(parts) != 2 for parts in pairs):
        number, line = next(
            (n, line)
            for n, line in enumerate(lines, start=1)
            if not line.startswith("#version") and len(line.split(" ")) != 2
        )
        raise UnsupportedModelError(
            f"{where}/{path.name} line {number}: {line!r} is not a merge 'a b'"
        )
    return [(a, b) for a, b in pairs]


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
