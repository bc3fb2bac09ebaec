"""``polyray usage report``: usage totals from the ledger, read from the database directly."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from polyray.cli.database import database_options, open_db

if TYPE_CHECKING:
    from polyray.cli.common import Subcommands


def _moment(text: str, option: str) -> datetime:
    from polyray.timewindow import parse_time

    moment = parse_time(text, option, None)
    assert moment is not None
    return moment


def cmd_usage(args: argparse.Namespace) -> int:
    from polyray.tenancy.reports import usage_totals

    db = open_db(args)
    since = _moment(args.since, "--since") if args.since else datetime.now(UTC) - timedelta(days=1)
    until = _moment(args.until, "--until") if args.until else None
    totals = usage_totals(db, since, until, args.by, args.client)
    db.dispose()
    print(
        f"usage since {since:%Y-%m-%d %H:%M}Z"
        + (f" until {until:%Y-%m-%d %H:%M}Z" if until else "")
        + f", by {args.by}"
    )
    print(f"{args.by:<28} {'requests':>10} {'texts':>10} {'cached':>8} {'tokens':>12} {'compute s':>11} {'share':>6}")
    total_s = sum(t.compute_s for t in totals) or 1.0
    for t in totals:
        print(
            f"{t.group:<28} {t.num_requests:>10} {t.num_texts:>10} {t.num_cached:>8} {t.num_tokens:>12} "
            f"{t.compute_s:>11.3f} {t.compute_s / total_s:>6.1%}"
        )
    if not totals:
        print("(no usage in this range)", file=sys.stderr)
    return 0


def register(sub: Subcommands) -> None:
    usage = sub.add_parser("usage", help="usage reports from the ledger")
    usage_actions = usage.add_subparsers(dest="action", required=True)
    report = usage_actions.add_parser("report", parents=[database_options()], help="usage totals for a time range")
    report.add_argument(
        "--since", help="ISO date/time (UTC) or relative: --since -7d, --since -24h, --since 2026-01-31 (default -24h)"
    )
    report.add_argument("--until", help="ISO date/time (UTC) or relative, e.g. --until -1h")
    report.add_argument("--by", choices=["client", "model", "day", "minute"], default="client")
    report.add_argument("--client", help="only this client")
    usage.set_defaults(func=cmd_usage)
