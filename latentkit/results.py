"""What `latentkit.generate` returns, and how images are written with their parameters.

A PNG is written whole or not at all: encoded in memory, written to a temporary file in
the target's folder, flushed to disk and renamed onto the target (hard-linked when an
existing file must not be replaced), so a full disk, an error or a kill never leaves a
truncated file behind that would then block the retry. Output paths are checked before
any work (`output_paths`): a folder, a path under a file, a name too long for the file
system or a folder that cannot be written raise `OutputPathError` naming the path.

The ``parameters`` text follows A1111's convention, with every user-given text written so
that it cannot forge another field (see `GenerationParameters.a1111`), and
`GenerationParameters.from_a1111` reads it back exactly. Every `latentkit.Request` keyword
that changes the pixels is either in the text (`RECORDED_OPTIONS`, the core fields, the
``Emphasis`` and ``ControlNet N`` fields) or named in `NOT_RECORDED` with the reason, so
`GenerationParameters.to_options` regenerates a latentkit PNG's pixels with the same model
(and the same input pictures, which no text carries).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from latentkit.errors import InvalidArgumentError, OutputExistsError, OutputPathError

if TYPE_CHECKING:
    from PIL import Image

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class GenerationParameters:
    """The settings that produced an image, written into PNGs in the A1111 convention."""

    prompt: str
    negative_prompt: str
    steps: int
    scheduler: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str
    strength: float | None = None
    """Denoising strength of image-to-image and inpainting (None for text-to-image)."""
    clip_skip: int | None = None
    """Layers skipped before the usual one, latentkit's and diffusers' count (1 = the
    penultimate layer); written in A1111's count, one more (``Clip skip: 2``)."""
    guidance_rescale: float = 0.0
    extras: tuple[tuple[str, str], ...] = ()
    """Further A1111 fields, in order, each value as written before quoting: ``Schedule
    type``, ``Eta``, ``Model hash``, ``Lora hashes``, ``TI hashes``, the options of
    `RECORDED_OPTIONS` that the call set, ``Emphasis``, ``Mask blur``, ``ControlNet 0``,
    ..., ``Version`` (and any field a read text had)."""

    def a1111(self) -> str:
        """The ``parameters`` text A1111-compatible tools read from a PNG.

        Three parts, as A1111 writes them: the prompt (its lines), a line ``Negative prompt:
        ...`` and a last line of ``Key: value`` fields. A1111's reader takes the last line as
        the fields and the first line starting with ``Negative prompt:`` as the start of the
        negative prompt, so a prompt is written as it is only when that reading gives it
        back and no line of it looks like either (``negative prompt:`` or ``steps:``, in any
        case, after spaces), does not start with ``"``, and holds no control character, NUL,
        Unicode line separator or lone surrogate (which PNG text cannot carry). Any other
        prompt is written as one JSON string on one line (``"a\\nNegative prompt: b"``):
        A1111 then shows the quotes and escapes but no forged field, and `from_a1111` reads
        it back exactly. Field values are quoted as A1111's ``quote()`` does (JSON, when
        they hold ``,``, ``:`` or a newline), and also when they start with ``"``, have
        spaces at either end or hold characters PNG text cannot carry.
        """
        fields = [
            ("Steps", str(self.steps)),
            ("Sampler", _quote(self.scheduler)),
            ("CFG scale", _number(self.guidance_scale)),
            ("Seed", str(self.seed)),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", _quote(self.model)),
        ]
        if self.strength is not None:
            fields.append(("Denoising strength", _number(self.strength)))
        if self.clip_skip is not None:
            fields.append(("Clip skip", str(self.clip_skip + 1)))  # A1111 counts from 1
        if self.guidance_rescale:
            fields.append(("Guidance rescale", _number(self.guidance_rescale)))
        fields += [(key, _quote(value)) for key, value in self.extras]
        # A1111 writes no negative line for an empty negative prompt.
        negative = (
            f"{NEGATIVE_LABEL} {_prompt_text(self.negative_prompt)}\n"
            if self.negative_prompt
            else ""
        )
        return (
            f"{_prompt_text(self.prompt)}\n"
            + negative
            + ", ".join(f"{key}: {value}" for key, value in fields)
        )

    @classmethod
    def from_png(cls, path: str | os.PathLike[str]) -> GenerationParameters:
        """The parameters a PNG carries (its ``parameters`` text, written by latentkit or
        A1111); `InvalidArgumentError` if it has none."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                text = getattr(image, "text", {}).get("parameters")
        except (OSError, UnidentifiedImageError) as e:
            raise InvalidArgumentError(f"{path}: cannot read it as a PNG ({e})") from e
        if not isinstance(text, str):
            raise InvalidArgumentError(f"{path} carries no 'parameters' text")
        return cls.from_a1111(text)

    def to_options(self) -> dict[str, Any]:
        """``generate`` keywords that regenerate this image with the same model (A1111's
        sampler and schedule labels mapped to latentkit's schedulers), the options of
        `RECORDED_OPTIONS`, ``prompt_syntax`` (``Emphasis: None``) and the ControlNet
        settings (``control_scale``, ``control_start``, ``control_end``, ``guess_mode``)
        included.

        The input pictures are not in the text (`NOT_RECORDED`): `input_images` names those
        the image was made with, and the caller adds them (``image=``, ``mask_image=``,
        ``control_image=``, with the same ControlNets attached); without them ``generate``
        refuses the options that need them. ``strength`` comes back for an image made from
        a picture (not for A1111's hires fix, whose ``Denoising strength`` is the second
        pass's); ``width`` and ``height`` are left out where the output size follows the
        input (``outpaint``, the x4 upscaler's ``noise_level``), which refuses them. A value
        that does not read as its option's kind raises `InvalidArgumentError`."""
        from latentkit import schedulers

        extras = dict(self.extras)
        options: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "scheduler": schedulers.from_a1111_label(self.scheduler, extras.get("Schedule type")),
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
        }
        if self.clip_skip is not None:
            options["clip_skip"] = self.clip_skip
        if self.guidance_rescale:
            options["guidance_rescale"] = self.guidance_rescale
        if self._from_picture:
            options["strength"] = self.strength
        for name, key, kind in RECORDED_OPTIONS:
            if key in extras:
                options[name] = _read_option(key, extras[key], kind)
        if extras.get(EMPHASIS) == PLAIN_EMPHASIS:
            options["prompt_syntax"] = "plain"
        options.update(_control_options(self.controlnets()))
        if "outpaint" in options or "noise_level" in options:
            del options["width"], options["height"]
        return options

    @property
    def input_images(self) -> tuple[str, ...]:
        """The ``generate`` keywords of the pictures this image was made from, which no
        text can carry: ``"image"`` (a ``Denoising strength`` outside A1111's hires fix,
        ``Denoising start``, ``Outpaint`` or the upscaler's ``Noise level``), ``"mask_image"``
        (``Mask blur``, which A1111 and latentkit write for inpainting) and
        ``"control_image"`` (a ``ControlNet N`` field). Empty for text-to-image."""
        extras = dict(self.extras)
        needed = []
        if self._from_picture or any(
            k in extras for k in ("Denoising start", "Outpaint", "Noise level", MASK_BLUR)
        ):
            needed.append("image")
        if MASK_BLUR in extras:
            needed.append("mask_image")
        if self.controlnets():
            needed.append("control_image")
        return tuple(needed)

    @property
    def _from_picture(self) -> bool:
        """Whether ``Denoising strength`` is an image task's: A1111 writes it for its hires
        fix too (with ``Hires upscale``, ``Hires steps``, ...), where no picture was given."""
        return self.strength is not None and not any(k.startswith("Hires ") for k, _ in self.extras)

    def controlnets(self) -> list[dict[str, str]]:
        """The ``ControlNet 0``, ``ControlNet 1``, ... fields (A1111's ControlNet extension's
        units, latentkit's in the same form), in order, each as its ``Key: value`` items
        (``Model``, ``Weight``, ``Guidance Start``, ``Guidance End``, ``Control Mode``...)."""
        units = sorted(
            (int(m.group(1)), value)
            for key, value in self.extras
            if (m := _CONTROLNET_KEY.fullmatch(key)) is not None
        )
        return [_unit_items(value) for _, value in units]

    @classmethod
    def from_a1111(cls, text: str) -> GenerationParameters:
        """The parameters in an A1111 ``parameters`` text; the inverse of `a1111`.

        ``GenerationParameters.from_a1111(p.a1111()) == p`` for every ``p`` (prompts with
        newlines, NUL bytes, lone surrogates or text that looks like other fields included).
        Texts written by A1111 itself read as A1111 reads them, except that a prompt that
        starts with ``"`` and is a whole JSON string is read as that string. Fields this
        class has no place for (``Hires upscale``, ``VAE``, ...) are ignored; a text without
        ``Steps``, ``Sampler``, ``CFG scale``, ``Seed`` or ``Size``, or with a value that is
        not a number where one is expected, raises `InvalidArgumentError`.
        """
        if not isinstance(text, str):
            raise InvalidArgumentError(f"parameters text must be a str, not {type(text).__name__}")
        *body, last = text.split("\n")
        fields = dict(_fields(last))
        if len(fields) < 3:  # as A1111: no field line, all of it is prompt
            body, fields = [*body, last], {}
        if body and body[0].startswith('"') and (quoted := _unquote_line(body[0])) is not None:
            prompt, rest = quoted, body[1:]
        else:
            end = next((i for i, line in enumerate(body) if line.startswith(NEGATIVE_LABEL)), None)
            end = len(body) if end is None else end
            prompt, rest = "\n".join(body[:end]), body[end:]
        negative = ""
        if rest:
            negative = "\n".join(rest)[len(NEGATIVE_LABEL) :].removeprefix(" ")
            if negative.startswith('"') and (quoted := _unquote_line(negative)) is not None:
                negative = quoted

        missing = [k for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if k not in fields]
        if missing:
            raise InvalidArgumentError(
                f"the parameters text has no {', '.join(map(repr, missing))} field(s) (its last "
                "line holds them, e.g. 'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                "Size: 512x512')"
            )

        def get(key: str) -> str:
            return fields[key]

        def number(key: str, kind: type[int] | type[float]) -> Any:
            try:
                value = kind(get(key))
            except ValueError as e:
                raise InvalidArgumentError(
                    f"the parameters field {key!r} must be a number, got {get(key)!r}"
                ) from e
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgumentError(f"the parameters field {key!r} is {value}")
            return value

        size = re.fullmatch(r"(\d+)x(\d+)", get("Size"))
        if size is None:
            raise InvalidArgumentError(
                f"the parameters field 'Size' must be WxH, got {get('Size')!r}"
            )
        return cls(
            prompt=prompt,
            negative_prompt=negative,
            steps=number("Steps", int),
            scheduler=get("Sampler"),
            guidance_scale=number("CFG scale", float),
            seed=number("Seed", int),
            width=int(size.group(1)),
            height=int(size.group(2)),
            model=fields.get("Model", ""),
            strength=number("Denoising strength", float)
            if "Denoising strength" in fields
            else None,
            clip_skip=number("Clip skip", int) - 1 if "Clip skip" in fields else None,
            guidance_rescale=number("Guidance rescale", float)
            if "Guidance rescale" in fields
            else 0.0,
            extras=tuple((k, v) for k, v in fields.items() if k not in _CORE_FIELDS),
        )


RECORDED_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("prompt_2", "Prompt 2", "text"),
    ("negative_prompt_2", "Negative prompt 2", "text"),
    ("guidance_interval", "Guidance interval", "numbers"),
    ("feature_cache", "Feature cache", "int"),
    ("timesteps", "Timesteps", "numbers"),
    ("sigmas", "Sigmas", "numbers"),
    ("denoising_start", "Denoising start", "number"),
    ("denoising_end", "Denoising end", "number"),
    ("outpaint", "Outpaint", "ints"),
    ("noise_level", "Noise level", "int"),
    ("original_size", "Original size", "size"),
    ("target_size", "Target size", "size"),
    ("crops_coords_top_left", "Crop top left", "ints"),
    ("negative_original_size", "Negative original size", "size"),
    ("negative_target_size", "Negative target size", "size"),
    ("negative_crops_coords_top_left", "Negative crop top left", "ints"),
    ("aesthetic_score", "Aesthetic score", "number"),
    ("negative_aesthetic_score", "Negative aesthetic score", "number"),
)
"""``generate`` keywords A1111 has no field for, as (keyword, field key, kind), in the
order they are written. Kinds: ``text``; ``int``; ``number`` (all its digits, so it reads
back equal); ``numbers`` (``"0.28, 5.42"``; ``inf`` for an open end); ``ints``
(``"0, 0, 64, 0"``, in the keyword's order); ``size`` (a (height, width) pair written
``WxH`` like A1111's ``Size``). A value with ``,`` or ``:`` is JSON-quoted, as every field."""

NOT_RECORDED: dict[str, str] = {
    "image": "an input picture; Denoising strength, Denoising start, Outpaint or Noise level "
    "say that one was used (GenerationParameters.input_images)",
    "mask_image": "an input picture; Mask blur: 0 says that one was used",
    "control_image": "an input picture; the ControlNet N fields say which ControlNets read one",
    "depth_map": "an input picture (a depth model estimates one from image= when it is not given)",
    "latents": "a tensor of starting noise; the seed it was drawn from, if any, is not known",
    "generator": "recorded as each generator's initial_seed(), which regenerates the image only "
    "if the generator was fresh and on the CPU",
    "prompt_embeds": "a tensor; the prompt is then written empty",
    "negative_prompt_embeds": "a tensor; the negative prompt is then written empty",
    "pooled_prompt_embeds": "a tensor",
    "negative_pooled_prompt_embeds": "a tensor",
    "num_images": "each PNG is one image with its own Seed; one int seed for several images "
    "draws them all from one generator, so only the first one's PNG regenerates alone (pass "
    "one seed per image, seed=[...], for PNGs that each regenerate alone)",
    "callback": "does not change the pixels",
    "progress": "does not change the pixels",
    "output_type": "PNGs are written from PIL images (the same pixels in every output type)",
}
"""The ``generate`` keywords the text does not carry, with the reason. Every other keyword
is a core field, an option of `RECORDED_OPTIONS`, ``prompt_syntax`` (``Emphasis``) or a
ControlNet setting (``ControlNet N``)."""

EMPHASIS = "Emphasis"
"""A1111's field for how ``(word:1.2)`` is read; its ``None`` is latentkit's
``prompt_syntax="plain"`` (brackets are text)."""
PLAIN_EMPHASIS = "None"
MASK_BLUR = "Mask blur"
"""A1111's inpainting field; latentkit writes ``Mask blur: 0`` (it does not blur masks) so
a PNG says that a mask was used."""

CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}
"""A1111's ControlNet ``Control Mode`` for latentkit's ``guess_mode`` (A1111's "improved guess
mode"; its soft weights differ from diffusers', so only latentkit reproduces the pixels)."""
_CONTROLNET_KEY = re.compile(r"ControlNet (\d{1,4})")


def controlnet_unit(
    *, model: str, weight: float, start: float, end: float, guess_mode: bool
) -> str:
    """One ``ControlNet N`` value as A1111's ControlNet extension writes it (its
    ``serialize_unit``: ``Key: value`` items joined by ``, ``; the whole field JSON-quoted):
    ``Module: none`` (the control image was given as it is), ``Model: name [hash]``,
    ``Weight`` (``control_scale``), ``Resize Mode: Just Resize`` (resized to the output
    without cropping, as latentkit does), ``Guidance Start`` / ``Guidance End``
    (``control_start`` / ``control_end``) and ``Control Mode`` (`CONTROL_MODES`)."""
    items = [
        ("Module", "none"),
        ("Model", model),
        ("Weight", _number(weight)),
        ("Resize Mode", "Just Resize"),
        ("Guidance Start", _number(start)),
        ("Guidance End", _number(end)),
        ("Control Mode", CONTROL_MODES[guess_mode]),
    ]
    return ", ".join(f"{key}: {value}" for key, value in items)


def _unit_items(value: str) -> dict[str, str]:
    """A ``ControlNet N`` value's items, split as the extension's ``parse_unit`` splits them
    (at ``,`` then at the first ``: ``)."""
    items = {}
    for item in value.split(","):
        key, sep, text = item.strip().partition(": ")
        if sep:
            items[key] = text
    return items


def _control_options(units: list[dict[str, str]]) -> dict[str, Any]:
    """``control_scale``, ``control_start``, ``control_end`` and ``guess_mode`` from the
    units (one value each for one ControlNet, else one per ControlNet); A1111's defaults
    (1, 0, 1) for an item a unit lacks."""
    if not units:
        return {}
    columns: dict[str, list[float]] = {}
    for name, key, default in (
        ("control_scale", "Weight", 1.0),
        ("control_start", "Guidance Start", 0.0),
        ("control_end", "Guidance End", 1.0),
    ):
        columns[name] = [
            _read_option(f"ControlNet {i} {key}", unit[key], "number") if key in unit else default
            for i, unit in enumerate(units)
        ]
    options: dict[str, Any] = {
        name: values[0] if len(values) == 1 else values for name, values in columns.items()
    }
    options["guess_mode"] = all(u.get("Control Mode") == CONTROL_MODES[True] for u in units)
    return options


def option_fields(options: dict[str, Any]) -> list[tuple[str, str]]:
    """The fields of the `RECORDED_OPTIONS` in ``options`` (keyword → value as ``generate``
    took it), in the table's order, values unquoted (`GenerationParameters.a1111` quotes)."""
    fields = []
    for name, key, kind in RECORDED_OPTIONS:
        if name not in options:
            continue
        value = options[name]
        if kind == "text":
            text = str(value)
        elif kind == "int":
            text = str(int(value))
        elif kind == "number":
            text = _number(float(value))
        elif kind == "numbers":
            text = ", ".join(_number(float(v)) for v in value)
        elif kind == "ints":
            text = ", ".join(str(int(v)) for v in value)
        else:  # size: (height, width) written WxH
            text = f"{int(value[1])}x{int(value[0])}"
        fields.append((key, text))
    return fields


def _read_option(key: str, text: str, kind: str) -> Any:
    """A field's value as its option's kind (the inverse of `option_fields`)."""
    try:
        if kind == "text":
            return text
        if kind == "int":
            return int(text)
        if kind == "number":
            value = float(text)
            if math.isnan(value):
                raise ValueError(text)
            return value
        if kind in ("numbers", "ints"):
            parts = [p.strip() for p in text.split(",")]
            if kind == "ints":
                return tuple(int(p) for p in parts)
            values = tuple(float(p) for p in parts)
            if any(math.isnan(v) for v in values):
                raise ValueError(text)
            return values
        size = re.fullmatch(r"(\d+)x(\d+)", text.strip())
        if size is None:
            raise ValueError(text)
        return int(size.group(2)), int(size.group(1))  # WxH → (height, width)
    except ValueError as e:
        what = {
            "int": "an integer",
            "number": "a number",
            "numbers": "numbers separated by commas",
            "ints": "integers separated by commas",
            "size": "WxH",
        }[kind]
        raise InvalidArgumentError(
            f"the parameters field {key!r} must be {what}, got {text!r}"
        ) from e


_CORE_FIELDS = frozenset(
    {
        "Steps",
        "Sampler",
        "CFG scale",
        "Seed",
        "Size",
        "Model",
        "Denoising strength",
        "Clip skip",
        "Guidance rescale",
    }
)
"""The fields `GenerationParameters` has attributes for; the others go to ``extras``."""

NEGATIVE_LABEL = "Negative prompt:"
"""The start of the line of the negative prompt in A1111's ``parameters`` text."""

_FIELD_LINE = re.compile(r"\s*(negative prompt|steps)\s*:", re.IGNORECASE)
"""A line that A1111's reader (which strips lines) or a regex-based one would take for the
start of the negative prompt or for the field line."""
_CANNOT_CARRY = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
"""Characters a prompt is not written raw with: C0/C1 controls but tab and newline (NUL
cannot be in PNG text at all; CR and the Unicode line separators split lines in other
readers), and lone surrogates, which no UTF-8 text can hold."""
_FIELD = re.compile(r'\s*([^:,"]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
"""One ``Key: value`` of the field line; a value is a JSON string or runs to the next comma."""


def _json_line(text: str) -> str:
    """``text`` as a JSON string on one line, in PNG-safe characters: json.dumps escapes
    controls, quotes and backslashes; C1 controls, line separators and lone surrogates are
    escaped too (``\\ud800`` reads back as the lone surrogate it was)."""
    quoted = json.dumps(text, ensure_ascii=False)
    return _CANNOT_CARRY.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


def _prompt_text(text: str) -> str:
    if (
        text.startswith('"')
        or _CANNOT_CARRY.search(text)
        or any(_FIELD_LINE.match(line) for line in text.split("\n"))
    ):
        return _json_line(text)
    return text


def _quote(value: str) -> str:
    """A field value as A1111's ``quote()`` writes it (JSON when it holds ``,`` ``:`` or a
    newline), also quoted when a plain value would not read back the same."""
    if (
        any(c in value for c in ",:\n")
        or value.startswith('"')
        or value != value.strip()
        or _CANNOT_CARRY.search(value)
    ):
        return _json_line(value)
    return value


def _number(value: float) -> str:
    """``value`` as A1111 writes it (``7.5``, ``7``), with all its digits where ``:g``
    would round it, so it reads back equal."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _unquote_line(text: str) -> str | None:
    """The string a whole-line JSON string ``text`` holds, or None if it is not one.

    Decoded here rather than by ``json.loads``, which joins ``\\ud800\\udc00`` into one
    character: `_json_line` escapes only surrogates that stood alone (astral characters
    are written as themselves), so each ``\\uXXXX`` is read back as the one code point it
    was, and a prompt holding two lone surrogates in a row reads back exactly."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return None
    out: list[str] = []
    i, end = 1, len(text) - 1
    while i < end:
        c = text[i]
        if c == '"' or ord(c) < 0x20:
            return None  # an unescaped quote or control: not one JSON string
        if c != "\\":
            out.append(c)
            i += 1
            continue
        code = text[i + 1 : i + 2]
        if code == "u":
            digits = text[i + 2 : i + 6]
            if len(digits) != 4 or not all(d in "0123456789abcdefABCDEF" for d in digits):
                return None
            out.append(chr(int(digits, 16)))
            i += 6
        elif code in _JSON_ESCAPES and i + 1 < end:
            out.append(_JSON_ESCAPES[code])
            i += 2
        else:
            return None
    return "".join(out)


_JSON_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


def _fields(line: str) -> list[tuple[str, str]]:
    fields = []
    for match in _FIELD.finditer(line):
        key, value = match.group(1).strip(), match.group(2)
        if value.startswith('"') and (quoted := _unquote_line(value)) is not None:
            value = quoted
        fields.append((key, value))
    return fields


@dataclass(frozen=True)
class GenerationResult:
    """Images and the parameters of each (one entry per image, in order).

    ``images`` holds PIL images, or for ``output_type="np"`` float32 arrays (H, W, 3) in
    ``[0, 1]``, for ``"pt"`` float tensors (3, H, W) in ``[0, 1]``, for ``"latent"`` the
    scaled latents (C, h, w).
    """

    images: list[Any]
    parameters: list[GenerationParameters] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [p.seed for p in self.parameters]

    def save(self, path: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Save PIL images as PNGs carrying their parameters; several images get ``-N`` suffixes.

        Existing files are not replaced unless ``overwrite=True``.
        """
        paths = output_paths(path, len(self.images), overwrite=overwrite)
        for image, params, p in zip(self.images, self.parameters, paths, strict=True):
            save_png(image, p, params, overwrite=overwrite)
        return paths


def output_paths(
    path: str | os.PathLike[str], count: int, *, overwrite: bool = False
) -> list[Path]:
    """The files `GenerationResult.save` writes for ``count`` images, each checked with
    `check_output_path`, so callers can fail before generating: `OutputExistsError` if any
    exists and ``overwrite`` is off, `OutputPathError` if one cannot be written."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"the output path must be a str or Path, not {type(path).__name__}"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgumentError(f"the image count must be an int >= 1, got {count!r}")
    target = Path(path)
    if count == 1:
        paths = [target]
    else:
        paths = [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(count)]
    for p in paths:
        check_output_path(p, overwrite=True)  # all but existence: a folder is no "file"
    taken = [str(p) for p in paths if _lexists(p)]
    if taken and not overwrite:
        raise OutputExistsError(
            f"{', '.join(taken)} already exist(s); pass overwrite=True to replace",
            path=taken[0],
        )
    return paths


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Check that a file can be written at ``path`` without writing anything: that it is
    not a folder, that no part of its folder is a file, that each name fits the file
    system's limit and the whole its path limit, that the nearest existing folder can be
    written, and that it does not exist unless ``overwrite``. Raises `OutputPathError`
    (`OutputExistsError` for an existing file) naming the path."""
    name = os.fspath(path)
    if not isinstance(name, str):
        raise InvalidArgumentError(f"the output path must be text, got {name!r}")
    target = Path(name)

    def fail(reason: str) -> OutputPathError:
        return OutputPathError(f"cannot write {name!r}: {reason}", path=name)

    if "\0" in name:
        raise fail("it contains a NUL byte")
    try:
        encoded = os.fsencode(name)
    except UnicodeEncodeError as e:
        raise fail("it is not encodable as a file name on this system") from e
    if not target.name or target.name in (".", ".."):
        raise fail("it names no file; give the PNG file's path, e.g. out.png")
    if os.path.isdir(target):  # not Path.is_dir: it raises for a name too long
        raise fail("it is a folder; give the PNG file's path, e.g. its/path/out.png")
    if _lexists(target) and not overwrite:
        raise OutputExistsError(
            f"{name} already exists; pass overwrite=True to replace it", path=name
        )
    absolute = Path(os.path.abspath(name))
    folder = absolute.parent
    while not _lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.path.isdir(folder):
        raise fail(f"{folder} is a file, so it cannot hold a folder or file")
    name_max = _pathconf(folder, "PC_NAME_MAX", 255)
    path_max = _pathconf(folder, "PC_PATH_MAX", 4096)
    for part in absolute.relative_to(folder).parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise fail(
                f"the name {part[:24]!r}... is {size} bytes; this file system allows {name_max}"
            )
    if len(encoded) >= path_max or len(os.fsencode(str(absolute))) >= path_max:
        raise fail(f"the path is longer than the {path_max} bytes this system allows")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise fail(f"the folder {folder} is not writable")


def encode_png(image: Image.Image, params: GenerationParameters | None) -> bytes:
    """``image`` as PNG bytes with a ``parameters`` text chunk (A1111 convention)."""
    import io

    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    if not isinstance(image, PILImage.Image):
        raise InvalidArgumentError("only PIL images can be saved; generate with output_type='pil'")
    info = PngInfo()
    if params is not None:
        info.add_text("parameters", params.a1111())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(
    image: Image.Image,
    path: str | os.PathLike[str],
    params: GenerationParameters | None,
    *,
    overwrite: bool = False,
) -> None:
    """Write ``image`` as PNG with a ``parameters`` text chunk (A1111 convention), whole or
    not at all (see the module docstring).

    Without ``overwrite`` the file is created exclusively (by a hard link), so a file that
    appeared since the check (another process) is never replaced.
    """
    target = Path(path)
    check_output_path(target, overwrite=overwrite)
    data = encode_png(image, params)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(
            f"cannot create the folder of {target}: {_reason(e)}", path=target
        ) from e
    write_atomically(target, data, overwrite=overwrite)


def write_atomically(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed to
    disk, then renamed onto ``path`` (``overwrite``) or hard-linked to it (which fails if
    ``path`` exists, so nothing is replaced). The temporary file is removed whatever
    happens; only a kill can leave one (a hidden ``.*.latentkit.tmp``), never a partial
    ``path``."""
    # A short name of its own: the target's name may already be at the length limit.
    while True:
        temporary = path.parent / f".{secrets.token_hex(8)}.latentkit.tmp"
        try:
            fd = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            )
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputPathError(f"cannot write {path}: {_reason(e)}", path=path) from e
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError as e:
                raise OutputExistsError(
                    f"{path} already exists; pass overwrite=True to replace it", path=path
                ) from e
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise
                # A file system without hard links (FAT, some network shares): check, then
                # rename; a file appearing in between would be replaced.
                if _lexists(path):
                    raise OutputExistsError(
                        f"{path} already exists; pass overwrite=True to replace it", path=path
                    ) from e
                os.replace(temporary, path)
    except OutputPathError:
        raise
    except OSError as e:  # a full disk, a quota, an I/O error
        raise OutputPathError(f"cannot write {path}: {_reason(e)}", path=path) from e
    finally:
        with suppress(OSError):
            os.unlink(temporary)


_NO_HARD_LINKS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "EXDEV", "EMLINK", "ENOSYS", "EACCES")
    if hasattr(errno, name)
)


def _lexists(path: Path) -> bool:
    """Whether anything is at ``path``, a dangling symlink included."""
    return os.path.lexists(path)


def _pathconf(folder: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):  # not POSIX, or no limit
        return default
    return value if value > 0 else default


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def to_output(images: torch.Tensor, output_type: OutputType) -> list[Any]:
    """Decoded images in ``[-1, 1]`` (B, 3, H, W) → the requested output type."""
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return list(images)
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return list(array)
    from PIL import Image as PILImage

    return [PILImage.fromarray((a * 255).round().astype(np.uint8)) for a in array]
