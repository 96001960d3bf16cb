"""The Ray engine, for real: a one-node Ray cluster on loopback started by the test (2 CPUs),
2 actors on the built-in model. The same bytes as the local engine; an actor killed mid-row is
replaced and the row retried; retries are bounded; the CLI joins the cluster by address and
resumes.

The local reference runs with one torch thread, like each CPU actor: on a CPU, a different
thread count can move a pixel by one level (see docs/batch.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Read by Ray when it is imported: the test cluster listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from latentkit import batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[dict[str, Any]] = [
    {"id": "a", "prompt": "a red circle left of a blue square", "steps": 3, "seed": 7},
    {"id": "b", "prompt": "a green triangle", "steps": 3, "num_images": 2},
    *({"prompt": f"a blue square number {i}", "steps": 3} for i in range(8)),
]
FILES = 11  # images: b has two


def write_jobs(folder: Path) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def done_records(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["status"] == "done"]


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster; its workers inherit a token that tells them from anyone else's."""
    token = uuid.uuid4().hex
    os.environ["LATENTKIT_TEST_RAY_TOKEN"] = token
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield token
    finally:
        ray.shutdown()
        del os.environ["LATENTKIT_TEST_RAY_TOKEN"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    import torch

    folder = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = batch.run(write_jobs(folder), output_dir=folder / "out", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.done == len(ROWS)
    return pngs(folder / "out")


class Killer(threading.Thread):
    """SIGKILLs one of this cluster's actors while it runs a row (once)."""

    def __init__(self, token: str) -> None:
        super().__init__(daemon=True)
        self.token = token.encode()
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                    ours = self.token in Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::BatchWorker.run") and ours:
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed = int(pid)
                    return
            time.sleep(0.01)


def test_ray_gives_the_local_images(
    cluster: str, reference: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = batch.run(
        write_jobs(tmp_path), output_dir=out, engine="ray", workers=2, progress=False
    )
    assert (summary.done, summary.failed, summary.images) == (len(ROWS), 0, FILES)
    assert pngs(out) == reference  # byte for byte: same pixels, same parameters


def test_killed_worker_is_replaced_and_its_row_retried(
    cluster: str, reference: dict[str, bytes], tmp_path: Path
) -> None:
    killer = Killer(cluster)
    killer.start()
    out = tmp_path / "out"
    try:
        summary = batch.run(
            write_jobs(tmp_path), output_dir=out, engine="ray", workers=2, progress=False
        )
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no actor was running a row to kill"
    assert (summary.done, summary.failed) == (len(ROWS), 0)
    files = Counter(r["file"] for r in done_records(out))
    assert len(files) == FILES and set(files.values()) == {1}  # every image exactly once
    assert pngs(out) == reference


def test_retries_are_bounded_and_the_cli_resumes_on_the_cluster(
    cluster: str, reference: dict[str, bytes], tmp_path: Path
) -> None:
    killer = Killer(cluster)
    killer.start()
    out = tmp_path / "out"
    jobs = write_jobs(tmp_path)
    try:
        summary = batch.run(
            jobs, output_dir=out, engine="ray", workers=2, max_retries=0, progress=False
        )
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None
    # No retry: the row that was running fails, and only it: the replaced actor gets rows again
    # once Ray reports it ready (rows sent while it restarted would fail without running).
    assert (summary.failed, summary.done) == (1, len(ROWS) - 1)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    errors = [r["error"] for r in lines if r["status"] == "failed"]
    assert errors and all(e.startswith("the worker died 1 times") for e in errors)

    # The command line joins this cluster by its address and does only the failed rows.
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "latentkit", "batch", str(jobs), "-o", str(out)]
    command += ["--engine", "ray", "--ray-address", address, "--workers", "2", "--quiet"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"done {summary.failed}, skipped {summary.done}, failed 0"), (
        proc.stdout
    )
    files = Counter(r["file"] for r in done_records(out))
    assert len(files) == FILES and set(files.values()) == {1}
    assert pngs(out) == reference
