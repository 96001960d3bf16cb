"""Issue 14, class 5: writing images is safe.

The attacks: output paths that are folders, lie under a file, are too long, hold a NUL or
sit in a folder that cannot be written; a disk that fills up and a process killed in the
middle of a write; a file that exists. Each gives a typed error naming the path before any
model is loaded (the CLI exits with 2), and no write ever leaves a truncated file that
would then block the retry.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hardening import attack
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import latentkit
from latentkit.cli import main
from latentkit.errors import InvalidArgumentError, OutputExistsError, OutputPathError
from latentkit.results import GenerationParameters, output_paths, save_png

PARAMS = GenerationParameters(
    prompt="a cat",
    negative_prompt="",
    steps=1,
    scheduler="ddim",
    guidance_scale=7.5,
    seed=1,
    width=4,
    height=4,
    model="m",
)


def image() -> Image.Image:
    return Image.new("RGB", (4, 4), (200, 10, 10))


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is loaded: the path checks must come first."""

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded before the output path was checked")

    import latentkit.api

    monkeypatch.setattr(latentkit.api, "load_pipeline", boom)
    monkeypatch.setattr(latentkit, "load_pipeline", boom)


def bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Output paths that cannot be written, with the words their error must hold."""
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.txt").write_text("x")
    return {
        "a folder": (tmp_path / "folder.png", "is a folder"),
        "under a file": (tmp_path / "file.txt" / "out.png", "is a file"),
        "deep under a file": (tmp_path / "file.txt" / "a" / "b" / "out.png", "is a file"),
        "a name too long": (tmp_path / ("a" * 300 + ".png"), "bytes"),
        "a path too long": (tmp_path.joinpath(*["d" * 200] * 25, "out.png"), "longer"),
    }


@pytest.mark.parametrize(
    "case", ["a folder", "under a file", "deep under a file", "a name too long", "a path too long"]
)
def test_unwritable_paths_fail_before_loading_with_the_path(
    tmp_path: Path, case: str, no_loading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path, words = bad_paths(tmp_path)[case]
    error = attack(lambda: output_paths(path, 1), error=OutputPathError, names=[words], seconds=1)
    assert error is not None and getattr(error, "path", None) == str(path)
    attack(lambda: save_png(image(), path, PARAMS), error=OutputPathError, names=[words])
    # The CLI: exit 2, one line naming the path, and no model loaded (no_loading).
    assert main(["generate", "a cat", "-o", str(path), "--model", "nowhere", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentkit: error:") and str(path)[:60] in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_fails_before_loading(tmp_path: Path, no_loading: None) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        attack(
            lambda: output_paths(folder / "out.png", 1),
            error=OutputPathError,
            names=["not writable", str(folder)],
        )
        assert main(["generate", "a cat", "-o", str(folder / "x.png"), "-q"]) == 2
    finally:
        folder.chmod(0o755)


def test_a_folder_the_system_says_is_read_only_fails_before_loading(
    tmp_path: Path, no_loading: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the check sees a read-only folder when run as root (root may write anywhere, so
    the chmod test above is skipped there): ``os.access`` says no."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if Path(p) == folder else real_access(p, mode)
    )
    attack(
        lambda: output_paths(folder / "sub" / "out.png", 1),
        error=OutputPathError,
        names=["not writable", str(folder)],
    )
    assert main(["generate", "a cat", "-o", str(folder / "x.png"), "-q"]) == 2


def test_a_folder_that_refuses_files_gives_a_typed_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes the write itself fail (read-only media, no permission as root would
    have it, a quota): `OutputPathError` with the path and the system's reason."""
    real_open = os.open

    def refuse(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if str(path).endswith(".latentkit.tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    attack(
        lambda: save_png(image(), tmp_path / "x.png", PARAMS),
        error=OutputPathError,
        names=["x.png", "Permission denied"],
    )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_leaves_no_file_and_the_retry_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.png"
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    attack(
        lambda: save_png(image(), target, PARAMS),
        error=OutputPathError,
        names=[str(target), "No space left on device"],
    )
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file
    monkeypatch.setattr(os, "fsync", real_fsync)
    save_png(image(), target, PARAMS)  # the retry is not blocked by "already exists"
    with Image.open(target) as written:
        assert written.getpixel((0, 0)) == (200, 10, 10)


def test_a_kill_during_the_write_leaves_no_truncated_file(tmp_path: Path) -> None:
    """A process killed (SIGKILL) after writing the data and before the rename."""
    target = tmp_path / "x.png"
    script = f"""
import os, signal
from PIL import Image
from latentkit.results import save_png
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
save_png(Image.new("RGB", (4, 4)), {str(target)!r}, None)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert done.returncode == -9
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".") and p.name.endswith(".latentkit.tmp") for p in leftovers)
    save_png(image(), target, PARAMS)  # nothing blocks the retry
    assert target.stat().st_size > 0


def test_an_existing_file_is_refused_before_loading_and_kept(
    tmp_path: Path, no_loading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "x.png"
    target.write_bytes(b"mine")
    attack(lambda: output_paths(target, 1), error=OutputExistsError, names=[str(target)])
    assert main(["generate", "a cat", "-o", str(target), "--model", "nowhere", "-q"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert target.read_bytes() == b"mine"
    # A dangling symlink is something too: replacing it would write through nothing, but
    # it is not the caller's to replace silently.
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "missing")
    attack(lambda: save_png(image(), link, PARAMS), error=OutputExistsError)
    assert isinstance(OutputExistsError("x", path="x"), FileExistsError)


def test_overwrite_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    save_png(image(), target, PARAMS, overwrite=True)
    with Image.open(target) as written:
        assert written.text["parameters"] == PARAMS.a1111()  # type: ignore[attr-defined]
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_a_file_that_appears_after_the_check_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.png"
    import latentkit.results as results

    real = results.check_output_path

    def then_someone_writes(path: Any, *, overwrite: bool = False) -> None:
        real(path, overwrite=overwrite)
        target.write_bytes(b"theirs")

    monkeypatch.setattr(results, "check_output_path", then_someone_writes)
    attack(lambda: save_png(image(), target, PARAMS), error=OutputExistsError)
    assert target.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


NAME_PARTS = st.sampled_from(
    ["a", "b.png", "..", ".", "", "\x00", "/", "//", "\\", "a" * 120, "é", "\udcff", " ", "\n"]
)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(NAME_PARTS, max_size=6),
    under_file=st.booleans(),
    count=st.integers(-1, 4),
    overwrite=st.booleans(),
)
def test_any_output_path_is_checked_or_refused_with_a_typed_error(
    tmp_path_factory: pytest.TempPathFactory,
    parts: list[str],
    under_file: bool,
    count: int,
    overwrite: bool,
) -> None:
    root = tmp_path_factory.mktemp("out")
    (root / "file").write_text("x")
    path = str(root) + "/" + "/".join(["file", *parts] if under_file else parts)
    try:
        paths = output_paths(path, count, overwrite=overwrite)
    except InvalidArgumentError:
        return
    assert len(paths) == count
    assert list(root.iterdir()) == [root / "file"]  # checking writes nothing


def test_the_cli_writes_with_the_model(sd1_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "x.png"
    args = ["generate", "a cat", "-o", str(out), "--model", str(sd1_path), "--steps", "1"]
    assert main([*args, "-W", "16", "-H", "16", "--device", "cpu", "-q"]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]
    assert latentkit.GenerationParameters.from_a1111(Image.open(out).text["parameters"]).steps == 1  # type: ignore[attr-defined]
