"""The API's shared answers (``api_answer``): read answers one API process computed, served
by every other while the results have not changed (service/api/cache.py says when)."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from alphawatch.service.db.models import ApiAnswer


def _row_key(key: str) -> str:
    # A URL may be longer than an index entry may be: rows are keyed by its digest.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def get(session: Session, *, key: str, token: str) -> bytes | None:
    """The body kept for ``key`` under ``token``, or None."""
    body = session.scalar(
        select(ApiAnswer.body).where(ApiAnswer.key == _row_key(key), ApiAnswer.token == token)
    )
    return bytes(body) if body is not None else None


def put(session: Session, *, key: str, token: str, body: bytes) -> None:
    """Keep ``body`` for ``key`` under ``token``, replacing what was kept under any token."""
    statement = postgresql.insert(ApiAnswer).values(key=_row_key(key), token=token, body=body)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[ApiAnswer.key],
            set_={"token": statement.excluded.token, "body": statement.excluded.body},
        )
    )


# Run by each API process's listener on its own connection, at most every PRUNE_EVERY_S: what
# was kept under another token than the one just heard can no longer be served.
PRUNE_SQL = "DELETE FROM api_answer WHERE token <> %s"
