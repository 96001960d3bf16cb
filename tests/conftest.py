from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def sd1_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("sd1", models_root)


@pytest.fixture(scope="session")
def sd2_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("sd2", models_root)


@pytest.fixture(scope="session")
def inpaint_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("inpaint", models_root)


@pytest.fixture(scope="session")
def depth_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("depth", models_root)


@pytest.fixture(scope="session")
def upscale_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("upscale", models_root)


@pytest.fixture(scope="session")
def sdxl_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("sdxl", models_root)


@pytest.fixture(scope="session")
def sdxl_refiner_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("sdxl_refiner", models_root)


@pytest.fixture(scope="session")
def sdxl_inpaint_path(models_root: Path) -> Path:
    return tiny_models.save_pipeline("sdxl_inpaint", models_root)


@pytest.fixture(scope="session")
def sd1_controlnet_path(models_root: Path) -> Path:
    return tiny_models.save_controlnet("sd1", models_root)


@pytest.fixture(scope="session")
def sdxl_controlnet_path(models_root: Path) -> Path:
    return tiny_models.save_controlnet("sdxl", models_root)


@pytest.fixture(scope="session")
def taesd_path(models_root: Path) -> Path:
    return tiny_models.save_taesd(models_root)


@pytest.fixture(scope="session")
def sd1_lora_path(models_root: Path) -> Path:
    return tiny_models.save_lora(models_root)
