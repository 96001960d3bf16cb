"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``): docstring examples render as
code on the API reference page.

Docstrings in this project are Google style. griffe reads a ``>>>`` example as code only under
an ``Examples:`` header; under ``Example:`` (which the Google style guide also allows) or in
plain text, Markdown reads ``>>>`` as three nested quotes, and ``# doctest: +SKIP`` shows.
This extension, before a docstring is parsed:

- renames an ``Example:`` header to ``Examples:``;
- fences a ``>>>`` block outside such a section as ``pycon`` code;
- removes doctest directives (``# doctest: +SKIP``) from example lines.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")
HEADER = re.compile(r"^(\s*)Examples?:\s*$")


def rewrite(text: str) -> str:
    """The docstring ``text`` with its examples made renderable (see the module docstring)."""
    out: list[str] = []
    section: int | None = None  # indentation of the current Examples header, if in one
    fenced: str | None = None  # indentation of the open pycon fence, if one is open
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if fenced is not None and not stripped:
            out.append(f"{fenced}```")
            fenced = None
        if section is not None and stripped and indent <= section:
            section = None
        header = HEADER.match(line)
        if header and fenced is None:
            section = indent
            out.append(f"{header.group(1)}Examples:")
            continue
        if stripped.startswith((">>>", "...")):
            line = DIRECTIVE.sub("", line)
            if section is None and fenced is None and stripped.startswith(">>>"):
                fenced = line[:indent]
                out.append(f"{fenced}```pycon")
        out.append(line)
    if fenced is not None:
        out.append(f"{fenced}```")
    return "\n".join(out)


class DocstringExamples(griffe.Extension):
    """Applies `rewrite` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
