"""The wire protocol: OpenAI-compatible embeddings request and response.

Decisions (documented in the README):
- an empty string is rejected (400), as OpenAI does: it has no meaning to embed and is almost
  always a client bug;
- token-id arrays (OpenAI's ``input: [[1, 2]]``) are rejected: polyray's tokenizer is the model's,
  not tiktoken, so ids from a client would silently mean other words;
- ``dimensions`` is accepted only when it equals the model's dimension: MiniLM is not trained for
  truncated (Matryoshka) vectors, so shortening them would quietly degrade quality;
- unknown fields are rejected, so a typo never silently changes behaviour;
- a text must contain something to embed: one made only of whitespace, control characters (NUL)
  or invisible format characters (zero-width space, BOM, bidi marks) is refused (400) on every
  route that takes texts (``/v1/embeddings`` and ``/v1/infer`` share ``texts_from_input``), since
  the tokenizer would reduce it to an empty sequence and the vector would mean nothing.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polyray.errors import InvalidRequest, TooLarge

# Unicode "Cf" (format) code points, Unicode 14 (Python 3.11): invisible, the tokenizer drops them.
_FORMAT_RANGES = (
    (0x00AD, 0x00AD), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD), (0x070F, 0x070F),
    (0x0890, 0x0891), (0x08E2, 0x08E2), (0x180E, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x2064), (0x2066, 0x206F), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD),
    (0x110CD, 0x110CD), (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)  # fmt: skip
# A character worth embedding: not whitespace, not a control (Cc) and not a format character.
# A regex search runs in C and stops at the first such character, so a 4 MB text costs no loop time.
_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _FORMAT_RANGES) + "]")

INPUT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1, "description": "one text"},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "description": "texts"},
    ],
    "description": "A text or a list of texts; each must contain a visible character. Token-id arrays are refused.",
}


def has_text(value: str) -> bool:
    """True when ``value`` has a character to embed (see the module docstring)."""
    return _VISIBLE.search(value) is not None


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: Any = Field(json_schema_extra=INPUT_SCHEMA)
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
        if not has_text(item):
            raise InvalidRequest(
                f"{param} has no text: it is empty or only whitespace, control or invisible characters", param=param
            )
    return tuple(items)


def check_dimensions(dimensions: int | None, model_dim: int) -> None:
    if dimensions is not None and dimensions != model_dim:
        raise InvalidRequest(
            f"dimensions={dimensions} is not supported: this model returns {model_dim}-dimensional vectors only",
            param="dimensions",
        )


def format_embedding(vector: np.ndarray, encoding_format: str) -> Any:
    """float: a JSON list; base64: little-endian float32 bytes, as OpenAI's SDK decodes them.

    The wire form of an answer (``cache.codec.encode_vector`` is the cache's storage form).
    """
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def check_body_size(num_bytes: int, limit: int) -> None:
    if num_bytes > limit:
        raise TooLarge(f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
