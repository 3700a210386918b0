"""Read responses kept in memory, and shared by the API processes, until PostgreSQL says that
results changed.

A dashboard refreshes the same trends and histories every few seconds, and a CI job asks for the
same gate of the same run: between two analysed checkpoints the answers do not change. Each API
process keeps the JSON bodies of its read routes in an LRU and drops them all when a
notification arrives on :data:`CHANNEL`. Triggers (migration 0003) send that notification on
every committed write to ``run``, ``checkpoint``, ``layer_metric``, ``checkpoint_stat`` and
``block_stat`` (migration 0013), whatever wrote it (a worker, a re-analysis, a deleted run, a
bulk load).

Correctness rests on two rules:

* an entry is served only while the listener is connected: a process that may have missed a
  notification serves nothing from memory;
* a body is stored under the version read *before* its query ran; a notification that arrives
  while the query runs bumps the version, so the body is never served. PostgreSQL delivers a
  notification after its transaction is visible, so a query that starts after the bump sees it.

A second tier is shared by every API process (``api_answer``, migration 0016): a process that
misses in memory asks it before computing, and keeps what it computed there. Its key is the
process's **token**, the payload of the last notification it received. Notifications name
their transaction and every listener receives them in commit order, so two processes with the
same token have seen the same results, and share answers under it. A process that (re)connects
has no token until it hears one: it announces itself with a notification of its own
(``hello:<id>``), which every process hears after the commits it heard before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from alphawatch.service.db.answers import PRUNE_SQL

log = logging.getLogger("alphawatch.api.cache")

CHANNEL = "alphawatch_results"
PRUNE_EVERY_S = 2.0


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL of a PostgreSQL database as a libpq connection URL."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ResultCache:
    """LRU of response bodies, valid while the database's results are unchanged.

    Args:
        database_url: a PostgreSQL SQLAlchemy URL; the listener opens its own connection.
        max_bytes: total size of the bodies kept; the least recently used go first, and a body
            larger than an eighth of it is never kept.
        poll_s: how often the listener wakes to check its stop flag and its connection.
    """

    def __init__(self, database_url: str, *, max_bytes: int = 256 * 2**20, poll_s: float = 0.25):
        self._conninfo = libpq_url(database_url)
        self._max = max_bytes
        self._size = 0
        self._poll_s = poll_s
        self._entries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._version = 0
        self._token: str | None = None
        self._shared = 0
        self._live = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hits = 0
        self.misses = 0

    @property
    def live(self) -> bool:
        return self._live.is_set()

    def version(self) -> int | None:
        """The version a computation started now would be stored under; None when not live."""
        return self._version if self._live.is_set() else None

    def token(self) -> str | None:
        """The key of the shared tier now (the last notification heard); None when not live or
        when none was heard since the listener connected."""
        return self._token if self._live.is_set() else None

    def get(self, key: str) -> bytes | None:
        if not self._live.is_set():
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != self._version:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: str, version: int | None, body: bytes) -> None:
        with self._lock:
            if (
                version is None
                or version != self._version
                or not self._live.is_set()
                or 8 * len(body) > self._max
            ):
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._size -= len(old[1])
            self._entries[key] = (version, body)
            self._size += len(body)
            while self._size > self._max:
                _key, (_version, dropped) = self._entries.popitem(last=False)
                self._size -= len(dropped)

    def invalidate(self, token: str | None = None) -> None:
        """Drop every kept body; ``token`` is the notification that said so (None: unknown, as
        after a lost connection or a write of this process, until the next one is heard)."""
        with self._lock:
            self._version += 1
            self._token = token
            self._entries.clear()
            self._size = 0
            self._shared = 0

    def may_share(self, token: str, size: int) -> bool:
        """Whether a body of ``size`` bytes made under ``token`` may be kept in the shared tier:
        the token is still the last heard, the body is one this process would keep, and what
        this process kept there under it stays within its own memory budget (so the table
        holds at most that much per API process between two notifications)."""
        with self._lock:
            if token != self._token or 8 * size > self._max or self._shared + size > self._max:
                return False
            self._shared += size
            return True

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen, name="alphawatch-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self._poll_s + 5)
        self._live.clear()
        self.invalidate()

    def wait_live(self, timeout: float) -> bool:
        """Block until the listener is connected (for tests and benchmarks)."""
        return self._live.wait(timeout)

    def _listen(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, application_name="alphawatch-cache"
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Anything may have changed while nobody listened.
                    self.invalidate()
                    self._live.set()
                    # Heard by every process after the commits they heard before: a token.
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"hello:{uuid.uuid4()}"))
                    backoff = 0.5
                    idle = 0.0
                    pruned, pruned_for = 0.0, None
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=self._poll_s):
                            self.invalidate(note.payload)
                        token = self._token
                        # Once per token heard, at most every PRUNE_EVERY_S: an idle fleet
                        # deletes nothing, a busy one once in a while.
                        if (
                            token is not None
                            and token != pruned_for
                            and time.monotonic() - pruned >= PRUNE_EVERY_S
                        ):
                            pruned, pruned_for = time.monotonic(), token
                            self._prune(conn, token)
                        idle += self._poll_s
                        if idle >= 5.0:  # a dead server shows itself here, not in notifies()
                            conn.execute("SELECT 1")
                            idle = 0.0
            except psycopg.Error as exc:
                if self._live.is_set():
                    log.warning("result cache off: lost the database listener (%s)", exc)
                self._live.clear()
                self.invalidate()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self._live.clear()

    @staticmethod
    def _prune(conn: psycopg.Connection[Any], token: str) -> None:
        # A database not yet at migration 0016 has no shared tier (the reads skip it too).
        with contextlib.suppress(psycopg.errors.UndefinedTable):
            conn.execute(PRUNE_SQL, (token,))
