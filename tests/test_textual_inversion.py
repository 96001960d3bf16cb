"""Textual inversion (`latentkit.adapters.textual_inversion`) against diffusers'
``load_textual_inversion`` on the tiny SD 1.x and SDXL pipelines: the same token ids for a
prompt using the token (multi-vector tokens expanded as diffusers' ``maybe_convert_prompt``
does) and the same prompt embeddings, for every file format.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from safetensors.torch import save_file

from latentkit.adapters import AdapterMismatchError, PartialAdapterWarning
from latentkit.adapters.common import get_module
from latentkit.adapters.textual_inversion import (
    EmbeddingTokenizer,
    ExtendedEmbedding,
    TextualInversion,
    add_tokens,
    apply_textual_inversion,
    load_textual_inversion,
    read_textual_inversion,
    textual_inversion_from_state_dict,
)
from latentkit.errors import InvalidArgumentError, PickleWeightsError
from latentkit.models.text_encoder import CLIPTextConfig, CLIPTextEncoder, rename_checkpoint_key
from latentkit.tokenizer import CLIPTokenizer

EMBEDDING_ATOL = 1e-6
"""Largest difference allowed between our prompt embeddings and diffusers' (fp32)."""

PROMPTS = [
    "a <cat-toy> photo",
    "a red photo of<cat-toy>, and <cat-toy> again",
    "no token here",
]


def our_text_encoder(reference: Any) -> CLIPTextEncoder:
    config = {**reference.config.to_dict(), "architectures": [type(reference).__name__]}
    with torch.device("meta"):
        encoder = CLIPTextEncoder(CLIPTextConfig.from_dict(config))
    state = {rename_checkpoint_key(k): v for k, v in reference.state_dict().items()}
    encoder.load_state_dict({k: v for k, v in state.items() if k}, strict=True, assign=True)
    return encoder.eval()


def our_tokenizer(reference: Any, folder: Path) -> CLIPTokenizer:
    reference.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(folder)


def encode(tokenizer: Any, encoder: Any, prompt: str) -> tuple[list[int], torch.Tensor]:
    """Token ids padded to the window, and the encoder's last hidden states for them."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
    return list(ids), torch.stack([out.last_hidden_state, out.hidden_states[-2]])


def diffusers_encode(
    pipe: Any, tokenizer: Any, encoder: Any, prompt: str
) -> tuple[list[int], torch.Tensor]:
    return encode(tokenizer, encoder, pipe.maybe_convert_prompt(prompt, tokenizer))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pipe = tiny_models.build_pipeline("sd1")
    tokenizer = our_tokenizer(pipe.tokenizer, tmp_path_factory.mktemp("tokenizer"))
    return pipe, tokenizer, our_text_encoder(pipe.text_encoder)


def a1111_pt(vectors: torch.Tensor, name: str) -> dict[str, Any]:
    """The dict A1111 saves in an embedding .pt."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(vectors)},
        "name": name,
        "step": 120,
        "sd_checkpoint": "ffffffff",
        "sd_checkpoint_name": "v1-5-pruned",
    }


@pytest.mark.parametrize(
    "form", ["diffusers", "diffusers-1-d", "multi-vector", "a1111-pt", "a1111-safetensors"]
)
def test_embedding_files_match_diffusers(sd1: Any, form: str, tmp_path: Path) -> None:
    pipe, base_tokenizer, base_encoder = sd1
    gen = torch.Generator().manual_seed(4)
    count = 3 if form in ("multi-vector", "a1111-pt") else 1
    vectors = torch.randn(count, 32, generator=gen)
    token = "<cat-toy>"
    path = tmp_path / "embedding.safetensors"
    given: str | None = None  # the token passed, when the file does not name it
    if form == "diffusers":
        save_file({token: vectors}, str(path))
        reference_input: Any = {token: vectors}
    elif form == "diffusers-1-d":
        save_file({token: vectors[0]}, str(path))
        reference_input = {token: vectors[0]}
    elif form == "multi-vector":
        save_file({token: vectors}, str(path))
        reference_input = {token: vectors}
    elif form == "a1111-pt":
        path = tmp_path / "cat-toy.pt"
        torch.save(a1111_pt(vectors, token), str(path))
        reference_input = a1111_pt(vectors, token)
    else:
        save_file({"emb_params": vectors}, str(path))
        reference_input, given = {"emb_params": vectors}, token
    reference = copy.deepcopy(pipe)
    reference.load_textual_inversion(reference_input, token=given)
    pairs = load_textual_inversion(
        path,
        encoders={"text_encoder": (base_tokenizer, base_encoder)},
        token=given,
        allow_pickle=form == "a1111-pt",
    )
    pair = pairs["text_encoder"]
    assert pair is not None
    tokenizer, encoder = pair
    for prompt in PROMPTS:
        ids, embeds = encode(tokenizer, encoder, prompt)
        expected_ids, expected = diffusers_encode(
            reference, reference.tokenizer, reference.text_encoder, prompt
        )
        assert ids == expected_ids, prompt
        assert (embeds - expected).abs().max().item() <= EMBEDDING_ATOL, prompt
    first = tokenizer.token_to_id(token)
    assert first == len(base_tokenizer)  # the next free id, as transformers' add_tokens gives
    assert tokenizer("a <cat-toy>", add_special_tokens=False).input_ids[1:] == list(
        range(first, first + count)
    )


def test_base_tokenizer_and_encoder_untouched_and_shared(sd1: Any) -> None:
    _, base_tokenizer, base_encoder = sd1
    prompt = "a <cat-toy> photo"
    before_ids, before = encode(base_tokenizer, base_encoder, prompt)
    vocab = len(base_tokenizer)
    tokenizer, encoder = add_tokens(
        tokenizer=base_tokenizer,
        text_encoder=base_encoder,
        vectors=torch.randn(2, 32),
        token="<cat-toy>",
    )
    after_ids, after = encode(base_tokenizer, base_encoder, prompt)
    assert after_ids == before_ids and torch.equal(after, before) and len(base_tokenizer) == vocab
    assert isinstance(tokenizer, EmbeddingTokenizer) and tokenizer is not base_tokenizer
    # Every parameter is the base's own tensor (the embedding's extra rows are a buffer).
    base_params = dict(base_encoder.named_parameters())
    for name, param in encoder.named_parameters():
        assert param.data_ptr() == base_params[name].data_ptr(), name
    embedding = get_module(encoder, "text_model.embeddings.token_embedding")
    assert isinstance(embedding, ExtendedEmbedding) and embedding.num_embeddings == vocab + 2
    assert encoder.state_dict().keys() == base_encoder.state_dict().keys()
    # Text without the token tokenizes and encodes as before.
    for text in ("no token here", "a red photo"):
        assert encode(tokenizer, encoder, text)[0] == encode(base_tokenizer, base_encoder, text)[0]
        assert torch.equal(
            encode(tokenizer, encoder, text)[1], encode(base_tokenizer, base_encoder, text)[1]
        )


def test_stacked_embeddings_match_diffusers(sd1: Any) -> None:
    pipe, base_tokenizer, base_encoder = sd1
    gen = torch.Generator().manual_seed(5)
    first, second = torch.randn(2, 32, generator=gen), torch.randn(1, 32, generator=gen)
    reference = copy.deepcopy(pipe)
    reference.load_textual_inversion({"<a>": first})
    reference.load_textual_inversion({"<b>": second})
    one = apply_textual_inversion(
        {"text_encoder": (base_tokenizer, base_encoder)},
        TextualInversion({"text_encoder": first}, "<a>"),
    )
    two = apply_textual_inversion(one, TextualInversion({"text_encoder": second}, "<b>"))
    pair = two["text_encoder"]
    assert pair is not None
    for prompt in ("<b> and <a>, <a><b>", "a photo"):
        ids, embeds = encode(*pair, prompt)
        expected_ids, expected = diffusers_encode(
            reference, reference.tokenizer, reference.text_encoder, prompt
        )
        assert ids == expected_ids
        assert (embeds - expected).abs().max().item() <= EMBEDDING_ATOL


def test_sdxl_clip_l_clip_g_match_diffusers(tmp_path: Path) -> None:
    pipe = tiny_models.build_pipeline("sdxl")
    gen = torch.Generator().manual_seed(6)
    clip_l, clip_g = torch.randn(2, 32, generator=gen), torch.randn(2, 48, generator=gen)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "sdxl.safetensors"))
    encoders: dict[str, tuple[CLIPTokenizer, Any] | None] = {
        "text_encoder": (
            our_tokenizer(pipe.tokenizer, tmp_path / "t1"),
            our_text_encoder(pipe.text_encoder),
        ),
        "text_encoder_2": (
            our_tokenizer(pipe.tokenizer_2, tmp_path / "t2"),
            our_text_encoder(pipe.text_encoder_2),
        ),
    }
    pairs = load_textual_inversion(tmp_path / "sdxl.safetensors", encoders=encoders, token="<s0>")
    reference = copy.deepcopy(pipe)
    reference.load_textual_inversion(
        clip_l, token="<s0>", text_encoder=reference.text_encoder, tokenizer=reference.tokenizer
    )
    reference.load_textual_inversion(
        clip_g, token="<s0>", text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2
    )
    for component, tokenizer_name in (
        ("text_encoder", "tokenizer"),
        ("text_encoder_2", "tokenizer_2"),
    ):
        pair = pairs[component]
        assert pair is not None
        ids, embeds = encode(*pair, "a <s0> photo")
        ref_tok, ref_enc = getattr(reference, tokenizer_name), getattr(reference, component)
        expected_ids, expected = diffusers_encode(reference, ref_tok, ref_enc, "a <s0> photo")
        assert ids == expected_ids
        assert (embeds - expected).abs().max().item() <= EMBEDDING_ATOL, component
        with torch.no_grad():
            ours, theirs = pair[1](torch.tensor([ids])), ref_enc(torch.tensor([ids]))
        pooled = "text_embeds" if component == "text_encoder_2" else "pooler_output"
        difference = getattr(ours, pooled) - getattr(theirs, pooled)
        assert difference.abs().max().item() <= EMBEDDING_ATOL
    # The refiner has only the OpenCLIP encoder: clip_l is left out, with a warning.
    with pytest.warns(PartialAdapterWarning, match=r"text_encoder\b.*1 of 2"):
        refiner = load_textual_inversion(
            tmp_path / "sdxl.safetensors",
            encoders={"text_encoder": None, "text_encoder_2": encoders["text_encoder_2"]},
            token="<s0>",
        )
    assert refiner["text_encoder"] is None and refiner["text_encoder_2"] is not None


def test_errors(sd1: Any, tmp_path: Path) -> None:
    _, tokenizer, encoder = sd1
    pair = {"text_encoder": (tokenizer, encoder)}
    with pytest.raises(AdapterMismatchError, match=r"48 wide.*32 wide") as info:
        add_tokens(
            tokenizer=tokenizer, text_encoder=encoder, vectors=torch.randn(1, 48), token="<x>"
        )
    assert info.value.matched == 0
    with pytest.raises(InvalidArgumentError, match="already in the tokenizer"):
        add_tokens(
            tokenizer=tokenizer, text_encoder=encoder, vectors=torch.randn(1, 32), token="photo</w>"
        )
    taken, _ = add_tokens(
        tokenizer=tokenizer, text_encoder=encoder, vectors=torch.randn(1, 32), token="<y>_1"
    )
    with pytest.raises(InvalidArgumentError, match="<y>_1"):
        add_tokens(tokenizer=taken, text_encoder=encoder, vectors=torch.randn(2, 32), token="<y>")
    with pytest.raises(InvalidArgumentError, match="pass token="):
        apply_textual_inversion(
            pair, textual_inversion_from_state_dict({"emb_params": torch.randn(1, 32)})
        )
    with pytest.raises(AdapterMismatchError, match="not a textual-inversion embedding"):
        textual_inversion_from_state_dict({"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(AdapterMismatchError, match="0 of 1 vector sets"):
        apply_textual_inversion(
            {"text_encoder": None}, TextualInversion({"text_encoder": torch.randn(1, 32)}, "<z>")
        )
    torch.save(a1111_pt(torch.randn(1, 32), "<z>"), str(tmp_path / "z.pt"))
    with pytest.raises(PickleWeightsError):
        read_textual_inversion(tmp_path / "z.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_textual_inversion(tmp_path / "z.pt", allow_pickle=True).token == "<z>"


def test_folder_and_hub_cache(sd1: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = torch.randn(1, 32)
    folder = tmp_path / "concept"
    folder.mkdir()
    save_file({"<concept>": vectors}, str(folder / "learned_embeds.safetensors"))
    assert torch.equal(read_textual_inversion(folder).vectors["text_encoder"], vectors)
    cache = tmp_path / "hub"
    snapshot = cache / "models--sd-concepts-library--concept" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    save_file({"<concept>": vectors}, str(snapshot / "learned_embeds.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = read_textual_inversion(
        "sd-concepts-library/concept", cache_dir=cache, local_files_only=True
    )
    assert hub.token == "<concept>" and torch.equal(hub.vectors["text_encoder"], vectors)
