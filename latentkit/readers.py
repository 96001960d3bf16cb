"""Checked readers of model files: JSON objects, text files and safetensors headers.

Every file of a model latentkit reads goes through these (or, for the tensors themselves,
through a safetensors header checked here first), so a file that is empty, truncated,
malformed, oversized, not a regular file (a FIFO would block a read forever) or not the
format its name says raises `CorruptFileError` naming it, at load time, before anything of
it is used; a missing one raises `MissingComponentError`. The size limits below keep a
hostile file from making latentkit allocate more than it is worth; raise them by assigning
to them (``latentkit.readers.MAX_JSON_BYTES = ...``) before loading.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentkit.errors import CorruptFileError, MissingComponentError

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read (configs are a few kB; CLIP's ``tokenizer.json`` is 3.6 MB)."""
MAX_TEXT_BYTES = 64 * 2**20
"""Largest text file read (CLIP's ``merges.txt`` is 0.5 MB)."""
MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header read: the safetensors library's own limit."""

SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""The safetensors dtypes latentkit knows, with their size in bytes."""
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"})
"""The dtypes network weights may have (a weight of another is refused)."""


def read_bytes(path: str | os.PathLike[str], *, limit: int, label: str | None = None) -> bytes:
    """The bytes of the regular file ``path``, refusing one larger than ``limit``.

    Opened without blocking, so a FIFO or a device is refused instead of waited on.
    """
    name = label or os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as e:
        raise MissingComponentError(f"missing {name}") from e
    except (OSError, ValueError) as e:  # a folder, no permission, a NUL in the name, ...
        raise CorruptFileError(f"{name} cannot be read: {_reason(e)}", path=path) from e
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptFileError(f"{name} is not a regular file", path=path)
        if info.st_size > limit:
            raise CorruptFileError(
                f"{name} is {info.st_size:,} bytes, more than the {limit:,} latentkit reads "
                "from such a file (see docs/errors.md to raise the limit)",
                path=path,
            )
        try:
            # Ask for what fstat says (+1 to see growth): read(n) allocates n bytes at once.
            data = file.read(info.st_size + 1)
        except OSError as e:
            raise CorruptFileError(f"{name} cannot be read: {_reason(e)}", path=path) from e
    if len(data) != info.st_size:
        raise CorruptFileError(f"{name} changed while it was read", path=path)
    return data


def read_text(
    path: str | os.PathLike[str], *, label: str | None = None, limit: int | None = None
) -> str:
    """The UTF-8 text of ``path`` (at most `MAX_TEXT_BYTES`)."""
    name = label or os.fspath(path)
    data = read_bytes(path, limit=MAX_TEXT_BYTES if limit is None else limit, label=name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(
            f"{name} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})",
            path=path,
        ) from e


def parse_json(data: bytes | str, *, label: str, path: str | os.PathLike[str] | None = None) -> Any:
    """``json.loads`` with every way it fails as one `CorruptFileError` naming ``label``."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{label} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", path=path
        ) from e
    except RecursionError as e:
        raise CorruptFileError(f"{label} is not valid JSON: nested too deeply", path=path) from e
    except ValueError as e:  # not UTF-8/16/32, an integer too long to convert, ...
        raise CorruptFileError(f"{label} is not valid JSON: {e}", path=path) from e


def read_json_object(
    path: str | os.PathLike[str], *, label: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """The JSON object (a dict) in the file ``path`` (at most `MAX_JSON_BYTES`).

    Raises `MissingComponentError` if there is no such file and `CorruptFileError` if it is
    not a regular file, is too large, is not JSON, or holds something else than an object.
    """
    name = label or os.fspath(path)
    data = read_bytes(path, limit=MAX_JSON_BYTES if limit is None else limit, label=name)
    value = parse_json(data, label=name, path=path)
    if not isinstance(value, dict):
        raise CorruptFileError(
            f"{name} must hold a JSON object {{...}}, not a {_json_type(value)}", path=path
        )
    return value


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    """Offset of its first byte in the data that follows the header."""
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def safetensors_header(
    path: str | os.PathLike[str], *, label: str | None = None
) -> dict[str, TensorInfo]:
    """The tensors of the safetensors file ``path`` by name, after checking its header
    describes the file exactly: an 8-byte little-endian header length that fits the file
    (and `MAX_HEADER_BYTES`), a JSON object of entries ``{"dtype", "shape",
    "data_offsets"}`` with known dtypes, whose byte ranges have the size their shape and
    dtype give and tile the data that follows without gap or overlap, up to its end.

    Only the header is read (the tensors are not), a small part of a load.
    The safetensors library checks the same before it maps a file; doing it here names the
    file and the fault, and a truncated download is caught before any weight is loaded.
    """
    name = label or os.fspath(path)

    def corrupt(reason: str) -> CorruptFileError:
        return CorruptFileError(f"{name} is not a valid safetensors file: {reason}", path=path)

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as e:
        raise MissingComponentError(f"missing {name}") from e
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{name} cannot be read: {_reason(e)}", path=path) from e
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptFileError(f"{name} is not a regular file", path=path)
        size = info.st_size
        if size < 8:
            raise corrupt(
                f"it is {size} bytes long, too short for the 8-byte header length it starts with"
            )
        start = file.read(8)
        (length,) = struct.unpack("<Q", start)
        if length > size - 8:
            if start.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive, a pickle protocol
                raise corrupt("it is a pickle (a PyTorch .bin/.ckpt file), not safetensors")
            raise corrupt(
                f"its header length is {length:,} bytes but the file is {size:,} bytes "
                "(truncated, or not a safetensors file)"
            )
        if length > MAX_HEADER_BYTES:
            raise corrupt(f"its header is {length:,} bytes, over the {MAX_HEADER_BYTES:,} limit")
        raw = file.read(length)
    if len(raw) != length:
        raise corrupt("the file shrank while it was read")
    if not raw.lstrip().startswith(b"{"):
        raise corrupt("its header is not a JSON object")
    header = parse_json(raw, label=f"{name} (its safetensors header)", path=path)
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise corrupt("__metadata__ must map names to strings")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        what = f"tensor {key!r}"
        if not isinstance(entry, dict):
            raise corrupt(f"the entry of {what} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise corrupt(
                f"{what} has dtype {dtype!r}; known dtypes: {', '.join(SAFETENSORS_DTYPES)}"
            )
        if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
            raise corrupt(f"{what} has shape {shape!r}; a shape is a list of ints >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise corrupt(f"{what} has data_offsets {offsets!r}; they are [start, end] ints >= 0")
        start, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - start != expected:
            raise corrupt(
                f"{what} ({dtype}, shape {shape}) takes {expected:,} bytes but its "
                f"data_offsets {offsets} span {end - start:,}"
            )
        tensors[key] = TensorInfo(dtype, tuple(shape), start, end)
    position, previous = 0, None
    for key, tensor in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if tensor.start != position:
            if tensor.start < position:
                raise corrupt(f"the data of tensors {previous!r} and {key!r} overlap")
            raise corrupt(f"a gap of {tensor.start - position:,} bytes lies before tensor {key!r}")
        position, previous = tensor.end, key
    if position != data_size:
        if position > data_size:
            raise corrupt(
                f"the header describes {position:,} bytes of tensor data but the file holds "
                f"{data_size:,} (truncated: download or copy it again)"
            )
        raise corrupt(f"{data_size - position:,} bytes after the last tensor belong to none")
    return tensors


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_type(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def describe(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` where it lies inside it, for messages."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return os.fspath(path)
