"""The docs site builds, renders what it embeds, and every README and docs snippet runs.

The Python and shell blocks of README.md and docs/*.md run as a reader would run them, page
by page (see ``tests/doc_snippets.py``), offline, against tiny random models that stand in
for the Hub repos the pages name: a Hugging Face cache is written in which
``stable-diffusion-v1-5/stable-diffusion-v1-5`` *is* the tiny SD 1.x model, and so on
(`HUB`), so ``load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")`` runs unchanged,
through the real cache lookup. Blocks without a model name use the built-in shapes model.
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import doc_snippets
import pytest
from doc_snippets import PAGES, PYTHON, ROOT, SHELL

BLOCKS = [s for page in PAGES for s in doc_snippets.snippets(page)]
SNIPPETS = [s for s in BLOCKS if s.language in PYTHON | SHELL]

REVISION = "0123456789abcdef0123456789abcdef01234567"  # the commit docs/loading.md pins
HUB = {
    # repo id the docs name -> (conftest fixture of the tiny model that stands in, revision)
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd1_path", "main"),
    "stable-diffusion-v1-5/stable-diffusion-inpainting": ("inpaint_path", "main"),
    "stabilityai/stable-diffusion-2-depth": ("depth_path", "main"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl_path", "main"),
    "stabilityai/stable-diffusion-xl-refiner-1.0": ("sdxl_refiner_path", "main"),
    "stabilityai/stable-diffusion-x4-upscaler": ("upscale_path", "main"),
    "owner/model": ("sd1_path", REVISION),
    "lllyasviel/control_v11p_sd15_canny": ("sd1_controlnet_path", "main"),
    "lllyasviel/control_v11f1p_sd15_depth": ("sd1_controlnet_path", "main"),
    "diffusers/controlnet-canny-sdxl-1.0": ("sdxl_controlnet_path", "main"),
    "madebyollin/taesd": ("taesd_path", "main"),
    "latent-consistency/lcm-lora-sdv1-5": ("sd1_lora_path", "main"),
}
FAKE_COMMIT = "f" * 40


def distribution_name() -> str:
    """The ``[project] name`` of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^\[project\]\n(?:.*\n)*?name\s*=\s*"([^"]+)"', text, re.M)
    assert match, "pyproject.toml has no [project] name"
    return match.group(1)


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full = {**os.environ, "PYTHONPATH": path, "NO_MKDOCS_2_WARNING": "1", **env}
    return subprocess.run(args, cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)])
    assert proc.returncode == 0, proc.stderr
    return out


def page_texts(site: Path) -> dict[str, str]:
    """The visible text of every page of the site (tags removed, entities decoded)."""
    texts = {}
    for path in sorted(site.rglob("*.html")):
        if path.parent.name in ("search", "assets") or path.name == "404.html":
            continue
        raw = path.read_text(encoding="utf-8")
        raw = re.sub(r"<(script|style)\b.*?</\1>", "", raw, flags=re.S)
        texts[path.relative_to(site).as_posix()] = html.unescape(re.sub(r"<[^>]+>", "", raw))
    return texts


def test_embeds_render(site: Path) -> None:
    """A ``--8<--`` line that reaches the HTML (say, reformatted by a code formatter into
    ``--8 < --"...``) shows the reader a line of syntax instead of the file it names."""
    literal = re.compile(r"-+\s*8\s*<\s*-+")
    found = {page: literal.findall(text) for page, text in page_texts(site).items()}
    assert not {page: hits for page, hits in found.items() if hits}
    embeds = {(s.page, f) for s in BLOCKS for f in s.embeds}
    assert len(embeds) >= 8  # the embeds this test was written for are still there
    for page, file in embeds:
        assert (ROOT / file).is_file(), f"{page} embeds {file}, which does not exist"
        # The text of the file, not only its name, reaches the page.
        name = "index.html" if page.endswith("index.md") else f"{Path(page).stem}/index.html"
        first = next(line for line in (ROOT / file).read_text().splitlines() if line.strip())
        assert first.strip() in page_texts(site)[name], f"{file} is not on {name}"


def test_embedded_examples_run_in_tests() -> None:
    """The scripts the pages embed run somewhere: examples/*.py in tests/test_examples.py, an
    example package (examples/NAME/...) in a test that names its folder."""
    import test_examples

    tests = "".join(
        p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name
    )
    for snippet in BLOCKS:
        for file in snippet.embeds:
            parts = Path(file).parts
            if parts[0] != "examples" or not file.endswith(".py"):
                continue
            if len(parts) == 2:
                assert parts[1] in test_examples.EXAMPLES, f"{snippet.id}: {file} runs in no test"
            else:
                named = f"examples/{parts[1]}" in tests or f'"{parts[1]}"' in tests
                assert named, f"{snippet.id}: no test names examples/{parts[1]}"


def test_no_doctest_flags_or_escapes_visible(site: Path) -> None:
    """``# doctest: +SKIP`` is for doctest, not readers; ``\\|`` in a table cell's code shows
    the backslash (write the alternatives another way)."""
    for page, text in page_texts(site).items():
        assert "doctest:" not in text, page
        assert "\\|" not in text, page
        # An example outside an "Examples:" section renders as nested quotes, losing ">>>".
    reference = (site / "reference" / "index.html").read_text()
    assert "<blockquote>\n<blockquote>" not in reference


def test_reference_covers_the_public_api(site: Path) -> None:
    """Every name in ``latentkit.__all__``, `save_pipeline`, and every registered scheduler
    class with each of its options (constructor keywords, shown in its signature)."""
    import latentkit
    from latentkit import schedulers

    page = (site / "reference" / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="([^"]+)"', page))

    def anchor(name: str, obj: object) -> str | None:
        canonical = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        return next((a for a in (name, canonical) if a in ids), None)

    missing = [n for n in latentkit.__all__ if not anchor(f"latentkit.{n}", getattr(latentkit, n))]
    if not {"latentkit.save_pipeline", "latentkit.saving.save_pipeline"} & ids:
        missing.append("save_pipeline")
    for name in schedulers.names():
        cls = schedulers.registry[name]
        found = anchor(f"latentkit.schedulers.{cls.__qualname__}", cls)
        if found is None:
            missing.append(f"scheduler {name} ({cls.__module__}.{cls.__qualname__})")
            continue
        # The class's section: from its heading to the next object of the same level.
        section = page[page.index(f'id="{found}"') :]
        end = section.find('<div class="doc doc-object doc-class">')
        text = html.unescape(re.sub(r"<[^>]+>", "", section[: end if end > 0 else None]))
        for option in inspect.signature(cls).parameters:
            if not re.search(rf"\b{option}\b", text):
                missing.append(f"option {option} of scheduler {name}")
    assert not missing, f"not in docs/reference.md: {missing}"


# ---------------------------------------------------------------------------------- snippets


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A Hugging Face cache in which the repos the docs name hold tiny models (`HUB`)."""
    cache = tmp_path_factory.mktemp("hub")
    for repo, (fixture, revision) in HUB.items():
        model: Path = request.getfixturevalue(fixture)
        storage = cache / f"models--{repo.replace('/', '--')}"
        commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else FAKE_COMMIT
        shutil.copytree(model, storage / "snapshots" / commit)
        if commit != revision:
            (storage / "refs").mkdir()
            (storage / "refs" / revision).write_text(commit)
    return cache


@pytest.fixture(scope="module")
def verdicts(
    tmp_path_factory: pytest.TempPathFactory, hub_cache: Path, sd1_path: Path
) -> dict[str, dict[str, str]]:
    """Every page's blocks, run once in one process (`doc_snippets.main`)."""
    work = tmp_path_factory.mktemp("pages")
    out = work / "verdicts.json"
    cmd = [sys.executable, "tests/doc_snippets.py", *PAGES, "--work", str(work / "run")]
    cmd += ["--local-model", str(sd1_path), "--distribution", distribution_name()]
    cmd += ["--out", str(out)]
    offline = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    offline["LATENTKIT_CACHE"] = str(work / "latentkit-cache")  # not the user's ~/.cache
    proc = run(cmd, **offline, HF_HUB_DISABLE_TELEMETRY="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {v["id"]: v for v in json.loads(out.read_text())}


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet: doc_snippets.Snippet, verdicts: dict[str, dict[str, str]]) -> None:
    verdict = verdicts[snippet.id]
    if verdict["status"] == "skipped":
        pytest.skip(f"{snippet.id}: {verdict['message']}")
    assert verdict["status"] in ("ok", "embed"), (
        f"{snippet.id}\n{snippet.text}\n{verdict['message']}"
    )


def test_every_code_block_has_a_known_language() -> None:
    """A block without a language is neither highlighted nor run: say what it is."""
    allowed = PYTHON | SHELL | {"text", "toml", "json", "yaml"}
    for page in PAGES:
        for snippet in doc_snippets.snippets(page):
            assert snippet.language in allowed, f"{snippet.id}: language {snippet.language!r}"


# ---------------------------------------------------------------------------------- the rest


def test_cli_page_lists_every_option() -> None:
    """Every subcommand and every long option of ``latentkit`` and ``latentkit-lab``."""
    from latentkit import cli
    from latentkit.lab import cli as lab_cli

    page = (ROOT / "docs" / "cli.md").read_text()
    missing = []
    for program, parser in (("latentkit", cli._parser()), ("latentkit-lab", lab_cli._parser())):
        commands = next(a for a in parser._actions if isinstance(a.choices, dict))
        assert isinstance(commands.choices, dict)
        for name, sub in commands.choices.items():
            if f"{program} {name}" not in page:
                missing.append(f"{program} {name}")
            for action in sub._actions:
                for option in action.option_strings:
                    if option.startswith("--") and option != "--help" and option not in page:
                        missing.append(f"{program} {name} {option}")
    assert not missing, f"not in docs/cli.md: {missing}"


def test_plugin_example_depends_on_this_distribution() -> None:
    """The PyPI name ``latentkit`` belongs to an unrelated project: the example plugin must
    depend on this project's distribution name, which the import name need not equal."""
    name = distribution_name()
    assert name != "latentkit"
    for folder in ("scheduler_plugin", "family_plugin"):
        plugin = (ROOT / "examples" / folder / "pyproject.toml").read_text()
        assert re.search(rf'dependencies = \[\s*"{re.escape(name)}[^"]*"\s*\]', plugin), plugin


def test_picture_script_makes_every_picture_the_docs_show(tmp_path: Path) -> None:
    """``scripts/make_pictures.py`` (few steps, into a temporary folder) writes a PNG for every
    picture in docs/images, every one of which a page shows."""
    proc = run([sys.executable, "scripts/make_pictures.py", "--quick", "--output", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    shipped = sorted(p.name for p in (ROOT / "docs" / "images").glob("*.png"))
    assert made == shipped
    pages = "".join((ROOT / page).read_text() for page in PAGES)
    for name in shipped:
        assert f"images/{name})" in pages, f"docs/images/{name} is on no page"


def test_docstring_examples_become_code() -> None:
    """The griffe extension of the docs build (docs/hooks/griffe_examples.py)."""
    spec = importlib.util.spec_from_file_location(
        "griffe_examples", ROOT / "docs" / "hooks" / "griffe_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError:
        pytest.skip("griffe is not installed (pip install -e '.[docs]')")
    section = "Load it.\n\nExample:\n    >>> f(1)  # doctest: +SKIP\n    2\n\nMore text."
    assert module.rewrite(section) == ("Load it.\n\nExamples:\n    >>> f(1)\n    2\n\nMore text.")
    bare = "A module.\n\n>>> import x\n>>> x.y(\n...     1)  # doctest: +SKIP\n(1, 2)\n\nEnd."
    assert module.rewrite(bare) == (
        "A module.\n\n```pycon\n>>> import x\n>>> x.y(\n...     1)\n(1, 2)\n```\n\nEnd."
    )
    assert module.rewrite("Plain text.\n\n    indented code") == "Plain text.\n\n    indented code"
