"""latentkit's CLIP tokenizer against transformers' CLIPTokenizer, on the same files and text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import write_tokenizer

import latentkit
from latentkit.checkpoints.configs import clip_tokenizer
from latentkit.errors import (
    CorruptFileError,
    InvalidArgumentError,
    MissingComponentError,
    UnsupportedModelError,
)
from latentkit.tokenizer import BOS, END_OF_WORD, EOS, CLIPTokenizer, byte_alphabet

REPO = Path(__file__).parents[1]
SHAPES = REPO / "latentkit" / "assets" / "shapes" / "tokenizer"
BASE_VOCAB = [*byte_alphabet(), *(c + END_OF_WORD for c in byte_alphabet())]
"""CLIP's first 512 tokens: each byte, alone and word-final."""


def reference(folder: Path) -> Any:
    from transformers import CLIPTokenizer as TransformersCLIPTokenizer

    return TransformersCLIPTokenizer.from_pretrained(str(folder))


def learned_bpe(merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A realistic CLIP-shaped vocabulary (no real one is available offline): up to
    ``merges`` merges learned by tokenizers' BPE trainer, with CLIP's normaliser and pre-tokenizer,
    on the repository's docs and sources; ids are the 512 byte tokens, the merged tokens
    in merge order, then the start and end tokens, as in CLIP's vocab.json."""
    from tokenizers import Tokenizer, models, trainers

    corpus = [
        p.read_text() for p in sorted([*REPO.glob("docs/*.md"), *REPO.glob("latentkit/**/*.py")])
    ]
    probe = reference_probe()
    backend = Tokenizer(
        models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD)
    )
    backend.normalizer, backend.pre_tokenizer = probe.normalizer, probe.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=512 + merges,
        initial_alphabet=list(byte_alphabet()),
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    learned = json.loads(backend.to_str())["model"]["merges"]
    pairs = [(a, b) for a, b in (m.split(" ") if isinstance(m, str) else m for m in learned)]
    tokens = dict.fromkeys([*BASE_VOCAB, *(a + b for a, b in pairs), BOS, EOS])
    return {t: i for i, t in enumerate(tokens)}, pairs


def reference_probe() -> Any:
    # An empty transformers CLIPTokenizer: CLIP's normaliser and pre-tokenizer objects.
    from transformers import CLIPTokenizer as TransformersCLIPTokenizer

    vocab = {t: i for i, t in enumerate([*BASE_VOCAB, BOS, EOS])}
    return TransformersCLIPTokenizer(vocab=vocab).backend_tokenizer


def added_token(content: str, **flags: bool) -> Any:
    from tokenizers import AddedToken

    return AddedToken(content, **flags)


def write_hub_layout(
    folder: Path,
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    pad_token: str = EOS,
    added: dict[str, int] | None = None,
) -> Path:
    """The files of stable-diffusion-v1-5's tokenizer/ (written by transformers 4):
    vocab.json, merges.txt, and configs naming start/end/unknown as AddedToken dicts
    with normalized=True; ``added`` as a legacy added_tokens.json (textual inversion)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )

    def token(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    named = {"bos_token": token(BOS), "eos_token": token(EOS), "unk_token": token(EOS)}
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad_token,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        **{k: {"__type": "AddedToken", **v} for k, v in named.items()},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({**named, "pad_token": pad_token}))
    if added:
        (folder / "added_tokens.json").write_text(json.dumps(added))
    return folder


ADDED = ["<cat-toy>", "<Cat-Toy>", "<w>", "<l>", "<R>", "<Dog>"]
"""Added tokens of the "added" folder, and text that contains them."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer folders in every layout latentkit reads, each with a reason to be here."""
    from transformers import CLIPTokenizer as TransformersCLIPTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    out: dict[str, Path] = {"shapes": SHAPES}  # the embedded model's: tokenizer.json layout
    for name, pad in (("tiny", EOS), ("tiny-sd2", "!")):  # SD 2.x pads with "!", an added token
        out[name] = root / name
        write_tokenizer(out[name], pad_token=pad)
    vocab, merges = learned_bpe(3000)
    out["learned-json"] = root / "learned-json"  # transformers 5's own save_pretrained
    TransformersCLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(
        str(out["learned-json"])
    )
    out["learned-hub"] = write_hub_layout(  # the Hub's SD 1.5 files, with an embedding token
        root / "learned-hub", vocab, merges, added={"<cat-toy>": len(vocab)}
    )
    # Textual-inversion style tokens with every flag, added and saved by transformers.
    tok = reference(out["tiny"])
    tok.add_tokens(
        [
            added_token("<cat-toy>"),
            added_token("<Cat-Toy>", normalized=False),
            added_token("<w>", single_word=True, normalized=False),
            added_token("<l>", lstrip=True, normalized=False),
            added_token("<R>", rstrip=True, normalized=True),
            added_token("<Dog>", normalized=True),
        ]
    )
    tok.save_pretrained(str(root / "added"))
    out["added"] = root / "added"
    # Unnamed special tokens and new named ones, in a legacy layout: transformers adds
    # them after the added_tokens.json ones, named before unnamed, ignoring listed ids.
    tiny = json.loads((out["tiny"] / "tokenizer.json").read_text())["model"]
    hub = write_hub_layout(
        root / "hub-extras", tiny["vocab"], tiny["merges"], added={"<x1>": 600, "<y>": 522}
    )
    config = json.loads((hub / "tokenizer_config.json").read_text())
    config |= {"sep_token": "<sep>", "additional_special_tokens": ["<x1>", "<X2>"]}
    (hub / "tokenizer_config.json").write_text(json.dumps(config))
    out["hub-extras"] = hub
    # Special tokens typed in the text tokenized as text (transformers' split_special_tokens).
    out["split"] = shutil.copytree(out["added"], root / "split")
    _edit_json("tokenizer_config.json", _set(["split_special_tokens"], True))(out["split"])
    # CLIP's own 49,408 tokens (the bundled merges), in the Hub's SD 1.5 layout.
    out["clip"] = clip_tokenizer().save_pretrained(root / "clip")
    return out


NAMES = [
    "tiny",
    "tiny-sd2",
    "shapes",
    "learned-json",
    "learned-hub",
    "added",
    "hub-extras",
    "split",
    "clip",
]


@pytest.fixture(scope="module", params=NAMES)
def pair(request: pytest.FixtureRequest, folders: dict[str, Path]) -> tuple[CLIPTokenizer, Any]:
    """(ours, transformers') for one folder."""
    folder = folders[request.param]
    return CLIPTokenizer.from_pretrained(folder), reference(folder)


FRAGMENTS = [
    BOS,
    EOS,
    "<|STARTOFTEXT|>",
    "<|EndOfText|>",
    "<|",
    "|>",
    *("'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "'", "''"),
    *(" ", "  ", "\n", "\t", "\r\n", "\u3000", "\xa0", "\x1c", "\u200b", "\u0085"),
    *("e\u0301", "é", "İ", "ΟΣ", "ß", "ﬁ", "café", "NAÏVE", "ǅ", "Ω"),
    *("日本語", "한국어", "😀", "👩\u200d👩\u200d👧", "½", "Ⅻ", "٣", "²", "2024", "0.5"),
    *("!", "!!!", "...", "(red:1.3)", "a", "photo", "of", "red", "cat", "circle", "square"),
    *("The", "tokenizer", "pipeline", "latent", "diffusion", "scheduler", "transformers"),
    *ADDED,
    "<CAT-TOY>",
    "<r>",
    "<dog>",
    *("<x1>", "<X2>", "<x2>", "<y>", "<sep>"),
]
TEXT = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
    ),
    max_size=14,
).map("".join)
"""Text of CLIP's hard cases: accents and combining marks, case mappings that change
length, CJK, emoji, digits, punctuation runs, contractions, whitespace that is (and is
not) whitespace to CLIP, the special-token strings, added tokens, and any code point but
surrogates (unassigned ones included)."""


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_ids_equal_transformers(pair: tuple[CLIPTokenizer, Any], text: str) -> None:
    ours, theirs = pair
    assert ours(text).input_ids == theirs(text).input_ids


TAGS = (
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, open mouth, "
    "blue eyes, blonde hair, shirt, hat, dress, ribbon, holding, jewelry, upper body, flower, "
    "outdoors, sky, day, cloud, hair ribbon, white dress, blue sky, sun hat, straw hat, "
    "(detailed background:1.2), [sunflower], {field}, light particles, lens flare, bokeh, "
    "depth of field, wind, floating hair, from side, cowboy shot, summer, sundress, "
    "bare shoulders, collarbone, earrings, necklace, bracelet, sleeveless, frills, "
    "happy, blush, teeth, hand on headwear, arm up, petals, cumulonimbus cloud, horizon, "
    "mountain, grass, path, fence, 8k wallpaper, ultra-detailed, absurdres"
)
"""A 60-tag prompt (well over CLIP's 77 tokens), as prompts for anime fine-tunes are written."""
PROMPTS = [
    TAGS,
    TAGS.upper().replace(", ", ",\n"),
    "日本の夏、麦わら帽子の少女、ひまわり畑、青空 — 高品質",
    "一只可爱的猫坐在窗台上，阳光明媚，中国水墨画风格",
    "고양이 한 마리가 창가에 앉아 있다, 수채화",
    "a cat 🐱 wearing a crown 👑, 🔥🔥🔥, family 👩\u200d👩\u200d👧 emoji, flags 🇯🇵🇫🇷",
    "  lots\t of\n\n whitespace\u3000and\xa0non-breaking   spaces  ",
    "Ünïcödé NFC vs NFD: cafe\u0301 café, ΟΔΥΣΣΕΥΣ, ß, ﬁne, İstanbul",
    f"{BOS}already wrapped{EOS} and <|STARTOFTEXT|> typed, don't, we'll, it's, I'M",
    "(red:1.3) [blue] {{green}} <lora:foo:0.8> BREAK 0.5 2024 ½ Ⅻ ٣",
    "",
]
"""Prompts of every kind users write: long tag lists, CJK, emoji, whitespace, Unicode
normalisation and case, special-token strings, A1111 syntax."""


@pytest.mark.parametrize("padding", [False, "max_length"])
def test_real_prompts_equal_transformers_on_clips_vocabulary(
    folders: dict[str, Path], padding: bool | str
) -> None:
    ours, theirs = CLIPTokenizer.from_pretrained(folders["clip"]), reference(folders["clip"])
    call: dict[str, Any] = {"padding": padding, "truncation": padding is not False}
    mine = ours(PROMPTS, **call)
    expected = theirs(PROMPTS, **call)
    assert mine.input_ids == expected.input_ids
    assert mine.attention_mask == expected.attention_mask
    if padding is False:
        assert len(mine.input_ids[0]) > 77  # the tag prompt is long: nothing cut
    else:
        assert {len(ids) for ids in mine.input_ids} == {77}


CALLS: list[dict[str, Any]] = [
    # TextConditioner, per emphasis run:
    {"add_special_tokens": False, "truncation": False, "verbose": False},
    # diffusers' encode_prompt and examples/train_shapes.py:
    {"padding": "max_length", "max_length": 77, "truncation": True, "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 8, "truncation": True},
    {"padding": "max_length", "truncation": True},  # to model_max_length
    {"truncation": True},
    {"max_length": 6},  # max_length alone truncates
    {"padding": "max_length", "max_length": 6},  # ...but not with padding: long rows stay
    {"padding": True},
    {"padding": "longest", "return_tensors": "pt"},
    {"add_special_tokens": False, "truncation": True, "max_length": 3, "padding": "max_length"},
]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=3), call=st.sampled_from(CALLS))
def test_padding_and_truncation_equal_transformers(
    pair: tuple[CLIPTokenizer, Any], texts: list[str], call: dict[str, Any]
) -> None:
    ours, theirs = pair
    for given_text in (texts, texts[0]):
        mine, reference_encoding = ours(given_text, **call), theirs(given_text, **call)
        for key in ("input_ids", "attention_mask"):
            a, b = getattr(mine, key), reference_encoding[key]
            if call.get("return_tensors") == "pt":
                assert isinstance(a, torch.Tensor) and a.dtype == b.dtype
                assert torch.equal(a, b)
            else:
                assert a == b


def test_special_and_added_tokens_are_one_token(folders: dict[str, Path]) -> None:
    tok = CLIPTokenizer.from_pretrained(folders["added"])
    vocab = tok.get_vocab()
    cat = vocab["<cat-toy>"]
    assert tok("a <cat-toy> photo", add_special_tokens=False).input_ids[1] == cat
    # Normalized tokens match the lower-cased text; the others only as written.
    assert tok("<CAT-TOY>", add_special_tokens=False).input_ids == [cat]
    assert tok("<Cat-Toy>", add_special_tokens=False).input_ids == [vocab["<Cat-Toy>"]]
    assert tok("<dog>", add_special_tokens=False).input_ids == [vocab["<Dog>"]]
    # single_word: not inside a word.
    assert vocab["<w>"] not in tok("a<w>", add_special_tokens=False).input_ids
    assert tok(f"{EOS}{BOS}", add_special_tokens=False).input_ids == [
        tok.eos_token_id,
        tok.bos_token_id,
    ]
    assert len(tok) == len(reference(folders["added"])) == len(vocab)
    # SD 2.x pads with "!", which transformers makes an added token: "!" alone is id 0.
    sd2 = CLIPTokenizer.from_pretrained(folders["tiny-sd2"])
    assert sd2.pad_token_id == 0
    assert sd2("wow!!", add_special_tokens=False).input_ids[-2:] == [0, 0]
    assert sd2.convert_ids_to_tokens([0, sd2.eos_token_id]) == ["!", EOS]


def test_bpe_merges_one_pair_at_a_time(tmp_path: Path) -> None:
    # Merging (x, y) at the start makes (xy, x), ranked higher, which then takes the next
    # x: tokenizers gives xyx·y·z, where merging every (x, y) first would give xy·xy·z.
    merges = [("xy", "x"), ("x", "y")]
    tokens = [*BASE_VOCAB, "xyx", "xy", BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    write_hub_layout(tmp_path, vocab, merges)
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    ids = ours("xyxyz", add_special_tokens=False).input_ids
    assert ours.convert_ids_to_tokens(ids) == ["xyx", "y", "z</w>"]
    assert ids == reference(tmp_path)("xyxyz", add_special_tokens=False).input_ids


def test_a_byte_without_a_symbol_is_the_unknown_token(tmp_path: Path) -> None:
    # A vocabulary without "©" (byte 0xA9, the second byte of "é" in UTF-8): transformers
    # writes the unknown token for it, and so does latentkit.
    tokens = [t for t in BASE_VOCAB if t not in ("©", "©</w>")]
    vocab = {t: i for i, t in enumerate([*tokens, BOS, EOS])}
    write_hub_layout(tmp_path, vocab, [])
    ids = CLIPTokenizer.from_pretrained(tmp_path)("café é").input_ids
    assert ids == reference(tmp_path)("café é").input_ids
    assert ids.count(vocab[EOS]) == 3  # the end token and one unknown byte per word
    # Without an unknown token tokenizers would drop the byte, and transformers fails on it
    # at the first text that has one: latentkit refuses the files.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        _edit_json(name, _set(["unk_token"], None))(tmp_path)
    with pytest.raises(UnsupportedModelError, match="lacks the byte symbol '©'"):
        CLIPTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["tiny-sd2", "learned-hub", "added", "hub-extras", "shapes"])
def test_save_pretrained_round_trip(folders: dict[str, Path], tmp_path: Path, name: str) -> None:
    ours = CLIPTokenizer.from_pretrained(folders[name])
    saved = ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert (saved / "merges.txt").read_text().startswith("#version: 0.2\n")
    texts = [f"A <cat-toy> of {BOS}red!! cats' <Dog> <w> <l>  circles<R> x", "", "ΟΣ 日本語 😀"]
    texts.append("<x1><X2><sep> <y>")
    expected = reference(folders[name])(texts).input_ids
    assert reference(saved)(texts).input_ids == expected
    again = CLIPTokenizer.from_pretrained(saved)
    assert again(texts).input_ids == ours(texts).input_ids == expected
    assert again.added_tokens_decoder == ours.added_tokens_decoder
    assert again.model_max_length == ours.model_max_length
    assert len(again) == len(reference(saved)) == len(ours)


def test_tokenizer_json_wins_over_vocab_and_merges(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    # Both layouts in one folder, with different vocabularies: transformers reads tokenizer.json.
    folder = shutil.copytree(folders["learned-hub"], tmp_path / "both")
    shutil.copy(folders["tiny"] / "tokenizer.json", folder)
    text = "the tokenizer of a photo"
    ours = CLIPTokenizer.from_pretrained(folder)
    assert ours(text).input_ids == reference(folder)(text).input_ids
    assert len(ours) == len(reference(folder))
    assert ours.vocab == json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def test_transformers_4_tokenizer_json_reads_as_transformers_5_does(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    # transformers 4 wrote CLIP's pattern without the special-token strings; transformers 5
    # tokenizes with its own pattern whatever the file says, and so does latentkit.
    shutil.copytree(folders["tiny"], tmp_path, dirs_exist_ok=True)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    split = data["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = "'s|" + split["pattern"]["Regex"].split("|'s|", 1)[1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    text = "<|STARTOFTEXT|>!x<|ENDOFTEXT|>'s"
    assert (
        CLIPTokenizer.from_pretrained(tmp_path)(text).input_ids
        == reference(tmp_path)(text).input_ids
    )


def _edit_json(name: str, change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return edit


def _set(path: list[str], value: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            lambda f: (f / "tokenizer_config.json").unlink(),
            MissingComponentError,
            r"tokenizer_config\.json",
        ),
        (
            _edit_json("tokenizer_config.json", _set(["tokenizer_class"], "T5Tokenizer")),
            UnsupportedModelError,
            "T5Tokenizer",
        ),
        (
            _edit_json("tokenizer.json", _set(["normalizer"], {"type": "NFKC"})),
            UnsupportedModelError,
            "normalizer",
        ),
        (
            _edit_json("tokenizer.json", _set(["pre_tokenizer"], {"type": "Whitespace"})),
            UnsupportedModelError,
            "pre_tokenizer",
        ),
        (
            _edit_json("tokenizer.json", _set(["model", "end_of_word_suffix"], None)),
            UnsupportedModelError,
            "end_of_word_suffix",
        ),
        (
            _edit_json("tokenizer.json", _set(["model", "type"], "WordPiece")),
            UnsupportedModelError,
            "BPE",
        ),
        (
            _edit_json("tokenizer.json", _set(["model", "merges"], [["q", "z"]])),
            UnsupportedModelError,
            "'qz'",
        ),
        (
            lambda f: (f / "tokenizer.json").write_text("{not json"),
            CorruptFileError,
            "not valid JSON",
        ),
        (
            _edit_json("tokenizer_config.json", _set(["pad_token"], None)),
            UnsupportedModelError,
            "pad_token",
        ),
    ],
)
def test_bad_tokenizer_json_folders_raise_typed_errors(
    folders: dict[str, Path],
    tmp_path: Path,
    edit: Callable[[Path], None],
    error: type[Exception],
    match: str,
) -> None:
    shutil.copytree(folders["tiny"], tmp_path, dirs_exist_ok=True)
    edit(tmp_path)
    with pytest.raises(error, match=match):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_bad_hub_folders_raise_typed_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MissingComponentError, match="tokenizer folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere")
    folder = shutil.copytree(folders["learned-hub"], tmp_path / "hub")
    (folder / "merges.txt").unlink()
    with pytest.raises(MissingComponentError, match=r"merges\.txt"):
        CLIPTokenizer.from_pretrained(folder)
    (folder / "merges.txt").write_text("#version: 0.2\nt h e\n")
    with pytest.raises(UnsupportedModelError, match="line 2"):
        CLIPTokenizer.from_pretrained(folder)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "vocab.json").unlink()
    with pytest.raises(MissingComponentError, match=r"vocab\.json"):
        CLIPTokenizer.from_pretrained(folder)


def test_bad_calls_raise_typed_errors() -> None:
    tok = CLIPTokenizer.from_pretrained(SHAPES)
    with pytest.raises(InvalidArgumentError, match="different lengths"):
        tok(["a", "a red circle"], return_tensors="pt")
    with pytest.raises(InvalidArgumentError, match="max_length 1"):
        tok("a", truncation=True, max_length=1)
    with pytest.raises(InvalidArgumentError, match="not in the vocabulary"):
        tok.convert_ids_to_tokens([len(tok)])
    with pytest.raises(InvalidArgumentError, match="list of strings"):
        tok([1, 2])  # type: ignore[list-item]


def test_loading_a_pipeline_imports_no_transformers() -> None:
    # Tokenizing needs only tokenizers (the Rust library), imported when a tokenizer is built.
    code = (
        "import sys, latentkit\n"
        "print('tokenizers' in sys.modules)\n"
        "pipe = latentkit.load_pipeline('latentkit/shapes', device='cpu', progress=False)\n"
        "assert pipe.text[0].tokenize(['a red circle']).ids.shape[-1] == 16\n"
        "print('tokenizers' in sys.modules)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split("\n")[:3] == ["False", "True", "[]"], out.stdout


def test_the_pipeline_tokenizer_is_latentkits() -> None:
    pipe = latentkit.load_pipeline("latentkit/shapes", device="cpu", progress=False)
    assert isinstance(pipe.text[0].tokenizer, CLIPTokenizer)
    prompts = ["a red circle left of a blue square", ""]
    expected = reference(SHAPES)(
        prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    assert torch.equal(pipe.text[0].tokenize(prompts).ids[:, 0], expected.input_ids)
