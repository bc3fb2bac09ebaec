"""Open the database and bring its schema to the newest version (Alembic).

``sqlite:///path`` by default, ``postgresql+psycopg://...`` (or ``postgresql://``) for a shared
deployment. The schema is upgraded on open, inside one transaction, so a fresh file or database
works in one step and an old one is migrated before serving.

**Every PostgreSQL call has a client-side deadline.** A partition that leaves the socket open but
forwards nothing (a proxy or a NAT box that still ACKs) is invisible to TCP keepalive and
``tcp_user_timeout``, and ``statement_timeout`` never fires because the server never sees the
query: psycopg then waits on the socket forever, and so did the ledger, the client refresh and
shutdown. ``CallWatchdog`` bounds each use of a pooled connection (checkout to checkin, the
checkout's liveness ping included) by ``db_timeout_s``: past it, the connection's socket is shut
down, which wakes the blocked call with an error; SQLAlchemy then discards the connection. New
connections are bounded by ``connect_timeout`` and a free pool slot by ``pool_timeout``. Callers
see an ordinary database error and fall back (the ledger spools, the directory keeps its snapshot).

SQLite files (and their WAL) are created 0600 in a 0700 directory: they hold key digests and usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import sqlalchemy as sa

# Alembic logs a dozen INFO lines per upgrade, even when there is nothing to do (some at import).
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

# SQLAlchemy's connection pool and dialect for one database URL. Called ``Database`` (and held
# in attributes named ``db``) so that "engine" means polyray's inference engine only.
Database: TypeAlias = Engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DEFAULT_DB_TIMEOUT_S = 5.0
WATCHDOG_TICK_S = 0.1  # how late past its deadline a stuck call may be cut
log = logging.getLogger(__name__)
T = TypeVar("T")
_WATCHDOGS: weakref.WeakKeyDictionary[Database, CallWatchdog] = weakref.WeakKeyDictionary()


class DatabaseTimeout(sa.exc.SQLAlchemyError):
    """A database call passed its deadline (the database is reachable but not answering)."""


class CallWatchdog:
    """Cuts the socket of a pooled PostgreSQL connection held past its deadline (see module docstring).

    Each checkout registers a duplicate of the connection's socket descriptor: shutting the
    duplicate down shuts the shared socket down, and because the duplicate is ours, a descriptor
    number the driver closed and the process reused for something else can never be hit.
    """

    def __init__(self, timeout_s: float, tick_s: float = WATCHDOG_TICK_S) -> None:
        self.timeout_s = timeout_s
        self.tick_s = tick_s
        self.num_cut = 0  # connections cut at their deadline (a metric)
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[socket.socket, float]] = {}  # id(connection record) -> (dup, deadline)
        self._cut_keys: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log_s = -math.inf

    def watch(self, key: int, fd: int) -> None:
        dup = socket.socket(fileno=os.dup(fd))
        with self._lock:
            old = self._watched.pop(key, None)
            self._cut_keys.discard(key)
            self._watched[key] = (dup, time.monotonic() + self.timeout_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
                self._thread.start()
        if old is not None:
            old[0].close()

    def release(self, key: int) -> bool:
        """Stop watching; True if the watchdog cut this connection (its call timed out)."""
        with self._lock:
            entry = self._watched.pop(key, None)
            was_cut = key in self._cut_keys
            self._cut_keys.discard(key)
        if entry is not None:
            entry[0].close()
        return was_cut

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            entries, self._watched = list(self._watched.values()), {}
        for dup, _ in entries:
            dup.close()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            with self._lock:
                for key, (dup, deadline) in list(self._watched.items()):
                    if now < deadline or key in self._cut_keys:
                        continue
                    self._cut_keys.add(key)
                    self.num_cut += 1
                    with contextlib.suppress(OSError):  # closed by the driver: nothing is blocked on it
                        dup.shutdown(socket.SHUT_RDWR)
                    if now - self._last_log_s > 60:  # one line per outage (or per minute of one)
                        self._last_log_s = now
                        log.warning(
                            "database: a call passed its %.1f s deadline (db_timeout_s); its connection was "
                            "cut (%d so far; the database is reachable but not answering)",
                            self.timeout_s,
                            self.num_cut,
                        )


async def call_with_deadline(timeout_s: float, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a daemon thread; ``DatabaseTimeout`` if it has not returned within ``timeout_s``.

    The watchdog already cuts a stuck call; this bounds the caller even where a call needs more
    than one step (a reconnect after a cut) or the database is not PostgreSQL. An abandoned call
    finishes on its own thread (a daemon: it never holds up the exit), and what it does must be
    safe to happen late, as a usage batch is (its id makes a late commit and a retry count once).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def work() -> None:
        try:
            result: Any = fn(*args)
            ok = True
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=work, name="db-call", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        raise DatabaseTimeout(f"the database did not answer within {timeout_s:.1f} s") from None


def _install_watchdog(db: Database, watchdog: CallWatchdog) -> None:
    """Checkout: watch the connection, then ping it (a replacement for ``pool_pre_ping``, whose
    ping runs before any checkout hook and so could hang unwatched). Checkin: release it."""
    dialect = db.dialect

    def on_connect(_dbapi: Any, record: Any) -> None:
        record.info["polyray_fresh"] = True

    def on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        key = id(record)
        watchdog.watch(key, dbapi_connection.pgconn.socket)
        if record.info.pop("polyray_fresh", False):
            return  # just connected (within connect_timeout): no need to ping
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            if watchdog.release(key):
                raise DatabaseTimeout(f"the database did not answer a ping within {watchdog.timeout_s} s") from exc
            # A stale connection (the server restarted): the pool replaces it and checks out again.
            raise sa.exc.DisconnectionError(str(exc)) from exc

    def on_checkin(_dbapi: Any, record: Any) -> None:
        watchdog.release(id(record))

    def on_close(_dbapi: Any, record: Any) -> None:
        watchdog.release(id(record))

    sa.event.listen(db, "connect", on_connect)
    sa.event.listen(db, "checkout", on_checkout)
    sa.event.listen(db, "checkin", on_checkin)
    sa.event.listen(db, "close", on_close)
    sa.event.listen(db, "invalidate", lambda _d, record, _e: watchdog.release(id(record)))


def normalize_url(url: str) -> str:
    """``postgresql://`` means the psycopg 3 driver (the one this project depends on)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_database(url: str, upgrade: bool = True, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> Database:
    """The database's connection pool; ``timeout_s`` is the deadline of each PostgreSQL call (see module docstring)."""
    url = normalize_url(url)
    kwargs: dict[str, object] = {"future": True}
    watchdog: CallWatchdog | None = None
    if url.startswith("postgresql"):
        watchdog = CallWatchdog(timeout_s)
        kwargs.update(
            pool_timeout=timeout_s,
            # libpq's connect_timeout is whole seconds and at least 2.
            connect_args={"connect_timeout": max(2, math.ceil(timeout_s))},
        )
    else:
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            _private_sqlite_file(Path(url.removeprefix("sqlite:///")).expanduser())
        kwargs["connect_args"] = {"timeout": 10}
    db = sa.create_engine(url, **kwargs)
    if watchdog is not None:
        _install_watchdog(db, watchdog)
        _WATCHDOGS[db] = watchdog
    if db.dialect.name == "sqlite":
        sa.event.listen(db, "connect", _sqlite_pragmas)
    if upgrade:
        try:
            upgrade_schema(db)
        except DatabaseTimeout:
            raise
        except sa.exc.SQLAlchemyError:
            # Another process (a second replica, `polyray clients` beside `polyray serve`) may be
            # creating the same schema right now; once it has, our upgrade is a no-op.
            time.sleep(1.0)
            upgrade_schema(db)
    return db


def watchdog_of(db: Database) -> CallWatchdog | None:
    """The database's watchdog (PostgreSQL only), for its metric and to stop it on dispose."""
    return _WATCHDOGS.get(db)


def _private_sqlite_file(path: Path) -> None:
    """Create the database 0600 (in a 0700 directory when we create it) before SQLite opens it;
    SQLite gives its -wal and -shm files the database file's mode. An existing file readable by
    others (made by an older polyray under a 022 umask) is narrowed to 0600, with a warning."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return
    except FileExistsError:
        pass
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = candidate.stat()
        except FileNotFoundError:
            continue
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(candidate, stat.S_IRUSR | stat.S_IWUSR)
            log.warning("ledger database %s was readable by others; now 0600", candidate)


def _sqlite_pragmas(dbapi_connection: object, _: object) -> None:
    """WAL: readers (auth refresh, usage reports) never wait for the ledger's writes, nor it for them;
    synchronous=NORMAL is durable across a process crash in WAL mode (an OS crash may lose the last commits)."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def upgrade_schema(db: Database) -> None:
    """Migrate to the newest schema; logs one line when something changed (Alembic's own are silenced)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    before = schema_version(db)
    with db.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
    after = schema_version(db)
    if after != before:
        log.info("ledger schema %s -> %s (%s)", before or "empty", after, db.url.render_as_string(hide_password=True))


def schema_version(db: Database) -> str | None:
    with db.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
