"""What the service knows of a client: identity, priority class, share and quotas.

A ``ClientRecord`` is an immutable snapshot read from the database; the directory swaps snapshots in
when an operator changes a client, so request handlers never see a half-updated client. (Named
apart from ``polyray.Client``, the SDK a caller talks to the server with.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class PriorityClass(StrEnum):
    """Interactive clients get a larger fair-share weight and bounded batch sizes while active."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


# Weight multiplier per class: an interactive client with share 1 outweighs a batch client with
# share 1 four to one when both are backlogged. Chosen so a user-facing service keeps most of the
# capacity it asks for under a bulk job's flood, while the bulk job is never starved (weight > 0).
CLASS_WEIGHT = {PriorityClass.INTERACTIVE: 4.0, PriorityClass.BATCH: 1.0}


@dataclass(frozen=True)
class Quota:
    """Limits of one client; ``None`` means unlimited."""

    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    max_concurrent: int | None = None
    daily_compute_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "tokens_per_s", "daily_compute_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or unset for unlimited), got {value}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1 (or unset for unlimited), got {self.max_concurrent}")


@dataclass(frozen=True)
class ClientRecord:
    id: int
    name: str
    priority: PriorityClass = PriorityClass.BATCH
    share: float = 1.0
    quota: Quota = Quota()
    disabled: bool = False

    @property
    def weight(self) -> float:
        """Fair-queuing weight: the client's share times its class multiplier."""
        return self.share * CLASS_WEIGHT[self.priority]


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"client name {name!r} must be 1-63 characters of lower-case letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name
