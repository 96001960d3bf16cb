"""What a worker does, in any engine: keep one pipeline, run units, return PNG bytes."""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from latentkit.batch.jobs import Unit

if TYPE_CHECKING:
    from PIL import Image

    from latentkit.results import GenerationParameters


@dataclass(frozen=True)
class Picture:
    """One generated image as the driver writes it."""

    file: str
    png: bytes
    parameters: dict[str, Any]
    """`latentkit.GenerationParameters` as a dict: the seed actually used, the scheduler name…"""


@dataclass(frozen=True)
class Outcome:
    """The result of one job: its pictures, or the error that stopped it."""

    id: str
    pictures: tuple[Picture, ...]
    error: str | None
    seconds: float
    """Seconds of the ``generate`` call that made it (shared by the jobs of one call)."""


def png_bytes(image: Image.Image, parameters: GenerationParameters) -> bytes:
    """The PNG `latentkit.GenerationResult.save` writes: the image with the A1111
    ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters.a1111())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class Worker:
    """Runs units with one pipeline at a time, loaded on first use and kept while the next
    units use the same model (units arrive grouped by model)."""

    def __init__(self, *, device: str = "auto", dtype: str = "auto") -> None:
        self.device = device
        self.dtype = dtype
        self._model: str | None = None
        self._pipeline: Any = None
        self._load_error: str | None = None

    def _load(self, model: str) -> Any:
        if model != self._model:
            import latentkit

            # Drop the previous pipeline first: two Stable Diffusion models may not fit.
            self._model, self._pipeline, self._load_error = model, None, None
            try:
                self._pipeline = latentkit.load_pipeline(
                    model, device=self.device, dtype=self.dtype, progress=False
                )
            except Exception as e:
                self._load_error = _message(e)
        if self._load_error is not None:
            raise _LoadError(self._load_error)
        return self._pipeline

    def run(self, unit: Unit) -> list[Outcome]:
        """Generate every job of ``unit``; an error fails the unit's jobs, never the worker."""
        start = time.perf_counter()
        try:
            pipe = self._load(unit.model)
            if len(unit.jobs) == 1:
                result = pipe.generate(**unit.jobs[0].keywords, progress=False)
                images, parameters = [result.images], [result.parameters]
            else:
                # Rows that differ only in prompt and seed: one call, one seed per image
                # (each image's noise comes from its own generator, as in a call of its own).
                shared = {
                    k: v for k, v in unit.jobs[0].keywords.items() if k not in ("prompt", "seed")
                }
                result = pipe.generate(
                    [job.keywords["prompt"] for job in unit.jobs],
                    seed=[job.keywords["seed"] for job in unit.jobs],
                    **shared,
                    progress=False,
                )
                images = [[image] for image in result.images]
                parameters = [[p] for p in result.parameters]
        except Exception as e:
            # A typed latentkit error is the row's fault; anything else (out of memory, a bug)
            # is recorded with its type so one row cannot stop thousands of others.
            seconds = time.perf_counter() - start
            return [Outcome(job.id, (), _message(e), seconds) for job in unit.jobs]
        seconds = time.perf_counter() - start
        outcomes = []
        for job, made, params in zip(unit.jobs, images, parameters, strict=True):
            if len(made) != len(job.files):
                error = f"generate made {len(made)} images, the plan expected {len(job.files)}"
                outcomes.append(Outcome(job.id, (), error, seconds))
                continue
            pictures = tuple(
                Picture(file, png_bytes(image, p), dataclasses.asdict(p))
                for file, image, p in zip(job.files, made, params, strict=True)
            )
            outcomes.append(Outcome(job.id, pictures, None, seconds))
        return outcomes


class _LoadError(Exception):
    """The unit's model could not be loaded (the message is the loader's)."""


def _message(error: BaseException) -> str:
    if isinstance(error, _LoadError):
        return str(error)
    from latentkit.errors import LatentkitError

    name = type(error).__name__
    if isinstance(error, LatentkitError):
        return f"{name}: {error}"
    return f"{name} (unexpected): {error}"
