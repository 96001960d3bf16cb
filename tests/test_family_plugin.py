"""A pipeline family from another package, registered only through the entry-point group.

``examples/family_plugin`` (the ``stable-diffusion-penultimate`` family: SD 1.x models trained
on CLIP's penultimate layer) is installed offline into a temporary folder; the venv is not
touched. A fresh Python process with that folder on its path lists the family, detects it
for a model folder that names its pipeline class, loads and runs it. Its images must equal
the built-in ``stable-diffusion`` family's with ``clip_skip=1`` (the one declaration it
changes) bit for bit, and diffusers' ``StableDiffusionPipeline`` given the penultimate-layer
embeddings within 1e-4 (fp32 images in [0, 1]).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import latentkit
from latentkit.errors import UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "family_plugin"
NAME = "stable-diffusion-penultimate"
CLASS = "StableDiffusionPenultimatePipeline"
TOL = 1e-4
CALL: dict[str, Any] = dict(prompt="a red cat", steps=3, seed=5, output_type="np")

# Runs in a fresh process with the installed plugin first on sys.path: the module-level
# registry there has not read the entry points yet, as in a user's session.
SCRIPT = """
import json, sys
import numpy as np
import latentkit
from latentkit import pipelines
from latentkit.errors import UnsupportedModelError

folder, unknown, out = sys.argv[1:4]
call = json.loads(sys.argv[4])
read = lambda *p: json.loads(open("/".join(p)).read())
family = pipelines.detect(
    read(folder, "model_index.json"), read(folder, "unet", "config.json"), source=folder
)
pipe = latentkit.load_pipeline(folder, device="cpu", progress=False)
default = pipe.generate(**call, progress=False)
last = pipe.generate(**call, clip_skip=0, progress=False)
try:
    latentkit.load_pipeline(unknown, device="cpu", progress=False)
    refusal = None
except UnsupportedModelError as e:
    refusal = str(e)
np.savez(out, default=np.stack(default.images), last=np.stack(last.images))
print(json.dumps({
    "names": pipelines.names(),
    "detected": [family.__module__, family.__qualname__, family.name],
    "family": pipe.family,
    "clip_skip": [default.parameters[0].clip_skip, last.parameters[0].clip_skip],
    "refusal": refusal,
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: cannot build the example plugin offline")
    target = tmp_path_factory.mktemp("family-plugin")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(PLUGIN, tmp_path_factory.mktemp("family-plugin-src") / "src")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    cmd += ["--no-build-isolation", "--target", str(target), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return target


def with_class_name(model: Path, folder: Path, class_name: str) -> Path:
    """A copy of the tiny model ``model`` whose model_index.json names ``class_name``."""
    shutil.copytree(model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return folder


@pytest.fixture(scope="module")
def marked(sd1_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_class_name(sd1_path, tmp_path_factory.mktemp("marked") / "model", CLASS)


@pytest.fixture(scope="module")
def unknown(sd1_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_class_name(sd1_path, tmp_path_factory.mktemp("unknown") / "model", "FluxPipeline")


@pytest.fixture(scope="module")
def plugin_run(
    installed: Path, marked: Path, unknown: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What the fresh process saw (JSON) and the images it made."""
    out = tmp_path_factory.mktemp("plugin-run") / "images.npz"
    path = os.pathsep.join(filter(None, [str(installed), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SCRIPT, str(marked), str(unknown), str(out), json.dumps(CALL)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as images:
        return json.loads(proc.stdout.strip().splitlines()[-1]), dict(images)


def test_entry_point_lists_detects_and_loads_the_family(
    plugin_run: tuple[dict[str, Any], dict[str, np.ndarray]],
) -> None:
    seen, _ = plugin_run
    assert {"stable-diffusion", "stable-diffusion-xl", NAME} <= set(seen["names"])
    assert seen["detected"] == ["latentkit_penultimate", "PenultimateFamily", NAME]
    assert seen["family"] == NAME
    # The declared default is used and recorded in the parameters; clip_skip=0 overrides it.
    assert seen["clip_skip"] == [1, 0]


def test_unknown_class_name_lists_every_family_plugin_included(
    plugin_run: tuple[dict[str, Any], dict[str, np.ndarray]],
) -> None:
    refusal = plugin_run[0]["refusal"]
    assert refusal is not None and "'FluxPipeline'" in refusal
    assert f"{NAME} ({CLASS})" in refusal and "stable-diffusion-xl (StableDiffusionXL" in refusal


def test_images_follow_the_declaration(
    plugin_run: tuple[dict[str, Any], dict[str, np.ndarray]], sd1_path: Path
) -> None:
    """Penultimate by default == the built-in family with clip_skip=1, exactly; clip_skip=0
    == the built-in default; and the two layers do give different images."""
    _, images = plugin_run
    builtin = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
    assert builtin.family == "stable-diffusion"
    penultimate = np.stack(builtin.generate(**CALL, clip_skip=1, progress=False).images)
    last = np.stack(builtin.generate(**CALL, progress=False).images)
    assert np.array_equal(images["default"], penultimate)
    assert np.array_equal(images["last"], last)
    assert np.abs(penultimate - last).max() > 1e-2


def test_default_matches_diffusers_on_penultimate_embeddings(
    plugin_run: tuple[dict[str, Any], dict[str, np.ndarray]], marked: Path
) -> None:
    """diffusers (which loads the marked folder with an explicit pipeline class) given the
    prompt's and the empty negative prompt's penultimate states through the final layer norm.

    diffusers' own ``clip_skip=1`` moves only the prompt (the negative prompt keeps the last
    layer, and its path reads ``text_encoder.text_model``, which transformers 5 removed);
    latentkit, like A1111, moves both, so the embeddings are built here by that definition.
    """
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        str(marked), safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    encoder = ref.text_encoder

    def penultimate(text: str) -> torch.Tensor:
        ids = ref.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            states = encoder(ids, output_hidden_states=True).hidden_states
            return getattr(encoder, "text_model", encoder).final_layer_norm(states[-2])

    expected = ref(
        prompt_embeds=penultimate(CALL["prompt"]),
        negative_prompt_embeds=penultimate(""),
        num_inference_steps=CALL["steps"],
        generator=torch.Generator("cpu").manual_seed(CALL["seed"]),
        output_type="np",
    ).images
    assert np.abs(plugin_run[1]["default"] - expected).max() <= TOL


def test_unknown_class_name_is_a_typed_error_naming_the_families(unknown: Path) -> None:
    with pytest.raises(UnsupportedModelError) as error:
        latentkit.load_pipeline(unknown, device="cpu", progress=False)
    message = str(error.value)
    assert "'FluxPipeline'" in message and "no pipeline family loads it" in message
    for name in ("stable-diffusion (StableDiffusionPipeline", "stable-diffusion-xl ("):
        assert name in message


def test_a_family_registered_by_decorator_is_detected(sd1_path: Path, tmp_path: Path) -> None:
    """The in-process route: ``@register`` sets the name; ``detect`` picks the family."""
    from latentkit import pipelines
    from latentkit.pipelines.sd import StableDiffusionFamily

    class_name = "StableDiffusionTestDecoratorPipeline"

    @pipelines.register("test-decorated-family")
    class Decorated(StableDiffusionFamily):
        pipeline_classes = (class_name,)
        guidance_scale = 1.0  # guidance off unless asked: a declaration the result shows

    try:
        folder = with_class_name(sd1_path, tmp_path / "model", class_name)
        pipe = latentkit.load_pipeline(folder, device="cpu", progress=False)
        assert pipe.family == "test-decorated-family" and pipe.spec is Decorated
        result = pipe.generate(**CALL, progress=False)
        assert result.parameters[0].guidance_scale == 1.0
        builtin = latentkit.load_pipeline(sd1_path, device="cpu", progress=False)
        unguided = builtin.generate(**CALL, guidance_scale=1.0, progress=False)
        assert np.array_equal(np.stack(result.images), np.stack(unguided.images))
    finally:
        del pipelines.registry._items["test-decorated-family"]
