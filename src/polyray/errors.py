"""The exception tree every layer raises; the HTTP layer maps ``ErrorKind`` to a status once.

    PolyrayError                 (kind)
    ├── InvalidRequest           invalid_request   400
    ├── TooLarge                 too_large         413
    ├── Unauthenticated          unauthenticated   401 (no key, unknown key)
    ├── Forbidden                forbidden         403 (disabled client, not an admin, another client's data)
    ├── NotFound                 not_found         404
    ├── RateLimited              rate_limited      429 + Retry-After (a quota or the fair-share queue limit)
    ├── Overloaded               overloaded        503 + Retry-After
    │   └── DeadlineExceeded     the request's deadline passed before compute
    ├── BackendError             backend_error     500
    └── ModelLoadError           (start-up only: a model directory is missing or broken)

Engine code raises these and never an HTTP status, so the same errors serve the CLI, the
in-process client and, later, the Ray client. The statuses above are ``STATUS_BY_KIND``, the one
kind→status table (DESIGN.md, "Errors: one table"): the API answers with it and the SDK
(``polyray.client``) reads a status back with ``KIND_BY_STATUS``; neither keeps a copy. This
module imports nothing but the standard library, so the SDK can import it from a thin install.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class ErrorKind(StrEnum):
    INVALID_REQUEST = "invalid_request"
    TOO_LARGE = "too_large"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    BACKEND_ERROR = "backend_error"


STATUS_BY_KIND: Mapping[ErrorKind, int] = MappingProxyType(
    {
        ErrorKind.INVALID_REQUEST: 400,
        ErrorKind.TOO_LARGE: 413,
        ErrorKind.UNAUTHENTICATED: 401,
        ErrorKind.FORBIDDEN: 403,
        ErrorKind.NOT_FOUND: 404,
        ErrorKind.RATE_LIMITED: 429,
        ErrorKind.OVERLOADED: 503,
        ErrorKind.BACKEND_ERROR: 500,
    }
)
# The table read backwards: one kind per status (the statuses are distinct, a test pins it), so a
# status alone, e.g. from a proxy that answered without polyray's error body, names its kind.
KIND_BY_STATUS: Mapping[int, ErrorKind] = MappingProxyType({status: kind for kind, status in STATUS_BY_KIND.items()})
# Kinds whose answer says when to come back (``Retry-After``): the refusal is about load or a
# quota, not the request, so the same request later can succeed.
RETRY_AFTER_KINDS: frozenset[ErrorKind] = frozenset({ErrorKind.RATE_LIMITED, ErrorKind.OVERLOADED})


class PolyrayError(Exception):
    """Base of all polyray errors; ``param`` names the offending field when there is one."""

    kind: ErrorKind = ErrorKind.BACKEND_ERROR

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s


class InvalidRequest(PolyrayError):
    kind = ErrorKind.INVALID_REQUEST


class TooLarge(PolyrayError):
    kind = ErrorKind.TOO_LARGE


class Unauthenticated(PolyrayError):
    kind = ErrorKind.UNAUTHENTICATED


class Forbidden(PolyrayError):
    kind = ErrorKind.FORBIDDEN


class NotFound(PolyrayError):
    kind = ErrorKind.NOT_FOUND


class RateLimited(PolyrayError):
    """Over a quota; ``code`` names the limit (e.g. ``requests_per_s``) and the message its value."""

    kind = ErrorKind.RATE_LIMITED

    def __init__(self, message: str, *, code: str, retry_after_s: float) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class Overloaded(PolyrayError):
    kind = ErrorKind.OVERLOADED

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str | None = "overloaded") -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class DeadlineExceeded(Overloaded):
    def __init__(self, message: str = "the request's deadline passed before it could be computed") -> None:
        super().__init__(message, retry_after_s=1.0, code="deadline_exceeded")


class BackendError(PolyrayError):
    kind = ErrorKind.BACKEND_ERROR


class ModelLoadError(PolyrayError):
    """A configured model cannot be loaded; raised at start so a broken path never serves."""

    kind = ErrorKind.NOT_FOUND
