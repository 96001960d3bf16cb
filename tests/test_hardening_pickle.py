"""Issue 14, class 8: pickle weights, read only with ``allow_pickle=True``.

The attacks: ``.bin`` files whose pickle calls ``os.system``, ``eval``, ``subprocess`` or
``shutil.rmtree`` when unpickled; a pickle in torch's legacy (pre-1.6, not zip) format; a
truncated or random file; a pickle of something other than a mapping of tensors. Each
gives a typed error naming the file at load time (`PickleWeightsError` saying what it tried
to import, or `CorruptFileError`), and no payload ever runs (``weights_only`` loading).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hardening import attack, copy_model, load, load_then_generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from latentkit.errors import (
    CorruptFileError,
    LatentkitError,
    PickleWeightsError,
    WeightMismatchError,
)

UNET_BIN = "unet/diffusion_pytorch_model.bin"


@pytest.fixture
def model(sd1_path: Path, tmp_path: Path) -> Path:
    """The tiny model with its UNet weights as a PyTorch pickle (``.bin``) only."""
    folder = copy_model(sd1_path, tmp_path / "model")
    safetensors = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(safetensors), folder / UNET_BIN)
    safetensors.unlink()
    return folder


class Payload:
    """An object whose unpickling calls ``function(*args)``."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, self.args


def payloads(marker: Path) -> dict[str, tuple[Payload, str]]:
    """Each payload would leave a trace at ``marker`` if it ran."""
    return {
        "os.system": (Payload(os.system, f"touch {marker}"), "system"),
        "eval": (Payload(eval, f"open({str(marker)!r}, 'w')"), "eval"),
        "exec": (Payload(exec, f"open({str(marker)!r}, 'w')"), "exec"),
        "subprocess": (Payload(subprocess.call, ["touch", str(marker)]), "subprocess"),
        "rmtree": (Payload(shutil.rmtree, str(marker.parent / "victim")), "rmtree"),
        "open": (Payload(open, str(marker), "w"), "open"),
    }


@pytest.mark.parametrize("name", ["os.system", "eval", "exec", "subprocess", "rmtree", "open"])
def test_a_pickle_that_imports_code_is_refused_by_name(
    model: Path, tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "victim").mkdir()
    payload, imported = payloads(marker)[name]
    state = {**torch.load(model / UNET_BIN, weights_only=True), "x": payload}
    torch.save(state, model / UNET_BIN)
    error = attack(
        lambda: load(model, allow_pickle=True),
        error=PickleWeightsError,
        names=[UNET_BIN, "tried to import", imported, "safetensors"],
    )
    assert error is not None and "allow_pickle" not in str(error)  # not the opt-in message
    assert not marker.exists() and (tmp_path / "victim").is_dir()  # nothing ran


def test_without_opt_in_no_pickle_is_opened(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("torch.load ran without allow_pickle=True")

    monkeypatch.setattr(torch, "load", boom)
    attack(lambda: load(model), error=PickleWeightsError, names=["allow_pickle=True"])


def test_plain_pickle_weights_still_load(model: Path, sd1_path: Path) -> None:
    import numpy as np

    kw: dict[str, Any] = dict(steps=2, seed=0, output_type="np", progress=False)
    a = load(model, allow_pickle=True).generate("a cat", **kw).images[0]
    b = load(sd1_path).generate("a cat", **kw).images[0]
    assert np.array_equal(a, b)


def _legacy(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _saved(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


BROKEN: dict[str, tuple[Callable[[bytes], bytes], type[LatentkitError], str]] = {
    "empty": (lambda raw: b"", CorruptFileError, "zip checkpoint"),
    "truncated": (lambda raw: raw[: len(raw) // 2], CorruptFileError, "checkpoint"),
    "legacy format": (lambda raw: _legacy({"w": torch.zeros(2)}), CorruptFileError, "1.6"),
    "plain pickle": (lambda raw: pickle.dumps({"w": 1}), CorruptFileError, "zip checkpoint"),
    "a list": (lambda raw: _saved([torch.zeros(2)]), CorruptFileError, "not a mapping"),
    "a number per key": (
        lambda raw: _saved({"conv_in.weight": 5}),
        WeightMismatchError,
        "not a tensor",
    ),
    "int weights": (
        lambda raw: _saved({"conv_in.weight": torch.zeros(32, 4, 3, 3, dtype=torch.int64)}),
        WeightMismatchError,
        "dtype int64",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_pickle_fails_at_load_naming_the_file(model: Path, case: str) -> None:
    corrupt, error, words = BROKEN[case]
    (model / UNET_BIN).write_bytes(corrupt((model / UNET_BIN).read_bytes()))
    attack(lambda: load(model, allow_pickle=True), error=error, names=[UNET_BIN, words])


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_pickles_fail_at_load_or_load_fine(model: Path, data: st.DataObject) -> None:
    """Random bytes, and the real file with bytes replaced or cut, as a ``.bin``."""
    path = model / UNET_BIN
    original = path.read_bytes()
    how = data.draw(st.sampled_from(["random", "splice", "cut"]))
    if how == "random":
        content = data.draw(st.binary(max_size=2000))
    elif how == "cut":
        content = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        at = data.draw(st.integers(0, len(original) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=64))
        content = original[:at] + junk + original[at + len(junk) :]
    try:
        path.write_bytes(content)
        load_then_generate(model, [UNET_BIN, "unet"], allow_pickle=True)
    finally:
        path.write_bytes(original)
