"""The registered runs as a worker reads them: which folders to watch, where each run starts.

Registering runs and checkpoints, and the discovery errors recorded on them, are the queue's
(:mod:`~alphawatch.service.db.queue`); the discovery lease and "scan now" requests are in
:mod:`~alphawatch.service.db.scans`.
"""

from __future__ import annotations

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from alphawatch.service.db.models import Checkpoint, Run

_REGISTERED = select(Run.id, Run.path).order_by(Run.id)


def registered_runs(session: Session | Connection) -> list[tuple[int, str]]:
    """Every registered run's id and folder, by id (one query)."""
    return [(int(run_id), path) for run_id, path in session.execute(_REGISTERED).all()]


def first_checkpoint(session: Session, *, run_id: int) -> str | None:
    """The path of the run's registered checkpoint with the lowest step; None when it has none.

    The analysis measures each checkpoint's distance from init against this one.
    """
    return session.scalars(
        select(Checkpoint.path).where(Checkpoint.run_id == run_id)
        .order_by(Checkpoint.step).limit(1)
    ).first()
