"""The wire protocol: OpenAI-compatible embeddings request and response.

Decisions (documented in the README):
- an empty string is rejected (400), as OpenAI does: it has no meaning to embed and is almost
  always a client bug;
- token-id arrays (OpenAI's ``input: [[1, 2]]``) are rejected: polyray's tokenizer is the model's,
  not tiktoken, so ids from a client would silently mean other words;
- ``dimensions`` is accepted only when it equals the model's dimension: MiniLM is not trained for
  truncated (Matryoshka) vectors, so shortening them would quietly degrade quality;
- unknown fields are rejected, so a typo never silently changes behaviour.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from polyray.errors import InvalidRequest, TooLarge


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: Any
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def parse_embeddings_request(payload: Any, max_items: int) -> tuple[EmbeddingsRequest, tuple[str, ...]]:
    """Validate a decoded JSON body; raise ``InvalidRequest``/``TooLarge`` with the field named."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if "input" not in payload:
        raise InvalidRequest("'input' is required", param="input")
    try:
        req = EmbeddingsRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise InvalidRequest(f"{param}: {err['msg']}", param=param) from None
    return req, texts_from_input(req.input, max_items)


def texts_from_input(value: Any, max_items: int) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        if not value:
            raise InvalidRequest("'input' must not be an empty list", param="input")
        if len(value) > max_items:
            raise InvalidRequest(
                f"'input' has {len(value)} items; the maximum is {max_items}", param="input", code="too_many_items"
            )
        items = value
    else:
        raise InvalidRequest("'input' must be a string or a list of strings", param="input")
    for i, item in enumerate(items):
        param = "input" if isinstance(value, str) else f"input[{i}]"
        if isinstance(item, list) or (isinstance(item, int) and not isinstance(item, bool)):
            raise InvalidRequest(f"{param}: token-id input is not supported; send text", param=param)
        if not isinstance(item, str):
            raise InvalidRequest(f"{param} must be a string, got {type(item).__name__}", param=param)
        if not item.strip():
            raise InvalidRequest(f"{param} is empty; every input must contain text", param=param)
    return tuple(items)


def check_dimensions(dimensions: int | None, model_dim: int) -> None:
    if dimensions is not None and dimensions != model_dim:
        raise InvalidRequest(
            f"dimensions={dimensions} is not supported: this model returns {model_dim}-dimensional vectors only",
            param="dimensions",
        )


def encode_vector(vector: np.ndarray, encoding_format: str) -> Any:
    """float: a JSON list; base64: little-endian float32 bytes, as OpenAI's SDK decodes them."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def check_body_size(num_bytes: int, limit: int) -> None:
    if num_bytes > limit:
        raise TooLarge(f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
