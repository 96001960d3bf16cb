"""The built-in components are instances of the public protocols (mypy checks the signatures
statically, in latentkit/pipelines/base.py; this checks the runtime view third parties rely on)."""

from __future__ import annotations

from pathlib import Path

import pytest

import latentkit
from latentkit import Autoencoder, Conditioner, Pipeline, Scheduler
from latentkit.registry import Registry


def test_builtins_satisfy_protocols(sd1_path: Path) -> None:
    pipe = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    assert isinstance(pipe, Pipeline)
    assert isinstance(pipe.vae, Autoencoder)
    assert all(isinstance(t, Conditioner) for t in pipe.text)
    for name in latentkit.schedulers.names():
        assert isinstance(latentkit.schedulers.create(name), Scheduler)


def test_registry_accepts_a_third_party_scheduler() -> None:
    from latentkit.schedulers.ddim import DDIM

    @latentkit.schedulers.register("my-ddim")
    class MyDDIM(DDIM):
        name = "my-ddim"

    try:
        assert "my-ddim" in latentkit.schedulers.names()
        made = latentkit.schedulers.create("My_DDIM", eta=0.3)  # names are case/dash-insensitive
        assert isinstance(made, MyDDIM) and made.eta == 0.3
    finally:
        latentkit.schedulers.registry._items.pop("my-ddim")


def test_entry_point_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package declaring a ``latentkit.schedulers`` entry point is found by name,
    without latentkit importing it by hand (the dist-info folder is what pip would write)."""
    (tmp_path / "my_sampler.py").write_text(
        "from latentkit.schedulers.euler import Euler\n\nclass Sharp(Euler):\n    name = 'sharp'\n"
    )
    dist = tmp_path / "my_sampler-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-sampler\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[latentkit.schedulers]\nsharp = my_sampler:Sharp\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    registry: Registry[type[Scheduler]] = Registry("scheduler", "latentkit.schedulers")
    assert registry.names() == ["sharp"]
    assert registry["Sharp"].__name__ == "Sharp"
