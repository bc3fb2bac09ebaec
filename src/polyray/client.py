"""``polyray.Client``: a small synchronous Python client for a polyray server's HTTP API.

It covers what the OpenAI SDK cannot: task heads (train, list, share, retrain, delete) and
``/v1/infer`` (embeddings and head outputs in one call), plus plain embeddings so a script needs
one client only. It is deliberately thin: one ``httpx.Client`` (keep-alive), JSON in and out, and
every non-2xx answer raised as ``PolyrayAPIError`` carrying the server's OpenAI-shaped error
fields, so callers branch on ``type``/``code`` exactly as the server documents them.

Decisions worth knowing:

* The client does not import the server (``polyray.heads``, ``polyray.api``): it must work from
  a thin install talking to a remote server, and stay tolerant of a newer server (a head kind or
  status it does not know is kept as a plain string, never an enum error). It does import
  ``polyray.errors`` (standard library only) for the one kind→status table the server answers by.
* ``{head}`` in a path is an id, a name, or ``owner/name``; it is URL-quoted with the slash kept,
  because the server's route takes ``owner/name`` as a path with a slash.
* Waiting for training polls ``GET /v1/heads/{id}`` by *id*, not by name: a retrain creates a
  second head of the same name, and the name would resolve to whichever version is newest.
* Embeddings travel as base64 float32 (OpenAI's ``encoding_format``): exact, and about four
  times less JSON to parse than decimal floats.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from polyray import __version__
from polyray.errors import KIND_BY_STATUS, RETRY_AFTER_KINDS, STATUS_BY_KIND

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "POLYRAY_API_KEY"
TERMINAL_STATUSES = frozenset({"ready", "failed"})
# While waiting for training, a quota (429) or a busy server (503) is a reason to poll later, not
# to abandon a job that is running fine on the server.
_RETRY_WHILE_WAITING = frozenset(STATUS_BY_KIND[kind] for kind in RETRY_AFTER_KINDS)

Examples = Sequence[Mapping[str, Any]] | str | os.PathLike[str]
ProgressCallback = Callable[["Head"], None]


# -- errors ------------------------------------------------------------------------------------


class PolyrayClientError(Exception):
    """Base of the client's errors. ``type`` and ``message`` are always set, for one-line reports."""

    type: str = "client_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PolyrayAPIError(PolyrayClientError):
    """The server answered with a non-2xx status.

    ``type``, ``code``, ``message`` and ``param`` are the server's ``{"error": {...}}`` fields (for
    an answer not in that shape, e.g. from a proxy, ``type`` is derived from the status and
    ``message`` is the start of the body). ``retry_after_s`` is the ``Retry-After`` header, set on
    429 and 503 answers: how long to wait before trying again.
    """

    def __init__(
        self,
        status: int,
        type: str,
        code: str | None,
        message: str,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        where = f" (param {self.param})" if self.param else ""
        code = f" [{self.code}]" if self.code and self.code != self.type else ""
        return f"HTTP {self.status} {self.type}{code}: {self.message}{where}"


class PolyrayConnectionError(PolyrayClientError):
    """The server could not be reached, or did not answer within the client's timeout."""

    type = "connection_error"


class HeadTrainingFailed(PolyrayClientError):
    """A head being waited for ended ``failed``; ``head.error`` says why."""

    type = "training_failed"

    def __init__(self, head: Head) -> None:
        super().__init__(f"head {head.ref} ({head.id}) failed to train: {head.error or 'no reason given'}")
        self.head = head


class HeadWaitTimeout(PolyrayClientError, TimeoutError):
    """A head was still pending or training when the wait's ``timeout_s`` ran out (it keeps training)."""

    type = "timeout"

    def __init__(self, head: Head, timeout_s: float) -> None:
        super().__init__(
            f"head {head.ref} ({head.id}) is still {head.status} ({head.progress:.0%}) after {timeout_s:g} s"
        )
        self.head = head


# -- results -----------------------------------------------------------------------------------


def _parse_time(value: object) -> datetime | None:
    """ISO 8601 from the server; Python 3.11 parses ``Z`` and offsets, so no dependency is needed."""
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value)


@dataclass(frozen=True)
class Head:
    """A head as the server describes it (the head view of ``/v1/heads``).

    ``kind`` and ``status`` are plain strings (``classifier`` ..., ``pending`` / ``training`` /
    ``ready`` / ``failed``) so a client older than its server still parses new values.
    ``metrics`` are the validation figures training wrote (``accuracy``, ``macro_f1``,
    ``baseline_accuracy``; ``r2``, ``mae``; ``explained_variance``); empty until ready.
    """

    id: str
    name: str
    owner: str
    ref: str
    kind: str
    model: str
    status: str
    progress: float = 0.0
    error: str | None = None
    labels: tuple[str, ...] = ()
    dim_in: int = 0
    dim_out: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)  # dicts: left out of hash()
    num_examples: int = 0
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    shared_with: tuple[str, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Head:
        """Parse a head view; fields the server adds later are ignored."""
        owner, name = str(data["owner"]), str(data["name"])
        return cls(
            id=str(data["id"]),
            name=name,
            owner=owner,
            ref=str(data.get("ref") or f"{owner}/{name}"),
            kind=str(data["kind"]),
            model=str(data["model"]),
            status=str(data["status"]),
            progress=float(data.get("progress") or 0.0),
            error=None if data.get("error") is None else str(data["error"]),
            labels=tuple(str(label) for label in data.get("labels") or ()),
            dim_in=int(data.get("dim_in") or 0),
            dim_out=int(data.get("dim_out") or 0),
            metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items() if v is not None},
            num_examples=int(data.get("num_examples") or 0),
            options=dict(data.get("options") or {}),
            shared_with=tuple(str(c) for c in data.get("shared_with") or ()),
            created_at=_parse_time(data.get("created_at")),
            updated_at=_parse_time(data.get("updated_at")),
        )

    @property
    def done(self) -> bool:
        """Training is over, one way or the other (``ready`` or ``failed``)."""
        return self.status in TERMINAL_STATUSES

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, in the server's field names (times as ISO 8601)."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "ref": self.ref,
            "kind": self.kind,
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "error": self.error,
            "labels": list(self.labels),
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
            "metrics": dict(self.metrics),
            "num_examples": self.num_examples,
            "options": dict(self.options),
            "shared_with": list(self.shared_with),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


@dataclass(frozen=True)
class InferResult:
    """The answer of ``/v1/infer``.

    ``outputs[i]`` maps each head, as named in the request, to its output for input ``i``
    (classifier ``{"label", "scores"}``, multilabel ``{"labels", "scores"}``, regressor
    ``{"value"}``, projection ``{"embedding"}``). ``embeddings`` is ``(n, dim)`` float32 when
    asked for. The ``*_ms`` figures come from the server's headers (None if it sent none):
    ``compute_ms`` is what the request was charged (its share of the forward pass plus the
    heads), ``heads_ms`` the time spent applying heads, ``inference_ms`` the forward pass.
    """

    model: str
    outputs: list[dict[str, dict[str, Any]]]
    embeddings: np.ndarray | None = None
    compute_ms: float | None = None
    heads_ms: float | None = None
    inference_ms: float | None = None
    prompt_tokens: int = 0


# -- the client --------------------------------------------------------------------------------


def _texts(texts: str | Sequence[str]) -> list[str]:
    """A lone string is one text (never its characters)."""
    return [texts] if isinstance(texts, str) else list(texts)


def _names(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _header_ms(response: httpx.Response, name: str) -> float | None:
    value = response.headers.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _decode_vector(value: object) -> np.ndarray:
    """A base64 little-endian float32 vector, or (from a server ignoring the format) a JSON list."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def _stack(vectors: list[np.ndarray]) -> np.ndarray:
    return np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


def read_examples(path: str | os.PathLike[str]) -> tuple[str, object]:
    """(request field, value) for an examples file: ``.jsonl`` or ``.json`` (a list of objects).

    A ``.jsonl`` file is sent as its text (``examples_jsonl``) so the server's errors name the
    file's own line numbers; a ``.json`` file is parsed here and sent as ``examples``.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    text = file.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return "examples_jsonl", text
    if suffix == ".json":
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(
                f"{file}: expected a JSON list of {{'text', 'label'}} objects, got {type(records).__name__}"
            )
        return "examples", records
    raise ValueError(f"{file}: examples must be a .json (a list) or .jsonl file, not {suffix or 'no suffix'!r}")


class Client:
    """A synchronous client for one polyray server; use it as a context manager or ``close()`` it.

    ``api_key`` defaults to ``$POLYRAY_API_KEY``; with neither, requests carry no key (what a
    loopback server with ``[tenancy] auth = "none"`` expects). ``timeout_s`` bounds each HTTP
    request, not a training wait (``train_head``'s own ``timeout_s``). ``transport`` replaces
    the network (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        headers = {"User-Agent": f"polyray-client/{__version__}"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- embeddings and inference --------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], model: str = "minilm") -> np.ndarray:
        """Embeddings of ``texts`` as a float32 ``(n, dim)`` array (a lone string gives one row)."""
        response = self._request(
            "POST", "/v1/embeddings", json={"model": model, "input": _texts(texts), "encoding_format": "base64"}
        )
        data = sorted(response.json()["data"], key=lambda item: int(item["index"]))
        return _stack([_decode_vector(item["embedding"]) for item in data])

    def infer(
        self,
        texts: str | Sequence[str],
        heads: str | Sequence[str],
        model: str = "minilm",
        return_embedding: bool = False,
    ) -> InferResult:
        """Apply ``heads`` (ids, own names or ``owner/name``) to the embeddings of ``texts``.

        With no heads it is an embedding request through the infer path (set ``return_embedding``).
        """
        body = {"model": model, "input": _texts(texts), "heads": _names(heads), "return_embedding": return_embedding}
        response = self._request("POST", "/v1/infer", json=body)
        payload = response.json()
        data = sorted(payload["data"], key=lambda item: int(item["index"]))
        embeddings = _stack([_decode_vector(item["embedding"]) for item in data]) if return_embedding else None
        return InferResult(
            model=str(payload["model"]),
            outputs=[dict(item.get("heads") or {}) for item in data],
            embeddings=embeddings,
            compute_ms=_header_ms(response, "X-Polyray-Compute-Ms"),
            heads_ms=_header_ms(response, "X-Polyray-Heads-Ms"),
            inference_ms=_header_ms(response, "X-Polyray-Inference-Ms"),
            prompt_tokens=int((payload.get("usage") or {}).get("prompt_tokens") or 0),
        )

    # -- heads ---------------------------------------------------------------------------------

    def train_head(
        self,
        name: str,
        kind: str,
        examples: Examples,
        model: str = "minilm",
        options: Mapping[str, Any] | None = None,
        wait: bool = True,
        on_progress: ProgressCallback | None = None,
        poll_interval_s: float = 0.5,
        timeout_s: float = 900.0,
    ) -> Head:
        """Upload examples and start training a head; with ``wait``, return it once ready.

        ``examples``: a list of ``{"text", "label"}`` dicts, or the path of a ``.json`` (a list)
        or ``.jsonl`` file. ``options``: ``validation_fraction``, ``dimensions`` (projection),
        ``threshold`` (multilabel), ``seed``, ``regularization``. Raises ``HeadTrainingFailed``
        if training fails and ``HeadWaitTimeout`` after ``timeout_s`` (training goes on).
        """
        body: dict[str, Any] = {"name": name, "kind": kind, "model": model}
        if isinstance(examples, str | os.PathLike):
            field_name, value = read_examples(examples)
            body[field_name] = value
        else:
            body["examples"] = [dict(example) for example in examples]
        if options:
            body["options"] = dict(options)
        head = Head.from_json(self._request("POST", "/v1/heads", json=body).json())
        if not wait:
            return head
        return self.wait_for_head(head, on_progress=on_progress, poll_interval_s=poll_interval_s, timeout_s=timeout_s)

    def wait_for_head(
        self,
        head: Head | str,
        on_progress: ProgressCallback | None = None,
        poll_interval_s: float = 0.5,
        timeout_s: float = 900.0,
    ) -> Head:
        """Poll until ``head`` is ready (returned) or failed (``HeadTrainingFailed``).

        ``on_progress`` is called with every view fetched, the first one included. 429 and 503
        answers while polling are waited out (their ``Retry-After``), not raised.
        """
        current = head if isinstance(head, Head) else self.head(head)
        deadline = time.monotonic() + timeout_s
        while True:
            if on_progress is not None:
                on_progress(current)
            if current.status == "failed":
                raise HeadTrainingFailed(current)
            if current.done:
                return current
            if time.monotonic() >= deadline:
                raise HeadWaitTimeout(current, timeout_s)
            pause_s = poll_interval_s
            while True:
                time.sleep(max(0.0, min(pause_s, deadline - time.monotonic())))
                try:
                    current = self.head(current.id)
                    break
                except PolyrayAPIError as exc:
                    if exc.status not in _RETRY_WHILE_WAITING or time.monotonic() >= deadline:
                        raise
                    pause_s = max(poll_interval_s, exc.retry_after_s or 0.0)

    def head(self, ref: Head | str, model: str | None = None) -> Head:
        """One head by id, own name or ``owner/name``; ``model`` picks among versions (default newest)."""
        return Head.from_json(self._request("GET", self._head_path(ref), params=_model_param(model)).json())

    def heads(self, model: str | None = None) -> list[Head]:
        """The caller's heads and those shared with it, optionally only those bound to ``model``."""
        payload = self._request("GET", "/v1/heads", params=_model_param(model)).json()
        return [Head.from_json(item) for item in payload["data"]]

    def retrain_head(
        self,
        ref: Head | str,
        model: str,
        wait: bool = True,
        on_progress: ProgressCallback | None = None,
        poll_interval_s: float = 0.5,
        timeout_s: float = 900.0,
        source_model: str | None = None,
    ) -> Head:
        """Train a new head of the same name for ``model`` from the stored examples (the old one stays).

        ``source_model`` picks which version of a name to take the examples from (default: newest).
        """
        response = self._request(
            "POST", self._head_path(ref, "/retrain"), params=_model_param(source_model), json={"model": model}
        )
        head = Head.from_json(response.json())
        if not wait:
            return head
        return self.wait_for_head(head, on_progress=on_progress, poll_interval_s=poll_interval_s, timeout_s=timeout_s)

    def share_head(self, ref: Head | str, clients: str | Iterable[str]) -> Head:
        """Let ``clients`` (client names) apply the head; returns the updated head."""
        response = self._request("POST", self._head_path(ref, "/share"), json={"clients": _names(clients)})
        return Head.from_json(response.json())

    def unshare_head(self, ref: Head | str, clients: str | Iterable[str]) -> Head:
        response = self._request("POST", self._head_path(ref, "/unshare"), json={"clients": _names(clients)})
        return Head.from_json(response.json())

    def delete_head(self, ref: Head | str, model: str | None = None) -> str:
        """Delete one head (one model version of a name: ``model``, default the newest); returns its id."""
        return str(self._request("DELETE", self._head_path(ref), params=_model_param(model)).json()["id"])

    # -- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _head_path(ref: Head | str, suffix: str = "") -> str:
        """``/v1/heads/{head}``: a Head by its id; a string quoted with ``/`` kept (``owner/name``)."""
        key = ref.id if isinstance(ref, Head) else ref
        if not key:
            raise ValueError("a head reference must not be empty")
        return f"/v1/heads/{quote(key, safe='/')}{suffix}"

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise PolyrayConnectionError(f"{method} {self.base_url}{path}: no answer in time ({exc})") from exc
        except httpx.TransportError as exc:
            raise PolyrayConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
        if response.is_success:
            return response
        raise _api_error(response)


def _model_param(model: str | None) -> dict[str, str]:
    return {"model": model} if model else {}


def _retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After-Ms`` (polyray's exact estimate, the header OpenAI's SDK reads too) when sent,
    else ``Retry-After`` in seconds (an HTTP date is not worth parsing here)."""
    for header, divisor in (("Retry-After-Ms", 1000.0), ("Retry-After", 1.0)):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            continue
    return None


def _api_error(response: httpx.Response) -> PolyrayAPIError:
    status = response.status_code
    # Without polyray's error body (a proxy answered): the table read backwards, else by class.
    known = KIND_BY_STATUS.get(status)
    fallback_type = known.value if known is not None else ("backend_error" if status >= 500 else "http_error")
    error: Any = None
    try:
        payload = response.json()
        error = payload.get("error") if isinstance(payload, dict) else None
    except ValueError:
        pass
    if not isinstance(error, dict):
        text = response.text.strip()
        message = text[:500] if text else (response.reason_phrase or f"HTTP {status}")
        return PolyrayAPIError(status, fallback_type, None, message, None, _retry_after_s(response))
    return PolyrayAPIError(
        status,
        str(error.get("type") or fallback_type),
        None if error.get("code") is None else str(error["code"]),
        str(error.get("message") or response.reason_phrase or f"HTTP {status}"),
        None if error.get("param") is None else str(error["param"]),
        _retry_after_s(response),
    )
