"""Open the ledger database and bring its schema to the newest version (Alembic).

``sqlite:///path`` by default, ``postgresql+psycopg://...`` (or ``postgresql://``) for a shared
deployment. The schema is upgraded on open, inside one transaction, so a fresh file or database
works in one step and an old one is migrated before serving.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import sqlalchemy as sa

# Alembic logs a dozen INFO lines per upgrade, even when there is nothing to do (some at import).
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """``postgresql://`` means the psycopg 3 driver (the one this project depends on)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_database(url: str, upgrade: bool = True) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, object] = {"future": True}
    if url.startswith("postgresql"):
        # Fail fast when the server is away: the ledger spools and retries instead of hanging.
        kwargs.update(pool_pre_ping=True, connect_args={"connect_timeout": 3})
    else:
        kwargs["connect_args"] = {"timeout": 10}
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    if upgrade:
        try:
            upgrade_schema(engine)
        except sa.exc.SQLAlchemyError:
            # Another process (a second replica, `polyray clients` beside `polyray serve`) may be
            # creating the same schema right now; once it has, our upgrade is a no-op.
            time.sleep(1.0)
            upgrade_schema(engine)
    return engine


def _sqlite_pragmas(dbapi_connection: object, _: object) -> None:
    """WAL: readers (auth refresh, usage reports) never wait for the ledger's writes, nor it for them;
    synchronous=NORMAL is durable across a process crash in WAL mode (an OS crash may lose the last commits)."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def upgrade_schema(engine: Engine) -> None:
    """Migrate to the newest schema; logs one line when something changed (Alembic's own are silenced)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    before = schema_version(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
    after = schema_version(engine)
    if after != before:
        log.info(
            "ledger schema %s -> %s (%s)", before or "empty", after, engine.url.render_as_string(hide_password=True)
        )


def schema_version(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
