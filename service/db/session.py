"""Engines and the unit of work: one place where transactions commit or roll back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError, PendingRollbackError
from sqlalchemy.orm import Session, sessionmaker

_ENGINES: dict[str, Engine] = {}
CONNECT_TIMEOUT_S = 10
_FACTORIES: dict[Engine, sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets the API read while the worker writes; foreign keys make ON DELETE CASCADE work.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class BinaryCursor(psycopg.Cursor[Any]):
    """A cursor that asks PostgreSQL for results in the binary format.

    A trend of 500 checkpoints reads ~5,000 floats: in the text format the server prints each
    one and the client parses it back, which cost more than the query (8.6 ms against 2.7 ms
    for a whole-model trend, and five times the client CPU). Binary floats are also the stored
    bits, with no decimal round trip. Parameters are still sent as SQLAlchemy binds them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.format = psycopg.pq.Format.BINARY


def make_engine(url: str, *, reads: bool = False) -> Engine:
    """The engine for ``url``, made once per process and shared.

    ``reads=True`` gives a second pool of the same server for the API's read answers: each
    statement in autocommit, results in the binary format (:class:`BinaryCursor`). A read in a
    transaction costs two more round trips (``BEGIN``, ``COMMIT``) than its query, and under
    load each one waits for the server process to be scheduled; at READ COMMITTED every
    statement takes its own snapshot anyway, so a read of several statements sees nothing less
    consistent without the transaction. Never write through it; schema reflection (Alembic)
    expects text results and uses the default pool.
    """
    key = f"reads:{url}" if reads else url
    engine = _ENGINES.get(key)
    if engine is not None:
        return engine
    if url.startswith("sqlite"):
        if reads:
            engine = make_engine(url)
            _ENGINES[key] = engine
            return engine
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        # A server that vanished without a word (a host gone, a dropped route) is waited for
        # CONNECT_TIMEOUT_S, not for ever: a worker retries with backoff, and one told to stop
        # is not held by a connect in progress. A connect_timeout in the URL wins.
        connect: dict[str, Any] = {}
        if "connect_timeout" not in make_url(url).query:
            connect["connect_timeout"] = CONNECT_TIMEOUT_S
        options: dict[str, Any] = {}
        if reads:
            connect["cursor_factory"] = BinaryCursor
            options["isolation_level"] = "AUTOCOMMIT"
        # FastAPI runs sync routes on a 40-thread pool: one connection per thread at most.
        engine = create_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=30,
            connect_args=connect,
            **options,
        )
    _ENGINES[key] = engine
    return engine


def dispose_all() -> None:
    """Close every pooled connection (tests clone template databases, which needs none open)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()
    _FACTORIES.clear()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    factory = _FACTORIES.get(engine)
    if factory is None:
        factory = _FACTORIES[engine] = sessionmaker(bind=engine, expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a lost or unusable connection.

    Such a failure says nothing about the work: the unit of work that met it is to be retried
    whole, in a fresh session, and never recorded as the work's own error. Besides the DBAPI's
    ``OperationalError`` (a terminated backend, a refused connect, SQLite's lock), a connection
    lost mid-transaction surfaces later as ``PendingRollbackError`` (the session, or the
    connection it invalidated, refuses to go on until rolled back), and a driver error can
    arrive unwrapped or as the cause of another exception.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, PendingRollbackError | OperationalError | psycopg.OperationalError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def utcnow() -> datetime:
    """Now, timezone-aware (UTC): what every timestamp column is written with."""
    return datetime.now(UTC)


def dialect_insert(session: Session, table: Any) -> Any:
    """``INSERT`` for the session's dialect, where ``on_conflict_do_nothing`` exists."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
