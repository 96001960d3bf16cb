"""A CLIP tokenizer built from scratch for a small, known vocabulary.

A model trained by latentkit on captions of a few hundred words does not need CLIP's
49,408 tokens: `build_word_tokenizer` makes a byte-level BPE tokenizer (the same class and
file format as CLIP's, so `latentkit.load_pipeline` and diffusers read it unchanged) in
which each given word is one token and any other text falls back to byte tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from latentkit.errors import InvalidArgumentError
from latentkit.tokenizer import BOS, END_OF_WORD, EOS, byte_alphabet

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def _merge(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as tokenizers does it (Sennrich et al. 2016): merge
    the lowest-ranked adjacent pair, the leftmost of equals, until no pair has a rank. The
    merge table grows word by word here, so tokenizers' model (built once) cannot be used."""
    while True:
        ranked = [(ranks[p], i) for i, p in enumerate(itertools.pairwise(symbols)) if p in ranks]
        if not ranked:
            return symbols
        _, i = min(ranked)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]


def build_word_tokenizer(
    words: Iterable[str], *, model_max_length: int = 77, pad_token: str = EOS
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is the 512 byte tokens (each byte alone and
    word-final), one token per word of ``words``, then the start and end tokens.

    Merges are added word by word, each after every earlier one, so a word's merges never
    apply to an earlier word (whose merges all rank lower) and the earlier ones leave each
    new word as one token once its own are added. Words must be as CLIP's normaliser leaves
    text (lower case, single spaces) and one pre-token each (letters only, one digit, or a
    run of punctuation); `InvalidArgumentError` names any that are not. Ids: bytes
    0-511, then the merged tokens (each word's prefixes, then the word itself with
    ``</w>``; duplicates dropped) in the order of ``words``, then start and end tokens.

    >>> tok = build_word_tokenizer(["red", "circle"], model_max_length=16)
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']
    """
    from transformers import CLIPTokenizer

    if model_max_length < 3:
        raise InvalidArgumentError(
            f"model_max_length must be at least 3 (start, one token, end), got {model_max_length}"
        )
    alphabet = byte_alphabet()
    base_vocab = [*alphabet, *(c + END_OF_WORD for c in alphabet)]
    # An empty tokenizer of the same class gives us CLIP's own normaliser and pre-tokeniser.
    probe = CLIPTokenizer(vocab={**{t: i for i, t in enumerate(base_vocab)}, BOS: 512, EOS: 513})
    backend = probe.backend_tokenizer

    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    vocab_words: list[str] = []
    seen: set[str] = set(base_vocab)
    word_tokens: dict[str, str] = {}
    for word in dict.fromkeys(words):
        if not word or backend.normalizer.normalize_str(word) != word:
            raise InvalidArgumentError(
                f"vocabulary word {word!r} is changed by CLIP's normaliser (lower case, NFC, "
                "single spaces); give it as CLIP will see it"
            )
        pieces = backend.pre_tokenizer.pre_tokenize_str(word)
        if len(pieces) != 1:
            raise InvalidArgumentError(
                f"vocabulary word {word!r} is split by CLIP's pre-tokeniser into "
                f"{[p for p, _ in pieces]}; a word must be letters only, one digit or punctuation"
            )
        chars = list(pieces[0][0])  # the word's bytes as alphabet characters
        word_tokens[word] = pieces[0][0] + END_OF_WORD
        symbols = _merge([*chars[:-1], chars[-1] + END_OF_WORD], ranks)
        while len(symbols) > 1:
            # The only applicable merge is this new, last-ranked one; merging left to right
            # shrinks the word by at least one symbol per merge.
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            token = pair[0] + pair[1]
            if token not in seen:
                seen.add(token)
                vocab_words.append(token)
            symbols = _merge(symbols, ranks)

    vocab_list = [*base_vocab, *vocab_words, BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    if pad_token not in vocab:
        raise InvalidArgumentError(f"pad_token {pad_token!r} is not in the vocabulary")
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token
    )
    for word, token in word_tokens.items():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if ids != [vocab[token]]:  # pragma: no cover - a bug here, not a user error
            raise AssertionError(f"{word!r} is not one token: {ids}")
    return tokenizer
