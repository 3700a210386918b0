"""Small helpers the tests share: read rows over a fresh engine, wait for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import create_engine, text


def rows(url: str, sql: str) -> list[tuple]:
    """Every row of ``sql`` on the database at ``url``, over an engine disposed at once."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
