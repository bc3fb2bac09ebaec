"""``polyray clients ...``: create clients, set their quotas, issue and revoke keys.

Works on the database directly (see ``polyray.cli.database``), so an operator can manage
clients before the first ``polyray serve`` and without an admin key.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from polyray.cli.database import database_options, open_db
from polyray.errors import InvalidRequest
from polyray.tenancy.model import ClientRecord, PriorityClass, Quota
from polyray.tenancy.store import ClientStore

if TYPE_CHECKING:
    from polyray.cli.common import Subcommands

_QUOTA_FLAGS = (
    ("requests_per_s", float),
    ("tokens_per_s", float),
    ("max_concurrent", int),
    ("daily_compute_s", float),
)


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


# The default of every quota flag: "not given" (keep the current value), which None cannot say
# because None means "unlimited".
_UNSET: Any = object()


def _fmt(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def _print_clients(clients: list[ClientRecord]) -> None:
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
    store = ClientStore(open_db(args))
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
    store.db.dispose()
    return 0


def register(sub: Subcommands) -> None:
    common = database_options()
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
