"""Leases that ran out: the rows a dead or hung worker held, for the queue and the alert outbox.

A job (``analysis_job``) and an alert delivery (``alert``) are held the same way: a status that
says a worker has it, and ``lease_expires_at``, pushed forward while the worker lives. Both are
recovered the same way, here; what a recovered row becomes is each owner's rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from alphawatch.service.db.models import Alert, AnalysisJob

Held = TypeVar("Held", AnalysisJob, Alert)


def lapsed(session: Session, entity: type[Held], *, status: str, now: datetime) -> Sequence[Held]:
    """The rows of ``entity`` in ``status`` whose lease ran out before ``now``.

    On PostgreSQL they are locked, and rows another recovering worker holds are skipped: two
    workers recovering at once never both handle a row, and the second re-reads it after the
    first commits instead of overwriting a claim made in between.
    """
    query = select(entity).where(entity.status == status, entity.lease_expires_at < now)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return session.scalars(query).all()
