"""Times a caller names for a report window: ISO 8601, or relative to now (``-24h``, ``-7d``, ``-30m``).

A pure module (no web framework, no database) because the HTTP API (``/v1/usage?since=``) and the
CLI (``polyray usage report --since``) must read the same strings the same way. Every string a
caller can send either parses to an aware UTC ``datetime`` or raises ``InvalidRequest`` (a
``ValueError`` for the CLI's argparse) naming the parameter: out-of-range amounts
(``-99999999999d``), non-ASCII digits (``-²d``) and offsets that push a date past year 1..9999
are refused here, never left to overflow later in the query or the response.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from polyray.errors import InvalidRequest

# ASCII digits only: str.isdigit() accepts '²' and other digits int() cannot read. Twelve
# digits bound int() far below Python's digit limit; range is checked after.
_RELATIVE = re.compile(r"-([0-9]{1,12})([mhd])", re.ASCII)
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
_ISO_MAX_CHARS = 64  # the longest ISO form fromisoformat reads is about 40 characters


class TimeWindowError(InvalidRequest, ValueError):
    """A time the caller named cannot be read; ``param`` names where it came from.

    Both an ``InvalidRequest`` (the HTTP layer answers 400 with the param) and a ``ValueError``
    (argparse and plain Python callers catch what they expect)."""


def parse_time(value: str | None, param: str, default: datetime | None, now: datetime | None = None) -> datetime | None:
    """``value`` as an aware UTC datetime; ``default`` when ``value`` is None.

    Accepts an ISO 8601 date or date-time (UTC when it names no zone) or ``-N`` followed by
    ``m``/``h``/``d`` (N minutes, hours or days before ``now``, the current time by default)."""
    if value is None:
        return default
    now = now if now is not None else datetime.now(UTC)
    relative = _RELATIVE.fullmatch(value)
    if relative is not None:
        amount, unit = int(relative.group(1)), relative.group(2)
        try:
            return (now - amount * _UNITS[unit]).astimezone(UTC)
        except OverflowError:
            raise TimeWindowError(
                f"{param}={value!r} reaches before year 1; use a smaller amount", param=param
            ) from None
    if len(value) > _ISO_MAX_CHARS or not value.isascii():
        raise _unreadable(value, param)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _unreadable(value, param) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise TimeWindowError(f"{param}={value!r} is out of range in UTC", param=param) from None


def _unreadable(value: str, param: str) -> TimeWindowError:
    shown = value if len(value) <= _ISO_MAX_CHARS else value[:_ISO_MAX_CHARS] + "…"
    return TimeWindowError(
        f"{param}={shown!r} is not an ISO 8601 date/time (2024-05-01, 2024-05-01T12:00Z) "
        "or a relative time like -30m, -24h, -7d",
        param=param,
    )
