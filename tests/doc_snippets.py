"""The code blocks of README.md and docs/*.md: how they are found, and how they run.

Imported by ``tests/test_docs.py`` for the list of blocks; run as a script, it executes the
blocks of the pages it is given, one page after another, and writes a JSON verdict per block.
The script runs in its own process because the blocks change global state (a scheduler
registered by decorator, the model ``latentkit.generate`` keeps, ``os.environ``).

A page reads like one session, top to bottom:

- ``python`` blocks share one namespace per page (a page may define ``pipe`` once and use it
  below); each page starts from an empty namespace, so every page must import what it uses.
- shell blocks (``bash``, ``console``): every ``latentkit ...`` and ``latentkit-lab ...``
  command runs, in process, through ``latentkit.cli.main`` (``latentkit.lab.cli.main``); ``pip install`` commands must name an installable source
  (the checkout, a folder, an extra of it, or the distribution name); the remaining setup
  commands (``python3 -m venv``, activating a venv, running pytest or mkdocs, the training
  script that ``tests/test_examples.py`` runs with small settings) are listed as not run.
- a ``python`` block that only embeds a file (``--8<-- "examples/x.py"``) is that example
  script, which ``tests/test_examples.py`` runs; the docs tests check that the embed renders.
- every page runs in its own empty folder holding the input pictures the pages name
  (`INPUTS`), so a snippet that writes ``cat.png`` writes it there.

Two markers, an HTML comment on the line before a block, change what happens to it:

- ``<!-- snippet: requires cuda -->`` (or ``requires MODULE``, say ``ray``): the block runs
  only where CUDA is available (the module is installed), and is reported as skipped
  elsewhere;
- ``<!-- snippet: file NAME -->``: the block is the content of the file ``NAME`` (or embeds
  it with ``--8<--``), which the blocks below it read; it is written into the page's folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
EMBED = re.compile(r'^\s*-{2}8<-{2}\s*"([^"]+)"\s*$')
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")

# Commands the pages show for setting up, which a test cannot (and need not) repeat.
SETUP = ("python3 -m venv", "python -m venv", ". .venv/bin/activate", "source .venv/bin/activate")
SETUP += ("python -m pytest", "pytest", "mkdocs", "python examples/train_shapes.py")
# Cluster administration: starting or joining a Ray cluster is infrastructure, not latentkit.
SETUP += ("ray start", "ray stop", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start")


@dataclass(frozen=True)
class Snippet:
    """One fenced code block: its page, the line of its opening fence, language and text."""

    page: str
    line: int
    language: str
    text: str
    requires: str = ""  # "cuda" for a block marked <!-- snippet: requires cuda -->
    file: str = ""  # "jobs.jsonl" for a block marked <!-- snippet: file jobs.jsonl -->

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def embeds(self) -> list[str]:
        """The files a block includes with ``--8<--``, if that is all it does."""
        lines = [line for line in self.text.splitlines() if line.strip()]
        found = [m.group(1) for m in map(EMBED.match, lines) if m]
        return found if found and len(found) == len(lines) else []


def snippets(page: str) -> list[Snippet]:
    """Every fenced code block of ``page`` (a path relative to the repository root)."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found: list[Snippet] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            # Blocks inside list items are indented: drop the fence's own indentation.
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        options = {"requires": "", "file": ""}
        if marker:
            words = marker.group(1).split()
            if len(words) != 2 or words[0] not in options:
                raise ValueError(f"{page}:{start + 1}: unknown snippet marker {before.strip()!r}")
            options[words[0]] = words[1]
        text = "\n".join(body) + "\n"
        found.append(Snippet(page, start + 1, language.lower(), text, **options))
    return found


def commands(snippet: Snippet) -> list[str]:
    """The shell commands of a block: continuation lines joined, ``&&`` chains split, ``$ ``
    prompts removed (in a block with prompts, the lines without one are output)."""
    lines = snippet.text.splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    joined: list[str] = []
    pending = ""
    for line in lines:
        if prompted and not pending:
            if not line.startswith("$ "):
                continue  # the output the page shows
            line = line[2:]
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    out: list[str] = []
    for line in joined:
        for part in line.split("&&"):
            text = part.split(" #")[0].strip() if " #" in part else part.strip()
            if text and not text.startswith("#"):
                out.append(text)
    return out


def check_pip(command: str, distribution: str) -> str | None:
    """Why ``pip install ...`` would not install what the page means, or None if it would."""
    args = shlex.split(command)[2:]
    for arg in args:
        if arg.startswith("-") or arg in (".",) or arg.startswith(("./", "examples/")):
            continue
        if arg.startswith(".[") or arg.startswith(".\\["):
            continue
        name = re.split(r"[\[<>=!~ ;@]", arg, maxsplit=1)[0]
        if name == "torch":
            if "==" not in arg:
                return "torch must be pinned (an unpinned torch pulls CUDA packages)"
            continue
        if re.sub(r"[-_.]+", "-", name).lower() != distribution:
            return f"pip install {arg}: the distribution is {distribution}, not {name}"
    return None


@dataclass
class Verdict:
    id: str
    status: str  # "ok", "failed", "skipped", "not run", "embed"
    message: str = ""
    seconds: float = 0.0


def _write_inputs(folder: Path, local_model: Path) -> None:
    """The files the pages read: pictures, a mask, a depth map and a local model folder."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:32, 0:32] / 31.0
    photo = np.stack([x, y, 1 - x], axis=-1)
    photo[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08] = (0.9, 0.2, 0.2)
    Image.fromarray((photo * 255).astype(np.uint8)).save(folder / "photo.png")
    Image.fromarray((photo[::-1] * 255).astype(np.uint8)).save(folder / "room.png")
    mask = ((x > 0.3) & (x < 0.7) & (y > 0.4)).astype(np.uint8) * 255
    Image.fromarray(mask).save(folder / "sofa-mask.png")
    Image.fromarray((y * 255).astype(np.uint8)).save(folder / "depth.png")
    (folder / "path" / "to").mkdir(parents=True)
    shutil.copytree(local_model, folder / "path" / "to" / "model")


INPUTS = ["photo.png", "room.png", "sofa-mask.png", "depth.png", "path/to/model"]
"""What every page's folder holds before its blocks run (`_write_inputs`)."""


def run_page(page: str, folder: Path, *, distribution: str) -> list[Verdict]:
    """Run the blocks of ``page`` in ``folder``, in order; a failure stops the page."""

    from latentkit.cli import main as cli

    # A real module, so that what a block defines can be looked up by its __module__ (a
    # dataclass resolves its string annotations through sys.modules).
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", page))
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    verdicts: list[Verdict] = []
    failed = ""
    home = Path.cwd()
    os.chdir(folder)
    try:
        for snippet in snippets(page):
            if snippet.file:
                embedded = [(ROOT / f).read_text() for f in snippet.embeds]
                (folder / snippet.file).write_text("".join(embedded) or snippet.text)
                continue
            if snippet.language not in PYTHON | SHELL:
                continue
            if failed:
                verdicts.append(Verdict(snippet.id, "not run", f"{failed} failed above"))
                continue
            missing = _missing(snippet.requires)
            if missing:
                verdicts.append(Verdict(snippet.id, "skipped", missing))
                continue
            if snippet.embeds:
                verdicts.append(Verdict(snippet.id, "embed", " ".join(snippet.embeds)))
                continue
            out = io.StringIO()
            began = time.perf_counter()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    if snippet.language in PYTHON:
                        exec(compile(snippet.text, snippet.id, "exec"), namespace)
                        verdicts.append(Verdict(snippet.id, "ok"))
                    else:
                        verdicts.append(_run_shell(snippet, cli, distribution))
            except BaseException as e:  # SystemExit from argparse included
                message = "".join(traceback.format_exception(e))
                verdicts.append(Verdict(snippet.id, "failed", f"{message}\n{out.getvalue()}"))
            verdicts[-1].seconds = round(time.perf_counter() - began, 2)
            if verdicts[-1].status == "failed":
                failed = snippet.id
                if not verdicts[-1].message.strip():
                    verdicts[-1].message = out.getvalue()
    finally:
        os.chdir(home)
    return verdicts


def _missing(requirement: str) -> str:
    """Why this machine lacks ``requirement`` ("cuda" or an importable module), or ""."""
    import torch

    if not requirement:
        return ""
    if requirement == "cuda":
        return "" if torch.cuda.is_available() else "needs CUDA"
    return "" if importlib.util.find_spec(requirement) else f"needs {requirement} installed"


def _run_shell(snippet: Snippet, cli: Any, distribution: str) -> Verdict:
    not_run: list[str] = []
    for command in commands(snippet):
        if command.startswith("latentkit batch") and "--engine ray" in command:
            # The Ray engine (a cluster per run) is tested by tests/test_batch_ray.py.
            not_run.append(command)
        elif command.startswith(("latentkit ", "latentkit-lab ")):
            program, *argv = shlex.split(command)
            if argv[:1] == ["generate"]:
                # Pages show alternatives that write the same file; run each as if it were new.
                argv.append("--overwrite")
            if program == "latentkit-lab":
                from latentkit.lab.cli import main as lab

                status = lab(argv)
            else:
                status = cli(argv)
            if status != 0:
                return Verdict(snippet.id, "failed", f"{command}: exit status {status}")
        elif command.startswith(("pip install", "python -m pip install")):
            command = command.replace("python -m pip", "pip", 1)
            problem = check_pip(command, distribution)
            if problem:
                return Verdict(snippet.id, "failed", problem)
        elif command.startswith(SETUP):
            not_run.append(command)
        else:
            return Verdict(snippet.id, "failed", f"{command}: the docs tests do not know it")
    return Verdict(snippet.id, "ok", "; ".join(f"not run: {c}" for c in not_run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pages", nargs="+")
    parser.add_argument("--work", type=Path, required=True, help="one folder per page in here")
    parser.add_argument("--local-model", type=Path, required=True, help="for path/to/model")
    parser.add_argument("--distribution", required=True, help="the [project] name")
    parser.add_argument("--out", type=Path, required=True, help="JSON verdicts")
    args = parser.parse_args(argv)
    verdicts: list[Verdict] = []
    for page in args.pages:
        folder = args.work / page.replace("/", "_")
        folder.mkdir(parents=True)
        _write_inputs(folder, args.local_model)
        verdicts += run_page(page, folder, distribution=args.distribution)
    args.out.write_text(json.dumps([asdict(v) for v in verdicts], indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
