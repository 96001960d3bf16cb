"""Issue 14, class 7: the Hugging Face cache, abused.

The cache here is laid out as huggingface_hub lays it out (``blobs/<sha256>``,
``snapshots/<commit>/<file>`` symlinks into the blobs, ``refs/main``). The attacks: a
``revision`` that walks out of the cache (``../../x``), truncated and empty blobs, a
snapshot missing a component or holding a dangling link, a snapshot link that leaves the
repo's cache folder, a download that arrives truncated. Each gives a typed error naming
the file (or the revision) before anything is built, and a revision is checked before
huggingface_hub sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from hardening import attack, load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import latentkit
from latentkit.errors import (
    CorruptFileError,
    InvalidArgumentError,
    MissingComponentError,
    ModelNotCachedError,
    UnsafeFileError,
)
from latentkit.loading import check_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny/sd1"
UNET = "unet/diffusion_pytorch_model.safetensors"


def make_cache(folder: Path, cache: Path, repo_id: str = REPO) -> Path:
    """``folder`` in huggingface_hub's cache layout at commit `COMMIT`; returns the
    snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(sd1_path: Path, tmp_path: Path) -> Path:
    make_cache(sd1_path, tmp_path / "hub")
    return tmp_path / "hub"


def snapshot_of(cache: Path) -> Path:
    return cache / "models--tiny--sd1" / "snapshots" / COMMIT


def test_the_cache_layout_loads(cache: Path, offline: None) -> None:
    load(REPO, cache_dir=cache)
    load(REPO, cache_dir=cache, revision=COMMIT)
    load(REPO, cache_dir=cache, revision="main")


@pytest.mark.parametrize(
    "revision",
    ["../../x", "main/../../..", "..", "/etc", "refs/../../main", ".hidden", "a//b", "a/", "x\x00"],
)
def test_a_revision_that_leaves_the_cache_is_refused_before_use(
    cache: Path, offline: None, monkeypatch: pytest.MonkeyPatch, revision: str
) -> None:
    import huggingface_hub

    def never(*a: Any, **k: Any) -> Any:
        raise AssertionError("huggingface_hub was called with an unchecked revision")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", never)
    attack(
        lambda: latentkit.load_pipeline(REPO, cache_dir=cache, revision=revision, progress=False),
        error=InvalidArgumentError,
        names=["revision", repr(revision)],
        seconds=1,
    )


@settings(max_examples=300, deadline=None)
@given(
    revision=st.text(st.sampled_from("a0./-_\\~: \x00é"), max_size=12)
    | st.sampled_from(["main", COMMIT, "refs/pr/1", "v1.0", "fp16"])
)
def test_any_revision_is_a_ref_name_or_refused(revision: str) -> None:
    try:
        check_revision(revision)
    except InvalidArgumentError as e:
        assert "revision" in str(e)
        return
    # Accepted: no part can climb, hide or be empty, and it stays inside refs/ and snapshots/.
    parts = revision.split("/")
    assert all(p and not p.startswith(".") for p in parts)
    base = Path("/cache/refs")
    assert (base / revision).resolve().is_relative_to(base)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(revision=st.text(st.sampled_from("a./"), max_size=8))
def test_revisions_never_reach_outside_the_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch, revision: str
) -> None:
    """Whatever revision is asked for, huggingface_hub is only handed checked ones."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen: list[str | None] = []
    real = huggingface_hub.snapshot_download

    def spy(*a: Any, **k: Any) -> Any:
        seen.append(k.get("revision"))
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with contextlib.suppress(InvalidArgumentError, ModelNotCachedError):
        latentkit.load_pipeline(REPO, cache_dir=cache, revision=revision or None, progress=False)
    assert all(r is None or ".." not in r.split("/") for r in seen)


def _truncate(path: Path) -> None:
    blob = path.resolve()
    blob.write_bytes(blob.read_bytes()[:-1000])


def _empty(path: Path) -> None:
    path.resolve().write_bytes(b"")


@pytest.mark.parametrize(
    ("file", "damage", "words"),
    [
        (UNET, _truncate, ["truncated", "delete"]),
        (UNET, _empty, ["too short", "delete"]),
        ("vae/diffusion_pytorch_model.safetensors", _truncate, ["truncated"]),
        ("unet/config.json", _empty, ["not valid JSON", "delete"]),
        ("model_index.json", _truncate, ["model_index.json"]),
    ],
)
def test_a_broken_blob_names_the_file_and_what_to_delete(
    cache: Path, offline: None, file: str, damage: Any, words: list[str]
) -> None:
    link = snapshot_of(cache) / file
    damage(link)
    error = attack(lambda: load(REPO, cache_dir=cache), error=CorruptFileError, names=words)
    assert error is not None and (file in str(error) or str(link.resolve()) in str(error))


@pytest.mark.parametrize(
    ("file", "words"),
    [
        ("vae/config.json", ["vae/config.json", "cached copy"]),
        (UNET, ["no weights for unet", "cached copy"]),
        ("tokenizer/tokenizer.json", ["tokenizer", "vocab.json"]),  # falls back, then misses
    ],
)
def test_a_snapshot_missing_a_file_says_which(
    cache: Path, offline: None, file: str, words: list[str]
) -> None:
    (snapshot_of(cache) / file).unlink()
    attack(lambda: load(REPO, cache_dir=cache), error=MissingComponentError, names=words)


def test_a_dangling_link_is_a_missing_file(cache: Path, offline: None) -> None:
    link = snapshot_of(cache) / "vae" / "config.json"
    link.resolve().unlink()  # the blob is gone, the link stays
    attack(
        lambda: load(REPO, cache_dir=cache),
        error=MissingComponentError,
        names=["vae/config.json", "cached copy"],
    )


def test_a_link_out_of_the_repo_cache_folder_is_refused(
    cache: Path, offline: None, tmp_path: Path
) -> None:
    link = snapshot_of(cache) / "unet" / "config.json"
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(outside)
    attack(
        lambda: load(REPO, cache_dir=cache),
        error=UnsafeFileError,
        names=["unet/config.json", "outside the model folder"],
    )


def test_a_snapshot_given_as_a_folder_may_link_to_its_blobs(cache: Path) -> None:
    """A snapshot path passed as a local folder is a folder of links into ../../blobs."""
    load(snapshot_of(cache))


def test_a_download_that_arrives_truncated_is_caught(
    sd1_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The online path: the listed files arrive, one of them cut short."""
    import huggingface_hub
    from huggingface_hub.hf_api import ModelInfo

    snapshot = make_cache(sd1_path, tmp_path / "hub")
    _truncate(snapshot / UNET)
    listing = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]

    def model_info(self: Any, repo_id: str, **kw: Any) -> Any:
        return ModelInfo(id=repo_id, sha=COMMIT, siblings=[{"rfilename": f} for f in listing])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    attack(
        lambda: latentkit.load_pipeline(REPO, cache_dir=tmp_path / "hub", progress=False),
        error=CorruptFileError,
        names=[UNET, "truncated", "delete"],
    )
