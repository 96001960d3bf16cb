"""A scheduler from another package, registered only through the entry-point group.

``examples/scheduler_plugin`` is installed offline into a temporary folder (the venv is not
touched); a fresh registry with that folder on ``sys.path`` must list and create it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from latentkit.protocols import Scheduler
from latentkit.registry import Registry

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "scheduler_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: cannot build the example plugin offline")
    target = tmp_path_factory.mktemp("plugin")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(PLUGIN, tmp_path_factory.mktemp("plugin-src") / "src")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    cmd += ["--no-build-isolation", "--target", str(target), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for module in [m for m in sys.modules if m.startswith("latentkit_euler_karras")]:
            del sys.modules[module]


def test_entry_point_registers_the_plugin(installed: Path) -> None:
    registry: Registry[type[Scheduler]] = Registry("scheduler", "latentkit.schedulers")
    assert "euler-karras" in registry.names()
    cls = registry["Euler Karras"]  # names match ignoring case, spaces and dashes
    assert cls.__module__ == "latentkit_euler_karras"
    scheduler = cls()
    assert isinstance(scheduler, Scheduler) and scheduler.name == "euler-karras"
    assert scheduler.to_config()["use_karras_sigmas"] is True
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    *_, last = scheduler.sample(lambda x, t: 0.1 * x, noise, steps=4)
    assert torch.isfinite(last.sample).all() and last.sample.shape == noise.shape
