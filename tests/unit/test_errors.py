"""The one kind→status table (``polyray.errors``) and its two readers: the API, which answers
with it, and the SDK, which reads a status back with it. Neither keeps a copy, so these tests
pin the table once (against DESIGN.md's kinds and the README) and then check that what the API
sends is what the SDK understands, for every kind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_client import FakeServer

from polyray.api.errors import polyray_error_response
from polyray.client import PolyrayAPIError
from polyray.errors import (
    KIND_BY_STATUS,
    RETRY_AFTER_KINDS,
    STATUS_BY_KIND,
    BackendError,
    DeadlineExceeded,
    ErrorKind,
    Forbidden,
    InvalidRequest,
    NotFound,
    Overloaded,
    PolyrayError,
    RateLimited,
    TooLarge,
    Unauthenticated,
)

README = Path(__file__).resolve().parents[2] / "README.md"

# DESIGN.md, "Errors: one table" (400 / 422 for invalid_request: the API sends 400 for both).
DESIGN_TABLE = {
    "invalid_request": 400,
    "too_large": 413,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "rate_limited": 429,
    "overloaded": 503,
    "backend_error": 500,
}

ONE_OF_EACH: list[PolyrayError] = [
    InvalidRequest("input: must not be empty", param="input"),
    TooLarge("body over 4194304 bytes"),
    Unauthenticated("no key"),
    Forbidden("not your head", code="not_owner"),
    NotFound("unknown model 'x'", param="model"),
    RateLimited("limit 5 requests/s", code="requests_per_s", retry_after_s=2.2),
    Overloaded("queue full"),
    DeadlineExceeded(),
    BackendError("the model failed"),
]


def test_the_table_is_designs() -> None:
    assert {kind.value: status for kind, status in STATUS_BY_KIND.items()} == DESIGN_TABLE
    assert {kind.value for kind in RETRY_AFTER_KINDS} == {"rate_limited", "overloaded"}


def test_every_kind_has_one_status_and_the_reverse_is_its_inverse() -> None:
    assert set(STATUS_BY_KIND) == set(ErrorKind)
    assert len(set(STATUS_BY_KIND.values())) == len(STATUS_BY_KIND)  # distinct, so a status names one kind
    assert {kind: KIND_BY_STATUS[status] for kind, status in STATUS_BY_KIND.items()} == {k: k for k in ErrorKind}


def test_the_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        STATUS_BY_KIND[ErrorKind.OVERLOADED] = 502  # type: ignore[index]


def test_the_readme_documents_the_same_table() -> None:
    text = README.read_text(encoding="utf-8")
    paragraph = text[text.index("Errors use the OpenAI shape") :].split("\n\n", 1)[0]
    documented = {kind: int(status) for kind, status in re.findall(r"`([a-z_]+)` (\d{3})", paragraph)}
    assert documented == DESIGN_TABLE


def test_the_table_imports_nothing_outside_the_standard_library() -> None:
    """The SDK imports ``polyray.errors`` from a thin install: it must not pull in the server."""
    heavy = ("httpx", "fastapi", "starlette", "pydantic", "sqlalchemy", "numpy", "torch")
    code = f"import sys, polyray.errors; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("error", ONE_OF_EACH, ids=lambda e: type(e).__name__)
def test_the_api_answers_with_the_kinds_status(error: PolyrayError) -> None:
    response = polyray_error_response(error)
    assert response.status_code == STATUS_BY_KIND[error.kind]
    assert ("retry-after" in response.headers) == (error.kind in RETRY_AFTER_KINDS)


@pytest.mark.parametrize("error", ONE_OF_EACH, ids=lambda e: type(e).__name__)
def test_the_sdk_reads_the_apis_answer_back_as_the_same_error(error: PolyrayError) -> None:
    sent = polyray_error_response(error)
    wire = httpx.Response(sent.status_code, headers=dict(sent.headers), content=bytes(sent.body))
    with FakeServer(lambda _: wire).client() as client, pytest.raises(PolyrayAPIError) as caught:
        client.heads()
    got = caught.value
    assert (got.status, got.type, got.code, got.message, got.param) == (
        STATUS_BY_KIND[error.kind],
        error.kind.value,
        error.code or error.kind.value,
        error.message,
        error.param,
    )
    assert (got.retry_after_s is not None) == (error.kind in RETRY_AFTER_KINDS)
    if error.retry_after_s is not None:  # the exact estimate survives, not the whole seconds
        assert got.retry_after_s == pytest.approx(error.retry_after_s, abs=1e-3)


def test_a_refusal_sends_its_estimate_in_ms_as_openais_sdk_reads_it() -> None:
    """Retry-After is whole seconds; an admission estimate of 80 ms also goes out as Retry-After-Ms,
    the header openai-python's retry loop reads first, so a refused burst is retried in 80 ms."""
    openai_client = pytest.importorskip("openai")._base_client
    sent = polyray_error_response(Overloaded("queue full", code="queue_full", retry_after_s=0.08))
    assert (sent.headers["retry-after"], sent.headers["retry-after-ms"]) == ("1", "80")
    source = Path(openai_client.__file__).read_text(encoding="utf-8")
    assert '"retry-after-ms"' in source  # the SDK's retry loop still reads this header


@pytest.mark.parametrize("kind", list(ErrorKind), ids=str)
def test_the_sdk_names_a_bare_status_by_the_table(kind: ErrorKind) -> None:
    """An answer without polyray's body (e.g. from a proxy) is named by its status alone."""
    bare = FakeServer(lambda _: httpx.Response(STATUS_BY_KIND[kind], text="<html>proxy page</html>"))
    with bare.client() as client, pytest.raises(PolyrayAPIError) as caught:
        client.heads()
    assert caught.value.type == kind.value


@pytest.mark.parametrize(("status", "type_"), [(418, "http_error"), (502, "backend_error"), (504, "backend_error")])
def test_a_status_outside_the_table_is_named_by_its_class(status: int, type_: str) -> None:
    with FakeServer(lambda _: httpx.Response(status)).client() as client, pytest.raises(PolyrayAPIError) as caught:
        client.heads()
    assert caught.value.type == type_
