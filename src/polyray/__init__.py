"""polyray: compute a universal model's embedding once, serve it to many clients.

``polyray.Client`` (and its result and error types) are exported lazily: ``import polyray``
stays light (no httpx, no numpy) for the server's subprocesses and the CLI, and the client
module loads on first use of one of these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from polyray.client import (
        Client,
        Head,
        HeadTrainingFailed,
        HeadWaitTimeout,
        InferResult,
        PolyrayAPIError,
        PolyrayClientError,
        PolyrayConnectionError,
    )

_CLIENT_EXPORTS = frozenset(
    {
        "Client",
        "Head",
        "HeadTrainingFailed",
        "HeadWaitTimeout",
        "InferResult",
        "PolyrayAPIError",
        "PolyrayClientError",
        "PolyrayConnectionError",
    }
)

__all__ = ["Client", "Head", "HeadTrainingFailed", "HeadWaitTimeout", "InferResult", "PolyrayAPIError",
           "PolyrayClientError", "PolyrayConnectionError", "__version__"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _CLIENT_EXPORTS:
        from polyray import client

        value = getattr(client, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'polyray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_CLIENT_EXPORTS})
