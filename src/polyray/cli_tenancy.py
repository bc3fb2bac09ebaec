"""``polyray clients ...`` and ``polyray usage report``: operate on the database directly.

They need no running server (a running one sees changes within its ``refresh_interval_s``).
The database is the one the config names (``--config``), or ``--database-url``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from polyray.config import TenancyConfig, database_url, load_settings
from polyray.errors import InvalidRequest
from polyray.tenancy.model import Client, PriorityClass, Quota
from polyray.tenancy.store import ClientStore

_QUOTA_FLAGS = (
    ("requests_per_s", float),
    ("tokens_per_s", float),
    ("max_concurrent", int),
    ("daily_compute_s", float),
)


def _db_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return str(args.database_url)
    config = load_settings(args.config).tenancy if args.config else TenancyConfig()
    return database_url(config)


def _store(args: argparse.Namespace) -> ClientStore:
    from polyray.tenancy.db import open_database

    return ClientStore(open_database(_db_url(args)))


def _limit(kind: type) -> Any:
    """A quota value: a positive number, or 'none' for unlimited."""

    def parse(text: str) -> Any:
        if text.lower() in ("none", "unlimited"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None

    return parse


def _quota_from(args: argparse.Namespace, base: Quota) -> Quota:
    values = {name: getattr(base, name) for name, _ in _QUOTA_FLAGS}
    for name, _ in _QUOTA_FLAGS:
        given = getattr(args, name)
        if given is not _UNSET:
            values[name] = given
    try:
        return Quota(**values)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


_UNSET: Any = object()


def _fmt(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def _print_clients(clients: list[Client]) -> None:
    header = (
        f"{'name':<24} {'priority':<12} {'share':>6} {'req/s':>8} {'tok/s':>9} {'conc':>5} {'cpu-s/day':>10}  state"
    )
    print(header)
    for c in clients:
        q = c.quota
        print(
            f"{c.name:<24} {c.priority.value:<12} {c.share:>6g} {_fmt(q.requests_per_s):>8} {_fmt(q.tokens_per_s):>9} "
            f"{_fmt(q.max_concurrent):>5} {_fmt(q.daily_compute_s):>10}  {'disabled' if c.disabled else 'active'}"
        )


def cmd_clients(args: argparse.Namespace) -> int:
    store = _store(args)
    action = args.action
    if action == "create":
        client, key = store.create_client(
            args.name, PriorityClass(args.priority), args.share, _quota_from(args, Quota())
        )
        _print_clients([client])
        print(f"\napi key (shown once, stored hashed): {key}")
    elif action == "list":
        _print_clients(store.all())
    elif action == "show":
        _print_clients([store.get(args.name)])
        print("\nkeys:")
        for info in store.keys(args.name):
            state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
            print(f"  {info.prefix}...  created {info.created_at:%Y-%m-%d %H:%M}  {state}")
    elif action == "set-quota":
        current = store.get(args.name)
        priority = PriorityClass(args.priority) if args.priority else None
        _print_clients(
            [store.update(args.name, quota=_quota_from(args, current.quota), priority=priority, share=args.share)]
        )
    elif action in ("disable", "enable"):
        _print_clients([store.update(args.name, disabled=action == "disable")])
    elif action == "rotate-key":
        key = store.rotate_key(args.name)
        print(f"all earlier keys of {args.name!r} are revoked; new api key (shown once): {key}")
    elif action == "admin-key":
        print(f"new admin key (shown once, stored hashed): {store.create_admin_key()}")
    store.engine.dispose()
    return 0


def _since(text: str) -> datetime:
    from polyray.timewindow import parse_time

    moment = parse_time(text, "--since", None)
    assert moment is not None
    return moment


def cmd_usage(args: argparse.Namespace) -> int:
    from polyray.tenancy.db import open_database
    from polyray.tenancy.reports import usage_totals

    engine = open_database(_db_url(args))
    since = _since(args.since) if args.since else datetime.now(UTC) - timedelta(days=1)
    until = _since(args.until) if args.until else None
    totals = usage_totals(engine, since, until, args.by, args.client)
    engine.dispose()
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


def add_tenancy_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config whose [tenancy] names the database")
    common.add_argument("--database-url", help="e.g. sqlite:///path/polyray.db or postgresql://user@host/db")

    clients = sub.add_parser("clients", help="manage clients, quotas and API keys")
    actions = clients.add_subparsers(dest="action", required=True)
    quota = argparse.ArgumentParser(add_help=False)
    for name, kind in _QUOTA_FLAGS:
        quota.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_limit(kind),
            default=_UNSET,
            help="a number, or 'none' for unlimited",
        )
    create = actions.add_parser("create", parents=[common, quota], help="create a client and print its first key")
    create.add_argument("name")
    create.add_argument("--priority", choices=[p.value for p in PriorityClass], default=PriorityClass.BATCH.value)
    create.add_argument("--share", type=float, default=1.0, help="fair-share weight (times the class weight)")
    actions.add_parser("list", parents=[common], help="list clients")
    for action, text in (
        ("show", "a client and its keys"),
        ("disable", "refuse the client's keys"),
        ("enable", "accept the client's keys again"),
        ("rotate-key", "revoke all keys, issue one"),
    ):
        actions.add_parser(action, parents=[common], help=text).add_argument("name")
    set_quota = actions.add_parser("set-quota", parents=[common, quota], help="change limits, share or priority")
    set_quota.add_argument("name")
    set_quota.add_argument("--priority", choices=[p.value for p in PriorityClass])
    set_quota.add_argument("--share", type=float)
    actions.add_parser("admin-key", parents=[common], help="create another admin key")
    clients.set_defaults(func=cmd_clients)

    usage = sub.add_parser("usage", help="usage reports from the ledger")
    usage_actions = usage.add_subparsers(dest="action", required=True)
    report = usage_actions.add_parser("report", parents=[common], help="usage totals for a time range")
    report.add_argument(
        "--since", help="ISO date/time (UTC) or relative: --since -7d, --since -24h, --since 2026-01-31 (default -24h)"
    )
    report.add_argument("--until", help="ISO date/time (UTC) or relative, e.g. --until -1h")
    report.add_argument("--by", choices=["client", "model", "day", "minute"], default="client")
    report.add_argument("--client", help="only this client")
    usage.set_defaults(func=cmd_usage)
