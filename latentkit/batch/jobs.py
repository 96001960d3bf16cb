"""Reading a jobs file and planning the work: ids, seeds, output names, and units.

A job is one row of the jobs file: ``generate()``'s keywords plus an optional ``id`` and
``model``. Planning turns rows into `Job` records whose keywords are complete (the seed is
always set), checks what can be checked without a model (known keys, JSON values, ids, file
names), and groups jobs into `Unit` s: the pieces of work an engine hands to a worker.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentkit.errors import InvalidArgumentError

# generate() keywords that belong to the run (command line / run()), not to a row.
_RUN_KEYWORDS = frozenset(
    {"model", "device", "dtype", "performance", "callback", "progress", "output_type"}
)
# Tensors cannot be written to a JSON manifest, so a rerun could not reproduce them.
_TENSOR_KEYWORDS = frozenset({"prompt_embeds", "negative_prompt_embeds"})
IMAGE_KEYWORDS = ("image", "mask_image", "depth_map")
"""Keywords whose value is a picture; in a jobs file, a path (relative to the file's folder)."""

# CSV cells are text: these columns are converted, the others stay strings.
_CSV_INTS = frozenset({"seed", "steps", "height", "width", "num_images", "clip_skip"})
_CSV_FLOATS = frozenset({"guidance_scale", "guidance_rescale", "strength"})

# Ids name files: letters, digits and a few safe marks; no separators, no leading dot.
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,199}", re.ASCII)

SEED_RANGE = 2**32
"""Derived seeds are in ``[0, 2**32)``, the range A1111 and diffusers users expect."""

MAX_SHARED_PROMPT_BYTES = 75
"""Rows batched into one call must have prompts of at most this many UTF-8 bytes.

Every prompt of one call is encoded in as many 77-token chunks as the longest needs, so a long
prompt would change the conditioning of the short ones beside it. A CLIP BPE token covers at
least one byte of the text, so a prompt of at most 75 bytes always fits one chunk's 75 inner
tokens."""


def accepted_keys() -> frozenset[str]:
    """The keys a row may have: ``latentkit.generate``'s keywords less the run-level ones
    (model, device, dtype, performance, callback, progress, output_type) and the tensors, plus
    ``id`` and ``model``."""
    import latentkit

    params = inspect.signature(latentkit.generate).parameters.values()
    names = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        # generate(**keywords) forwards to a typed request: its fields are the keywords.
        try:
            from latentkit.request import Request

            names |= {f.name for f in dataclasses.fields(Request)}
        except ImportError:  # pragma: no cover - only if the request module is renamed
            pass
    return frozenset((names - _RUN_KEYWORDS - _TENSOR_KEYWORDS) | {"id", "model"})


@dataclass(frozen=True)
class Row:
    """One row as read: its keywords, or why it could not be read."""

    line: int
    """1-based line of a JSON Lines file, or data row of a CSV file / position in a list."""
    values: Mapping[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class Job:
    """A planned row: the exact keywords ``pipe.generate`` receives, and where its images go."""

    id: str
    line: int
    model: str
    keywords: Mapping[str, Any]
    """``generate()`` keywords with the seed filled in and image paths made absolute."""
    files: tuple[str, ...]
    """Output names in the output folder: ``<id>.png``, or ``<id>-<k>.png`` for several."""
    error: str | None = None
    """Why the row cannot run (then it is recorded as failed without generating)."""

    def fingerprint(self) -> dict[str, Any]:
        """What the manifest records as the job: ``latentkit.generate(**job)`` redoes it."""
        record: dict[str, Any] = json.loads(json.dumps({"model": self.model, **self.keywords}))
        return record


@dataclass(frozen=True)
class Unit:
    """Jobs one worker runs in one ``generate`` call (several only when batching rows)."""

    model: str
    jobs: tuple[Job, ...]


def read_rows(source: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> Iterator[Row]:
    """Rows of a JSON Lines file, a CSV file with a ``prompt`` column, or an iterable of
    mappings. A line that is not a JSON object becomes a row with an error."""
    if not isinstance(source, (str, os.PathLike)):
        for i, values in enumerate(source, start=1):
            if isinstance(values, Mapping):
                yield Row(i, values)
            else:
                yield Row(i, None, f"job {i} is a {type(values).__name__}, not a mapping")
        return
    path = Path(source)
    if not path.is_file():
        raise InvalidArgumentError(f"no jobs file at {path}")
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path)
        return
    with open(path, encoding="utf-8") as file:
        for i, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                yield Row(i, None, f"line {i}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if isinstance(values, dict):
                yield Row(i, values)
            else:
                yield Row(i, None, f"line {i}: a JSON {type(values).__name__}, not an object")


def _csv_rows(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise InvalidArgumentError(f"{path}: a CSV jobs file needs a 'prompt' column")
        for i, record in enumerate(reader, start=1):
            values: dict[str, Any] = {}
            error = None
            for key, cell in record.items():
                if key is None or cell is None or cell == "":
                    continue  # extra cells without a header, or an empty cell: not given
                try:
                    values[key] = (
                        int(cell)
                        if key in _CSV_INTS
                        else float(cell)
                        if key in _CSV_FLOATS
                        else cell
                    )
                except ValueError:
                    kind = "an int" if key in _CSV_INTS else "a number"
                    error = f"row {i}: column {key!r} must be {kind}, got {cell!r}"
            yield Row(i, None if error else values, error)


def derived_seed(run_seed: int, job_id: str) -> int:
    """The seed of a row that has none: a hash of the run's seed and the row's id, so it does
    not depend on the row's position, the engine or the order rows finish in."""
    digest = hashlib.sha256(f"latentkit-batch:{run_seed}:{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def plan(rows: Iterable[Row], *, model: str, run_seed: int, base: Path | None = None) -> list[Job]:
    """Check every row and complete its keywords; rows that cannot run carry an error.

    Ids must be unique (after case folding, since they name files) and so must the files they
    produce: ``a`` with two images writes ``a-1.png``, which row ``a-1`` would also write.
    """
    keys = accepted_keys()
    jobs: list[Job] = []
    owners: dict[str, str] = {}  # case-folded file name -> id that writes it
    for row in rows:
        job = _plan_row(row, keys, model=model, run_seed=run_seed, base=base)
        if job.error is None:
            taken = [owners[f.casefold()] for f in job.files if f.casefold() in owners]
            if taken:
                what = "id" if job.id.casefold() in {t.casefold() for t in taken} else "file of id"
                job = dataclasses.replace(job, error=f"duplicate {what} {taken[0]!r}")
            else:
                owners.update((f.casefold(), job.id) for f in job.files)
        jobs.append(job)
    return jobs


def _plan_row(
    row: Row, keys: frozenset[str], *, model: str, run_seed: int, base: Path | None
) -> Job:
    values = row.values
    raw_id = values.get("id") if values is not None else None
    job_id = str(row.line) if raw_id is None else str(raw_id)

    def failed(message: str) -> Job:
        return Job(job_id, row.line, model, {}, (), message)

    if values is None:
        return failed(row.error or f"row {row.line} could not be read")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, type(None))):
        return failed(f"id must be a string or an int, got {raw_id!r}")
    if not _ID.fullmatch(job_id):
        return failed(
            f"id {job_id!r} cannot name a file: use letters, digits and _ . + = @ - "
            "(not first: . + = @ -), at most 200"
        )
    unknown = sorted(set(values) - keys)
    if unknown:
        hint = (
            " (tensors cannot be recorded in the manifest; give the prompt text)"
            if set(unknown) & _TENSOR_KEYWORDS
            else ""
        )
        return failed(
            f"unknown key(s) {', '.join(map(repr, unknown))}{hint}; accepted: "
            f"{', '.join(sorted(keys))}"
        )
    job_model = values.get("model", model)
    if not isinstance(job_model, str) or not job_model:
        return failed(f"model must be a Hub id or a folder path, got {job_model!r}")
    if "model" in values and base is not None:
        job_model = locate_model(job_model, base)
    keywords = {k: v for k, v in values.items() if k not in ("id", "model")}
    for key, value in keywords.items():
        if not _is_json(value):
            return failed(
                f"{key} must be a JSON value (text, number, list); got {type(value).__name__}"
            )
    for key in IMAGE_KEYWORDS:
        value = keywords.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            return failed(f"{key} must be a path to an image file in a batch job")
        path = Path(value).expanduser()
        keywords[key] = str(path if path.is_absolute() or base is None else base / path)
    if keywords.get("seed") is None:
        keywords["seed"] = derived_seed(run_seed, job_id)
    count = _image_count(keywords)
    files = (f"{job_id}.png",) if count == 1 else tuple(f"{job_id}-{k}.png" for k in range(count))
    return Job(job_id, row.line, job_model, keywords, files)


def locate_model(model: str, base: Path) -> str:
    """A model folder relative to ``base``, made absolute (workers may run in other folders);
    a built-in name, a Hub id or an absolute path stays as it is."""
    from latentkit.loading import builtin_model

    path = Path(model).expanduser()
    if builtin_model(model) is not None or path.is_absolute() or not (base / path).is_dir():
        return model
    return str((base / path).resolve())


def _image_count(keywords: Mapping[str, Any]) -> int:
    """Images ``generate`` makes for these keywords; a malformed value counts as 1 and
    ``generate`` then raises its own typed error for it."""
    prompt = keywords.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt else 1
    n = keywords.get("num_images", 1)
    per_prompt = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    return prompts * per_prompt


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def units(jobs: Iterable[Job], *, batch_size: int) -> list[Unit]:
    """Group runnable jobs into units, ordered by model (one pipeline load per model per worker)
    and then by line.

    With ``batch_size`` > 1, jobs that can share one ``generate`` call (same model and every
    keyword but ``prompt`` and ``seed``; one image each; a text prompt of at most
    `MAX_SHARED_PROMPT_BYTES`; no image inputs) go together, up to ``batch_size`` per unit, in
    line order. Groups are formed from *all* jobs, done or not, so a resumed run regroups
    nothing and a unit's images never depend on what an earlier run finished.
    """
    runnable = [job for job in jobs if job.error is None]
    groups: list[list[Job]] = []
    for model in dict.fromkeys(job.model for job in runnable):
        open_at: dict[str, int] = {}  # share key -> index of the group still filling
        for job in (j for j in runnable if j.model == model):
            key = _share_key(job) if batch_size > 1 else None
            at = None if key is None else open_at.get(key)
            if at is None:
                at = len(groups)
                groups.append([])
                if key is not None:
                    open_at[key] = at
            groups[at].append(job)
            if key is not None and len(groups[at]) == batch_size:
                del open_at[key]
    return [Unit(group[0].model, tuple(group)) for group in groups]


def _share_key(job: Job) -> str | None:
    """What a job must have in common with others to share their call, or None if it must run
    alone."""
    kw = job.keywords
    prompt, negative, seed = kw.get("prompt"), kw.get("negative_prompt"), kw.get("seed")
    if (
        not isinstance(prompt, str)
        or len(prompt.encode()) > MAX_SHARED_PROMPT_BYTES
        or not (negative is None or isinstance(negative, str))
        or len((negative or "").encode()) > MAX_SHARED_PROMPT_BYTES
        or not isinstance(seed, int)
        or isinstance(seed, bool)
        or kw.get("num_images", 1) != 1
        or any(kw.get(k) is not None for k in IMAGE_KEYWORDS)
    ):
        return None
    shared = {k: v for k, v in kw.items() if k not in ("prompt", "seed")}
    return json.dumps(shared, sort_keys=True)
