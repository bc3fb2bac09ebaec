"""The report-window parser: every string either reads as an aware UTC time or is refused with
``TimeWindowError`` (an ``InvalidRequest`` and a ``ValueError``) naming the parameter. Never an
``OverflowError``, a bare ``ValueError`` from ``int()``, or anything else that would be a 500."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from polyray.errors import InvalidRequest
from polyray.timewindow import TimeWindowError, parse_time

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}


def _read(value: str) -> datetime | None:
    """parse_time's answer, or None when it refused (and then only with the documented error)."""
    try:
        moment = parse_time(value, "since", None, now=NOW)
    except TimeWindowError as exc:
        assert isinstance(exc, InvalidRequest) and isinstance(exc, ValueError)
        assert exc.param == "since" and "since=" in exc.message
        return None
    assert moment is not None and moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
    return moment


@settings(max_examples=1000)
@given(st.text())
@example("-1000000d")
@example("-99999999999d")
@example("-999999999999d")
@example("-" + "9" * 5000 + "d")
@example("-²d")
@example("-٣d")  # Arabic-Indic digit three
@example("-7d\n")
@example("２０２４-01-01")
@example("0001-01-01T00:00+01:00")
@example("9999-12-31T23:59-01:00")
@example("2024-02-30")
@example("")
@example("-")
@example("-d")
def test_any_string_parses_or_is_refused_with_the_param(value: str) -> None:
    _read(value)


@settings(max_examples=1000)
@given(st.text(alphabet="-0123456789mhdTZ:+. ", max_size=40))
def test_strings_near_the_grammar_parse_or_are_refused(value: str) -> None:
    _read(value)


@given(st.integers(min_value=0, max_value=10**12 - 1), st.sampled_from(sorted(UNITS)))
def test_relative_is_exact_or_refused_when_before_year_1(amount: int, unit: str) -> None:
    moment = _read(f"-{amount}{unit}")
    span_s = int((NOW - datetime.min.replace(tzinfo=UTC)).total_seconds())
    reachable = amount * int(UNITS[unit].total_seconds()) <= span_s  # integers: no overflow here
    if reachable:
        assert moment == NOW - amount * UNITS[unit]
    else:
        assert moment is None


@pytest.mark.parametrize("value", ["-1000000d", "-99999999999d", "-²d", "-7d\n", "- 7d", "-7D", "-7w", "7d"])
def test_issue_examples_are_refused(value: str) -> None:
    with pytest.raises(TimeWindowError) as refused:
        parse_time(value, "since", None, now=NOW)
    assert refused.value.param == "since"


@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(min_value=-23 * 60, max_value=23 * 60),
)
def test_iso_with_an_offset_is_the_same_instant_in_utc(moment: datetime, offset_min: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    assert _read(aware.isoformat()) == aware


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)))
def test_iso_without_a_zone_is_utc(moment: datetime) -> None:
    assert _read(moment.isoformat()) == moment.replace(tzinfo=UTC)


def test_examples_from_the_readme() -> None:
    assert parse_time("-24h", "since", None, now=NOW) == NOW - timedelta(hours=24)
    assert parse_time("-7d", "since", None, now=NOW) == NOW - timedelta(days=7)
    assert parse_time("-30m", "since", None, now=NOW) == NOW - timedelta(minutes=30)
    assert parse_time("2024-05-01", "since", None) == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_time("2024-05-01T12:00Z", "since", None) == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_time("2024-05-01T12:00+02:00", "since", None) == datetime(2024, 5, 1, 10, tzinfo=UTC)


def test_none_is_the_default() -> None:
    assert parse_time(None, "until", None) is None
    assert parse_time(None, "since", NOW) is NOW


def test_a_refusal_is_a_value_error_for_argparse_callers() -> None:
    with pytest.raises(ValueError, match="--since="):
        parse_time("yesterday", "--since", None)
