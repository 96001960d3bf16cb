"""What every hardening test asserts about an attack: a typed error, a message that names
what was wrong, no allocation beyond a small bound and no hang (issue 14)."""

from __future__ import annotations

import resource
import shutil
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import latentkit
from latentkit.errors import LatentkitError

MEGABYTE = 2**20


def attack(
    call: Callable[[], Any],
    *,
    error: type[LatentkitError] | tuple[type[LatentkitError], ...] = LatentkitError,
    names: Iterable[str] = (),
    seconds: float = 30.0,
    python_mb: float = 64.0,
    rss_mb: float = 256.0,
    may_succeed: bool = False,
    trace: bool = True,
) -> LatentkitError | None:
    """Run ``call`` and check that it raises ``error`` (a `LatentkitError` subclass, never a
    raw Python/torch exception) whose message contains each of ``names``, within
    ``seconds``, allocating at most ``python_mb`` through Python's allocator (tracemalloc)
    and growing the process's peak resident memory by at most ``rss_mb``. With
    ``may_succeed`` the call may also return normally (a mutation that left a file valid).
    Returns the error, or None if the call returned. ``trace=False`` skips tracemalloc
    (which slows Python down severalfold) for fuzzers that run many loads; RSS still counts."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    raised: BaseException | None = None
    try:
        call()
    except BaseException as e:
        raised = e
    finally:
        elapsed = time.perf_counter() - start
        _, python_peak = tracemalloc.get_traced_memory() if trace else (0, 0)
        if trace:
            tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before
    assert elapsed < seconds, f"took {elapsed:.1f} s (bound {seconds} s)"
    assert python_peak < python_mb * MEGABYTE, f"Python allocated {python_peak / MEGABYTE:.0f} MB"
    assert rss_growth < rss_mb, f"peak RSS grew by {rss_growth:.0f} MB"
    if raised is None:
        assert may_succeed, "no error was raised"
        return None
    if not isinstance(raised, error):
        raise AssertionError(
            f"expected {error}, got {type(raised).__module__}.{type(raised).__name__}: {raised}"
        ) from raised
    assert isinstance(raised, LatentkitError)
    message = str(raised)
    for name in names:
        assert name in message, f"{name!r} not in the message: {message}"
    return raised


def copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, symlinks=True)
    return destination


def load(folder: Path | str, **kwargs: Any) -> Any:
    """Load a pipeline on the CPU, quietly, and run one tiny step of it: an error that a
    broken file causes must come at load time, so the step must then work."""
    pipe = latentkit.load_pipeline(folder, device="cpu", progress=False, **kwargs)
    pipe.generate("a cat", steps=1, seed=0, height=16, width=16, output_type="np", progress=False)
    return pipe


def load_then_generate(folder: Path, names: list[str], **kwargs: Any) -> None:
    """The fuzzers' check: loading gives a typed error naming one of ``names`` or a pipeline;
    a loaded pipeline then generates, or gives a typed error (a setting the model's files
    allow but the call's arguments do not, e.g. PNDM's warm-up with one step, or weights
    whose values overflow: `NonFiniteError`)."""
    pipe: list[Any] = []
    error = attack(
        lambda: pipe.append(
            latentkit.load_pipeline(folder, device="cpu", progress=False, **kwargs)
        ),
        may_succeed=True,
        seconds=20,
        trace=False,
    )
    if error is not None:
        message = str(error)
        assert any(name in message for name in names), message
        return
    attack(
        lambda: pipe[0].generate(
            "a cat", steps=4, seed=0, height=16, width=16, output_type="np", progress=False
        ),
        may_succeed=True,
        seconds=20,
        trace=False,
    )


class Timeout:
    """Run ``call`` in a daemon thread; fail if it is still running after ``seconds`` (a
    hang that ``attack``'s clock would never see end)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, call: Callable[[], Any]) -> Any:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = call()
            except BaseException as e:
                box["error"] = e

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(self.seconds)
        assert not thread.is_alive(), f"still running after {self.seconds} s (a hang)"
        if "error" in box:
            raise box["error"]
        return box.get("value")
