"""The output folder: PNGs written atomically, the manifest, and what a rerun can skip.

Only the driver (the process running `latentkit.batch.run`) writes here, whatever the engine:
workers send PNG bytes back, so a multi-node cluster needs no shared file system for outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from latentkit.batch.jobs import Job
from latentkit.errors import InvalidArgumentError, LatentkitError

MANIFEST = "manifest.jsonl"
LOCK = ".latentkit-batch.lock"
# Temporary names: ".<file>.<pid>.tmp" in the output folder itself, so os.replace is a rename
# on one file system (atomic: a reader sees the old file or the new one, never a part).
_TEMPORARY = re.compile(r"\..+\.png\.\d+\.tmp")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(folder: Path, name: str, data: bytes) -> None:
    """Write ``folder/name`` so that it is complete or absent, even if the process is killed."""
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, folder / name)


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the output folder for this run: a second run on it fails instead of interleaving
    its writes; stale temporary files of a killed run are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, run one at a time
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise LatentkitError(f"another batch run is writing to {folder}") from e
        for entry in folder.iterdir():
            if _TEMPORARY.fullmatch(entry.name):
                entry.unlink(missing_ok=True)
        yield


def done_ids(folder: Path, jobs: list[Job]) -> set[str]:
    """Ids whose every file the manifest records as done for the same job, and whose files on
    disk still have the recorded sha256 (so a truncated or replaced file is redone)."""
    latest: dict[str, dict[str, Mapping[str, Any]]] = {}  # id -> file -> its last done record
    for record in read_manifest(folder / MANIFEST):
        # Failures are not looked at: a failed attempt leaves the files of an earlier success
        # in place, and those count if the row asks for the same job again.
        job_id, name = record.get("id"), record.get("file")
        if isinstance(job_id, str) and isinstance(name, str) and record.get("status") == "done":
            latest.setdefault(job_id, {})[name] = record
    done = set()
    for job in jobs:
        if job.error is not None or not job.files:
            continue
        records = latest.get(job.id, {})
        fingerprint = job.fingerprint()
        if all(
            name in records
            and records[name].get("job") == fingerprint
            and _file_sha256(folder / name) == records[name].get("sha256")
            for name in job.files
        ):
            done.add(job.id)
    return done


def _file_sha256(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except OSError:
        return None


def read_manifest(path: Path) -> Iterator[dict[str, Any]]:
    """The manifest's records; a line cut short by a killed run is ignored."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as file:
        for text in file:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


class Manifest:
    """Appends one JSON line per image (or per failed row), flushed at once."""

    def __init__(self, folder: Path) -> None:
        path = folder / MANIFEST
        if path.is_dir():
            raise InvalidArgumentError(f"{path} is a folder; the manifest needs that name")
        # A run killed mid-line leaves a partial last line: start ours on a fresh line.
        partial = False
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                partial = existing.read(1) != b"\n"
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if partial:
            self._file.write("\n")

    def append(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
