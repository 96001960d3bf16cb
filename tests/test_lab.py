"""The lab (shapes data, evaluation, training, ``latentkit-lab eval``) sits outside the SDK.

The SDK and its command line never import ``latentkit.lab``; the lab imports the SDK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import latentkit
from latentkit.lab.cli import main
from latentkit.loading import builtin_model

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (nothing imported yet) from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_sdk_never_imports_the_lab(sd1_path: Path) -> None:
    # Every SDK module, the CLI's parser and commands, and a load + generate: afterwards no
    # module under latentkit.lab may be in sys.modules.
    shapes = builtin_model("latentkit/shapes")
    model = "latentkit/shapes" if shapes is not None and shapes.is_dir() else str(sd1_path)
    code = f"""
import contextlib, io, json, pkgutil, sys, importlib
import latentkit, latentkit.api, latentkit.cli
# pkgutil.walk_packages would import latentkit.lab itself to look inside; walk by hand.
packages = [latentkit]
while packages:
    package = packages.pop()
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name == "latentkit.lab" or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        if info.ispkg:
            packages.append(module)
latentkit.cli._parser()
with contextlib.redirect_stdout(io.StringIO()):
    assert latentkit.cli.main(["schedulers"]) == 0
pipe = latentkit.load_pipeline({model!r}, device="cpu", progress=False)
pipe.generate("a red circle", steps=1, seed=0, height=32, width=32, progress=False)
print(json.dumps(sorted(m for m in sys.modules if m == "latentkit.lab" or m.startswith("latentkit.lab."))))
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_the_lab_imports_the_sdk() -> None:
    code = """
import sys
import latentkit.lab.cli, latentkit.lab.evaluation, latentkit.lab.shapes, latentkit.lab.training
assert "latentkit.api" in sys.modules
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr


def test_eval_is_the_labs_command_not_the_sdks() -> None:
    done = _python("import sys; from latentkit.cli import main; sys.exit(main(['eval']))")
    assert done.returncode == 2 and "invalid choice: 'eval'" in done.stderr
    done = _python("import runpy; runpy.run_module('latentkit.lab', run_name='__main__')")
    assert done.returncode == 2 and "latentkit-lab" in done.stderr  # usage: no command given


def test_eval_prints_a_table_per_run(sd1_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # On a random tiny model adherence is ~0; this checks the command, not the model.
    args = ["eval", "--model", str(sd1_path), "--single", "2", "--two", "2", "--steps", "1,2"]
    args += ["--guidance", "1,3", "--ddpm-steps", "0", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for row in ("ddim 1 steps, cfg 1", "dpm-solver++ 2 steps, cfg 3"):
        assert row in out
    assert out.count("\n") == 2 + 2 * 2 * 2  # header, rule, 2 schedulers x 2 steps x 2 guidance


def test_eval_options_reach_every_generate_call(
    sd1_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import latentkit.pipelines.base as base

    seen: list[dict[str, object]] = []
    original = base.LatentDiffusion.generate

    def spy(self: object, prompt: object = None, **options: object) -> object:
        seen.append(options)
        return original(self, prompt, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(base.LatentDiffusion, "generate", spy)
    args = ["eval", "--model", str(sd1_path), "--single", "1", "--two", "1", "--steps", "2"]
    args += ["--guidance", "3", "--ddpm-steps", "0", "--schedulers", "dpm-solver++"]
    args += ["--option", "feature_cache=2", "--option", "guidance_interval=(0.5, 5)", "--quiet"]
    assert main([*args, "--device", "cpu"]) == 0
    assert "dpm-solver++ 2 steps, cfg 3" in capsys.readouterr().out
    assert len(seen) == 1  # one run, one batch
    assert seen[0]["feature_cache"] == 2 and seen[0]["guidance_interval"] == (0.5, 5)


def test_eval_runs_the_pipeline_with_the_performance_flags(
    sd1_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import latentkit.api as api

    loaded: list[object] = []
    original = api.load_pipeline

    def spy(source: object, **options: object) -> object:
        loaded.append(options["performance"])
        return original(source, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "load_pipeline", spy)
    args = ["eval", "--model", str(sd1_path), "--single", "1", "--two", "0", "--steps", "1"]
    args += ["--guidance", "1", "--ddpm-steps", "0", "--schedulers", "ddim", "--quiet"]
    assert main([*args, "--device", "cpu", "--autocast", "bf16"]) == 0
    assert loaded[-1] == latentkit.Performance(autocast="bf16")
    assert main([*args, "--quantize", "int8"]) == 2  # on the torch backend: refused
    assert "OpenVINO backend" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "1,x"], "--steps and --guidance take comma-separated numbers"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--option", "feature_cache"], "--option takes KEY=VALUE"),
        (["--option", "feature_cache=two"], "--option takes KEY=VALUE"),
        (["--option", "feature_cache=0"], "feature_cache must be an int"),
        (["--option", "cache=2"], "unknown keyword 'cache'"),
    ],
)
def test_eval_errors_are_one_line_on_stderr(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"latentkit-lab: error: {message}") and err.count("\n") == 1
