"""The HTTP API end to end: the real FastAPI app and engine over ``DummyBackend``, no real model.

Every request goes through ``httpx.ASGITransport``, which does not run the app's lifespan, so the
fixtures start and stop the engine themselves. ASGITransport re-raises any unhandled exception,
so a bad input that would have been a 500 fails its test loudly instead of passing as "an error".
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import serve_in_thread

from polyray.backends.dummy import DummyBackend
from polyray.config import ModelConfig, ServerConfig, Settings, parse_settings
from polyray.engine.engine import Engine
from polyray.observability.metrics import Metrics
from polyray.policies import AdmissionPolicy, BatchPolicy, FairnessPolicy
from polyray.server import build_server
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")
DAY_MS = 86_400_000.0
ROUTE = "/v1/embeddings"
DIM = 384
MAX_ITEMS = 4
MAX_BODY_BYTES = 4096
MAX_QUEUE_ITEMS = 8
MAX_SEQ_TOKENS = 32  # the dummy model's maximum, [CLS] and [SEP] included
ANY = object()


def make_settings(models: list[dict[str, Any]] | None = None, **server: Any) -> Settings:
    return parse_settings(
        {
            "server": {
                "max_items": MAX_ITEMS,
                "max_body_bytes": MAX_BODY_BYTES,
                "max_queue_items": MAX_QUEUE_ITEMS,
                **server,
            },
            "models": models
            or [{"name": "minilm", "version": "1", "backend": "dummy", "max_seq_tokens": MAX_SEQ_TOKENS}],
        }
    )


@dataclass
class Served:
    client: httpx.AsyncClient
    engine: Engine
    metrics: Metrics

    def backend(self, ref: ModelRef = REF) -> DummyBackend:
        backend = self.engine.runners[ref].backend
        assert isinstance(backend, DummyBackend)
        return backend


@asynccontextmanager
async def serving(
    settings: Settings, *, backends: dict[ModelRef, DummyBackend] | None = None, start: bool = True
) -> AsyncIterator[Served]:
    """The app as ``build_server`` composes it (no client database), driven in process without
    its lifespan: ``start=False`` shows a server whose engine has not started."""
    # The protocol tests compare answers exactly; a repeated text would come from the cache (fp16).
    settings = replace(settings, cache=replace(settings.cache, enabled=False))
    server = build_server(settings, tenancy=False, warmup=False, backends=backends)
    async with AsyncExitStack() as stack:
        if start:
            await stack.enter_async_context(server.running())
        transport = httpx.ASGITransport(app=server.app)
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10.0)
        )
        yield Served(client, server.engine, server.metrics)


@pytest.fixture
async def api() -> AsyncIterator[Served]:
    async with serving(make_settings()) as served:
        yield served


def body(**fields: Any) -> dict[str, Any]:
    return {"input": "hello world", "model": "minilm", **fields}


def expected_vector(backend: DummyBackend, text: str) -> np.ndarray:
    return backend.vector(backend.tokenize([text])[0].ids)


def num_tokens(backend: DummyBackend, texts: list[str]) -> int:
    return sum(len(t.ids) for t in backend.tokenize(texts))


def assert_error(
    response: httpx.Response,
    status: int,
    kind: str,
    *,
    param: object = ANY,
    code: str | None = None,
    contains: tuple[str, ...] = (),
    min_message_chars: int = 10,
) -> dict[str, Any]:
    """The OpenAI error shape, with the kind from DESIGN.md's table and an informative message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error"}, payload
    error: dict[str, Any] = payload["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["type"] == kind, error
    assert isinstance(error["code"], str) and error["code"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not ANY:
        assert error["param"] == param, error
    assert isinstance(error["message"], str) and len(error["message"]) >= min_message_chars, error
    for fragment in contains:
        assert fragment in error["message"], error
    return error


# -- bad input: 4xx with the field named, never a 500 ----------------------------------------

BAD_REQUESTS = [
    pytest.param(b'{"input": "x", "model": ', None, ("not valid JSON",), id="invalid-json"),
    pytest.param(b"", None, ("not valid JSON",), id="empty-body"),
    pytest.param(b"\xff\xfe{}", None, ("not valid JSON",), id="not-utf8"),
    pytest.param(b'[{"input": "x", "model": "minilm"}]', None, ("JSON object",), id="body-is-array"),
    pytest.param(b'"hello"', None, ("JSON object",), id="body-is-string"),
    pytest.param({"model": "minilm"}, "input", ("'input' is required",), id="missing-input"),
    pytest.param(body(input=3), "input", ("string or a list of strings",), id="input-int"),
    pytest.param(body(input={"text": "x"}), "input", ("string or a list of strings",), id="input-dict"),
    pytest.param(body(input=None), "input", ("string or a list of strings",), id="input-null"),
    pytest.param(body(input=[]), "input", ("empty list",), id="empty-list"),
    pytest.param(body(input=""), "input", ("empty",), id="empty-string"),
    pytest.param(body(input=" \t\n "), "input", ("empty",), id="whitespace-string"),
    pytest.param(body(input=["ok", "  "]), "input[1]", ("input[1]", "empty"), id="whitespace-item"),
    pytest.param(body(input="\u200b\u200c\ufeff"), "input", ("no text",), id="zero-width-only"),
    pytest.param(body(input=["ok", "\u0000\u0000"]), "input[1]", ("input[1]", "no text"), id="nul-only-item"),
    pytest.param(body(input=["ok", 5]), "input[1]", ("input[1]",), id="int-item"),
    pytest.param(body(input=["ok", 1.5]), "input[1]", ("input[1]", "string", "float"), id="float-item"),
    pytest.param(body(input=["ok", None]), "input[1]", ("input[1]", "string"), id="null-item"),
    pytest.param(body(input=[[1, 2]]), "input[0]", ("token-id",), id="token-id-arrays"),
    pytest.param(body(input=[1, 2]), "input[0]", ("token-id",), id="token-ids"),
    pytest.param(body(extra_field=1), "extra_field", ("extra_field",), id="unknown-field"),
    pytest.param({"input": "x"}, "model", ("model",), id="missing-model"),
    pytest.param(body(model=1), "model", ("model",), id="model-int"),
    pytest.param(body(model=["minilm"]), "model", ("model",), id="model-list"),
    pytest.param(body(encoding_format="hex"), "encoding_format", ("encoding_format", "base64"), id="bad-format"),
    pytest.param(body(encoding_format=1), "encoding_format", ("encoding_format",), id="format-int"),
    pytest.param(body(dimensions=128), "dimensions", ("dimensions=128", str(DIM)), id="dimensions-mismatch"),
    pytest.param(body(dimensions="384"), "dimensions", ("dimensions",), id="dimensions-str"),
    pytest.param(body(dimensions=True), "dimensions", ("dimensions",), id="dimensions-bool"),
    pytest.param(body(user=7), "user", ("user",), id="user-int"),
]


@pytest.mark.parametrize(("payload", "param", "contains"), BAD_REQUESTS)
async def test_bad_request_is_400_naming_the_field(
    api: Served, payload: bytes | dict[str, Any], param: str | None, contains: tuple[str, ...]
) -> None:
    content = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    response = await api.client.post(ROUTE, content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request", param=param, contains=contains)


async def test_too_many_items(api: Served) -> None:
    response = await api.client.post(ROUTE, json=body(input=["x"] * (MAX_ITEMS + 1)))
    assert_error(
        response,
        400,
        "invalid_request",
        param="input",
        code="too_many_items",
        contains=(f"{MAX_ITEMS + 1} items", f"maximum is {MAX_ITEMS}"),
    )


async def test_exactly_max_items_accepted(api: Served) -> None:
    response = await api.client.post(ROUTE, json=body(input=[f"text {i}" for i in range(MAX_ITEMS)]))
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == MAX_ITEMS


@pytest.mark.parametrize(
    ("model", "contains"),
    [
        pytest.param("gpt-4", ("'gpt-4'", "minilm"), id="unknown-name"),
        pytest.param("minilm@9", ("'9'", "minilm@1"), id="unknown-version"),
        pytest.param("minilm@", ("version",), id="empty-version"),
        pytest.param("", ("not served",), id="empty-name"),
    ],
)
async def test_unknown_model_is_404(api: Served, model: str, contains: tuple[str, ...]) -> None:
    response = await api.client.post(ROUTE, json=body(model=model))
    assert_error(response, 404, "not_found", param="model", code="model_not_found", contains=contains)


async def test_odd_values_never_500(api: Served) -> None:
    """A cross product of odd field values: every answer is 200 or a shaped 4xx."""
    odd: list[Any] = [None, True, 0, -1, 1.5, "", " ", "x", [], [None], [""], {}, {"a": 1}, ["x", ["y"]], "\u200b"]
    for field in ("input", "model", "encoding_format", "dimensions", "user"):
        for value in odd:
            response = await api.client.post(ROUTE, json=body(**{field: value}))
            assert response.status_code in (200, 400, 404), (field, value, response.text)
            if response.status_code != 200:
                assert_error(
                    response, response.status_code, "invalid_request" if response.status_code == 400 else "not_found"
                )


# -- body size -----------------------------------------------------------------------------


def oversized_body() -> bytes:
    content = orjson.dumps(body(input="word " * (MAX_BODY_BYTES // 5 + 10)))
    assert len(content) > MAX_BODY_BYTES
    return content


async def test_body_over_limit_with_content_length_is_413(api: Served) -> None:
    content = oversized_body()
    response = await api.client.post(ROUTE, content=content)
    assert response.request.headers["content-length"] == str(len(content))
    assert_error(response, 413, "too_large", param=None, code="body_too_large", contains=(str(MAX_BODY_BYTES),))


async def test_body_over_limit_streamed_without_content_length_is_413(api: Served) -> None:
    content = oversized_body()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(content), 512):
            yield content[start : start + 512]

    response = await api.client.post(ROUTE, content=chunks())
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "too_large", param=None, code="body_too_large", contains=(str(MAX_BODY_BYTES),))


async def test_streamed_body_within_limit_is_accepted(api: Served) -> None:
    content = orjson.dumps(body(input=["streamed text", "in chunks"]))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(content), 7):
            yield content[start : start + 7]

    response = await api.client.post(ROUTE, content=chunks())
    assert response.status_code == 200, response.text
    backend = api.backend()
    rows = [np.asarray(d["embedding"], dtype=np.float32) for d in response.json()["data"]]
    np.testing.assert_array_equal(rows[0], expected_vector(backend, "streamed text"))
    np.testing.assert_array_equal(rows[1], expected_vector(backend, "in chunks"))


async def test_body_exactly_at_limit_is_accepted(api: Served) -> None:
    empty = len(orjson.dumps(body(input="")))
    content = orjson.dumps(body(input="a" * (MAX_BODY_BYTES - empty)))
    assert len(content) == MAX_BODY_BYTES
    response = await api.client.post(ROUTE, content=content)
    assert response.status_code == 200, response.text


# -- truncation ----------------------------------------------------------------------------

LONG_WORDS = [f"w{i}" for i in range(MAX_SEQ_TOKENS + 8)]
LONG_TEXT = " ".join(LONG_WORDS)


async def test_over_long_text_is_truncated_and_reported(api: Served) -> None:
    response = await api.client.post(ROUTE, json=body(input=["short text", LONG_TEXT]))
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["truncated_inputs"] == [1]
    assert response.headers["X-Polyray-Truncated-Inputs"] == "1"
    backend = api.backend()
    # Truncation keeps the prefix that fits: the vector is that of the first words alone.
    prefix = " ".join(LONG_WORDS[: MAX_SEQ_TOKENS - 2])
    np.testing.assert_array_equal(
        np.asarray(payload["data"][1]["embedding"], dtype=np.float32), expected_vector(backend, prefix)
    )
    assert payload["usage"]["prompt_tokens"] == num_tokens(backend, ["short text"]) + MAX_SEQ_TOKENS


async def test_text_within_limit_reports_no_truncation(api: Served) -> None:
    response = await api.client.post(ROUTE, json=body(input=" ".join(LONG_WORDS[: MAX_SEQ_TOKENS - 2])))
    assert response.status_code == 200, response.text
    assert "truncated_inputs" not in response.json()
    assert "X-Polyray-Truncated-Inputs" not in response.headers


async def test_over_long_text_rejected_when_truncation_is_off() -> None:
    async with serving(make_settings(truncate=False)) as served:
        response = await served.client.post(ROUTE, json=body(input=["short text", LONG_TEXT]))
        assert_error(
            response,
            400,
            "invalid_request",
            param="input[1]",
            code="context_length_exceeded",
            contains=("input[1]", str(MAX_SEQ_TOKENS)),
        )
        ok = await served.client.post(ROUTE, json=body(input="short text"))
        assert ok.status_code == 200, ok.text


# -- overload --------------------------------------------------------------------------------


async def test_queue_full_is_503_with_retry_after() -> None:
    """A busy worker and a 4-text queue: the excess is refused at once, the admitted all finish."""
    server = ServerConfig(max_items=2, max_body_bytes=MAX_BODY_BYTES, max_queue_items=4)
    backend = DummyBackend(seconds_per_token=0.005)  # a batch of two 10-token texts: 0.1 s
    # Every caller here is the one anonymous client: no per-client queue cap, so the whole queue
    # is its; time admission off (a day's bound): the count bound is what this test is about.
    settings = Settings(
        server=server,
        batching=BatchPolicy(max_batch_size=2, max_wait_ms=0.0),
        models=(ModelConfig(backend="dummy"),),
        fairness=FairnessPolicy(max_client_queue_fraction=1.0),
        admission=AdmissionPolicy(interactive_max_queue_ms=DAY_MS, batch_max_queue_ms=DAY_MS),
    )
    texts = [[f"request {i} text {j} one two three four" for j in range(2)] for i in range(12)]
    async with serving(settings, backends={REF: backend}) as served:
        started = time.monotonic()
        responses = await asyncio.gather(*(served.client.post(ROUTE, json=body(input=t)) for t in texts))
        elapsed_s = time.monotonic() - started
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses, statuses
        assert elapsed_s < 5.0
        for response, request_texts in zip(responses, texts, strict=True):
            if response.status_code == 503:
                assert_error(response, 503, "overloaded", code="queue_full", contains=("queue is full",))
                assert int(response.headers["Retry-After"]) >= 1
            else:
                rows = [np.asarray(d["embedding"], dtype=np.float32) for d in response.json()["data"]]
                for row, text in zip(rows, request_texts, strict=True):
                    np.testing.assert_array_equal(row, expected_vector(backend, text))
        # Once the queue drains the service answers again.
        after = await served.client.post(ROUTE, json=body(input="after the burst"))
        assert after.status_code == 200, after.text
        outcomes = requests_by_outcome((await served.client.get("/metrics")).text)
        assert outcomes["overloaded"] == statuses.count(503)
        assert outcomes["ok"] == statuses.count(200) + 1


# -- successful responses --------------------------------------------------------------------


async def test_list_input_rows_in_order_with_usage_and_timing(api: Served) -> None:
    texts = ["the first text", "a second, different one!", "third", "and the fourth text here"]
    response = await api.client.post(ROUTE, json=body(input=texts))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert payload["object"] == "list"
    assert payload["model"] == "minilm@1"
    assert [d["index"] for d in payload["data"]] == list(range(len(texts)))
    assert all(d["object"] == "embedding" for d in payload["data"])
    backend = api.backend()
    for row, text in zip(payload["data"], texts, strict=True):
        vector = np.asarray(row["embedding"], dtype=np.float32)
        assert vector.shape == (DIM,)
        np.testing.assert_array_equal(vector, expected_vector(backend, text))
    tokens = num_tokens(backend, texts)
    assert payload["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert "truncated_inputs" not in payload
    assert float(response.headers["X-Polyray-Queue-Ms"]) >= 0.0
    assert float(response.headers["X-Polyray-Inference-Ms"]) >= 0.0
    assert re.fullmatch(r"queue;dur=\d+\.\d+, inference;dur=\d+\.\d+", response.headers["Server-Timing"])


async def test_single_string_input(api: Served) -> None:
    response = await api.client.post(ROUTE, json=body(input="just one"))
    assert response.status_code == 200, response.text
    payload = response.json()
    assert len(payload["data"]) == 1
    assert payload["data"][0]["index"] == 0
    backend = api.backend()
    np.testing.assert_array_equal(
        np.asarray(payload["data"][0]["embedding"], dtype=np.float32), expected_vector(backend, "just one")
    )
    assert payload["usage"]["prompt_tokens"] == payload["usage"]["total_tokens"] == num_tokens(backend, ["just one"])


async def test_base64_decodes_to_the_float_vectors(api: Served) -> None:
    texts = ["encode me", "and me too"]
    as_float = await api.client.post(ROUTE, json=body(input=texts, encoding_format="float"))
    as_base64 = await api.client.post(ROUTE, json=body(input=texts, encoding_format="base64"))
    assert as_float.status_code == as_base64.status_code == 200
    for f_row, b_row in zip(as_float.json()["data"], as_base64.json()["data"], strict=True):
        assert isinstance(b_row["embedding"], str)
        raw = base64.b64decode(b_row["embedding"])
        assert len(raw) == DIM * 4
        decoded = np.frombuffer(raw, dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(f_row["embedding"], dtype=np.float32))
    assert as_base64.json()["usage"] == as_float.json()["usage"]


async def test_dimensions_equal_to_the_model_is_accepted(api: Served) -> None:
    response = await api.client.post(ROUTE, json=body(dimensions=DIM, user="alice"))
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == DIM


async def test_explicit_version_and_name_resolve_to_the_same_model(api: Served) -> None:
    by_name = await api.client.post(ROUTE, json=body(model="minilm"))
    by_version = await api.client.post(ROUTE, json=body(model="minilm@1"))
    assert by_name.json()["model"] == by_version.json()["model"] == "minilm@1"
    assert by_name.json()["data"] == by_version.json()["data"]


# -- models, health, readiness ---------------------------------------------------------------


async def test_models_list(api: Served) -> None:
    response = await api.client.get("/v1/models")
    assert response.status_code == 200
    payload = response.json()
    assert payload["object"] == "list"
    [model] = payload["data"]
    assert model["id"] == "minilm@1"
    assert model["object"] == "model"
    assert model["owned_by"] == "polyray"
    assert isinstance(model["created"], int)
    assert model["dimensions"] == DIM
    assert model["aliases"] == ["minilm"]
    assert model["max_input_tokens"] == MAX_SEQ_TOKENS
    assert model["ready"] is True


async def test_two_versions_bare_name_is_the_newest() -> None:
    """Only the newest version carries the bare-name alias; ``dimensions`` is checked per version."""
    models = [
        {"name": "minilm", "version": "1", "backend": "dummy", "dim": 8},
        {"name": "minilm", "version": "2", "backend": "dummy", "dim": 16},
    ]
    async with serving(make_settings(models)) as served:
        listed = (await served.client.get("/v1/models")).json()["data"]
        by_id = {m["id"]: m for m in listed}
        assert set(by_id) == {"minilm@1", "minilm@2"}
        assert by_id["minilm@2"]["aliases"] == ["minilm"]
        assert by_id["minilm@1"]["aliases"] == []
        assert (by_id["minilm@1"]["dimensions"], by_id["minilm@2"]["dimensions"]) == (8, 16)

        newest = await served.client.post(ROUTE, json=body(model="minilm"))
        assert newest.json()["model"] == "minilm@2"
        assert len(newest.json()["data"][0]["embedding"]) == 16
        older = await served.client.post(ROUTE, json=body(model="minilm@1", dimensions=8))
        assert older.json()["model"] == "minilm@1"
        assert len(older.json()["data"][0]["embedding"]) == 8
        # dimensions is checked against the version asked for, not another one.
        mismatch = await served.client.post(ROUTE, json=body(model="minilm@1", dimensions=16))
        assert_error(mismatch, 400, "invalid_request", param="dimensions", contains=("8",))
        missing = await served.client.post(ROUTE, json=body(model="minilm@9"))
        assert_error(missing, 404, "not_found", param="model", contains=("minilm@1", "minilm@2"))


async def test_versions_sort_numerically_when_resolving() -> None:
    models = [
        {"name": "minilm", "version": "2", "backend": "dummy", "dim": 8},
        {"name": "minilm", "version": "10", "backend": "dummy", "dim": 16},
    ]
    async with serving(make_settings(models)) as served:
        newest = await served.client.post(ROUTE, json=body(model="minilm"))
        assert newest.json()["model"] == "minilm@10"
        assert len(newest.json()["data"][0]["embedding"]) == 16


async def test_models_alias_matches_what_the_bare_name_resolves_to() -> None:
    models = [
        {"name": "minilm", "version": "2", "backend": "dummy", "dim": 8},
        {"name": "minilm", "version": "10", "backend": "dummy", "dim": 16},
    ]
    async with serving(make_settings(models)) as served:
        resolved = (await served.client.post(ROUTE, json=body(model="minilm"))).json()["model"]
        listed = (await served.client.get("/v1/models")).json()["data"]
        owners = [m["id"] for m in listed if "minilm" in m["aliases"]]
        assert owners == [resolved]


async def test_healthz_and_readyz_when_started(api: Served) -> None:
    health = await api.client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {"minilm@1": True}}


async def test_not_started_is_not_ready() -> None:
    async with serving(make_settings(), start=False) as served:
        ready = await served.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not_ready", "models": {"minilm@1": False}}
        assert (await served.client.get("/healthz")).status_code == 200
        response = await served.client.post(ROUTE, json=body())
        assert_error(response, 503, "overloaded", code="not_ready", contains=("minilm@1",))
        assert int(response.headers["Retry-After"]) >= 1


# -- metrics ---------------------------------------------------------------------------------


def requests_by_outcome(text: str) -> dict[str, float]:
    outcomes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "polyray_requests_total" and sample.labels["route"] == ROUTE:
                outcomes[sample.labels["outcome"]] = sample.value
    return outcomes


def samples(text: str, name: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


async def test_metrics_count_outcomes_and_batches(api: Served) -> None:
    texts = ["one text", "two texts here"]
    assert (await api.client.post(ROUTE, json=body(input=texts))).status_code == 200
    assert (await api.client.post(ROUTE, json=body(input="again"))).status_code == 200
    assert (await api.client.post(ROUTE, json=body(input=""))).status_code == 400
    assert (await api.client.post(ROUTE, json=body(model="nope"))).status_code == 404
    assert (await api.client.post(ROUTE, content=oversized_body())).status_code == 413

    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert requests_by_outcome(text) == {"ok": 2.0, "invalid_request": 1.0, "not_found": 1.0, "too_large": 1.0}

    model = {"model": "minilm@1"}
    batch_count = [s for s in samples(text, "polyray_batch_size_count") if s.labels == model]
    assert batch_count and batch_count[0].value >= 1
    batch_sum = [s for s in samples(text, "polyray_batch_size_sum") if s.labels == model]
    assert batch_sum[0].value == 3  # every text computed once
    assert [s.value for s in samples(text, "polyray_queue_depth") if s.labels == model] == [0.0]
    padding = [s for s in samples(text, "polyray_batch_padding_fraction_count") if s.labels == model]
    assert padding and padding[0].value == batch_count[0].value
    tokens = [s.value for s in samples(text, "polyray_tokens_total") if s.labels == model]
    assert tokens == [float(num_tokens(api.backend(), [*texts, "again"]))]


# -- routing errors --------------------------------------------------------------------------


async def test_unknown_route_is_404_openai_shaped(api: Served) -> None:
    response = await api.client.get("/v1/nothing-here")
    assert_error(response, 404, "not_found", param=None, contains=("Not Found",), min_message_chars=1)


async def test_get_on_embeddings_is_405_openai_shaped(api: Served) -> None:
    response = await api.client.get(ROUTE)
    assert_error(response, 405, "invalid_request", param=None, contains=("Method Not Allowed",))


async def test_405_names_the_allowed_method(api: Served) -> None:
    response = await api.client.get(ROUTE)
    assert response.status_code == 405
    assert response.headers.get("Allow") == "POST"


async def test_405_allow_lists_every_method_of_the_url(api: Served) -> None:
    """Starlette names only the first route's methods; the answer must list all of them."""
    response = await api.client.put("/v1/heads")  # two routes: GET (list) and POST (create)
    assert_error(response, 405, "invalid_request", param=None)
    assert response.headers["Allow"] == "GET, POST"
    response = await api.client.put("/v1/heads/owner/name/share")  # GET/DELETE a head "owner/name/share", POST share
    assert response.headers["Allow"] == "DELETE, GET, POST"


@pytest.mark.parametrize(
    ("query", "param", "contains"),
    [
        pytest.param("?limit=3", "limit", ("unknown query parameter 'limit'", "takes none"), id="unknown"),
        pytest.param("?x=1&x=2", "x", ("unknown",), id="unknown-repeated"),
    ],
)
async def test_unknown_query_parameter_is_400(api: Served, query: str, param: str, contains: tuple[str, ...]) -> None:
    assert_error(await api.client.get(f"/v1/models{query}"), 400, "invalid_request", param=param, contains=contains)
    # The same on a POST route: the body is fine, the query string is not.
    assert_error(await api.client.post(f"{ROUTE}{query}", json=body()), 400, "invalid_request", param=param)


# -- a caller that hangs up mid-body -------------------------------------------------------------


async def test_hang_up_mid_body_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """Over real TCP: the body is announced as 1,000 bytes, 100 are sent, the socket closes. No
    traceback and no ERROR is logged, the server counts it, and the next request is served."""
    built = build_server(
        replace(make_settings(), cache=replace(make_settings().cache, enabled=False)), tenancy=False, warmup=False
    )
    metrics = built.metrics
    caplog.set_level(logging.DEBUG)
    with serve_in_thread(built) as base_url:
        host, port = base_url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {ROUTE} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
            + b'{"model": "minilm", "input": "'
            + b"x" * 70
        )
        await writer.drain()
        # No pause needed (nor a sleep that hopes for one): the head and the first 100 bytes come
        # before the FIN in the byte stream, so the server always sees a started body, then EOF.
        writer.close()
        await writer.wait_closed()
        deadline = time.monotonic() + 10
        while requests_by_outcome(metrics.render().decode()).get("disconnected") != 1.0:
            assert time.monotonic() < deadline, metrics.render().decode()
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            assert (await http.post(ROUTE, json=body())).status_code == 200
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [r for r in caplog.records if r.exc_info] == []
    assert any("mid-body" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
