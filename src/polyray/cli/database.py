"""What ``polyray clients`` and ``polyray usage`` share: they work on the database directly.

They need no running server (a running one sees changes within its ``refresh_interval_s``).
The database is the one the config names (``--config``), or ``--database-url``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from polyray.config import TenancyConfig, database_url, load_settings

if TYPE_CHECKING:
    from polyray.db.connection import Database


def database_options() -> argparse.ArgumentParser:
    """``--config`` and ``--database-url``, as a parent parser for every database action."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", help="TOML config whose [tenancy] names the database")
    parser.add_argument("--database-url", help="e.g. sqlite:///path/polyray.db or postgresql://user@host/db")
    return parser


def db_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return str(args.database_url)
    config = load_settings(args.config).tenancy if args.config else TenancyConfig()
    return database_url(config)


def open_db(args: argparse.Namespace) -> Database:
    """The named database, migrated to the current schema."""
    from polyray.db.connection import open_database

    return open_database(db_url(args))
