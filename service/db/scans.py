""" "Scan now" requests on runs, and the lease that lets one worker discover at a time.

A request is a timestamp on the run (``run.scan_requested_at``): asking twice before it is
honoured is one request, and clearing it only up to the time that was seen keeps a request
made during the scan for the next one. The lease is a row updated with a condition (held by
this worker, or run out), which works the same on PostgreSQL and SQLite; it is one statement,
an insert that updates the row where it exists, so that a worker not holding the lease pays one
round trip per poll for asking.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from alphawatch.service.db.models import DiscoveryLease, Run
from alphawatch.service.db.session import utcnow

DISCOVERY = "discovery"


def request_scan(session: Session, *, run_id: int) -> datetime | None:
    """Ask for a full scan of the run at the next tick; when, or None for an unknown run."""
    now = utcnow()
    result = session.execute(update(Run).where(Run.id == run_id).values(scan_requested_at=now))
    return now if getattr(result, "rowcount", 0) else None


@dataclass(frozen=True)
class ScanRequest:
    """A run whose scan was asked for, and when (to clear exactly that request)."""

    run_id: int
    path: str
    requested_at: datetime


_REQUESTS = select(Run.id, Run.path, Run.scan_requested_at).where(
    Run.scan_requested_at.is_not(None)
)


def scan_requests(session: Session | Connection) -> list[ScanRequest]:
    """Runs with a scan asked for and not yet honoured (one indexed query)."""
    rows = session.execute(_REQUESTS).all()
    return [ScanRequest(int(r[0]), r[1], r[2]) for r in rows if r[2] is not None]


def clear_scan_request(session: Session, *, request: ScanRequest) -> None:
    """The request was honoured; a newer one, made while the scan ran, stays."""
    session.execute(
        update(Run)
        .where(Run.id == request.run_id, Run.scan_requested_at <= request.requested_at)
        .values(scan_requested_at=None)
    )


def hold_lease(
    session: Session | Connection, *, holder: str, ttl_s: float, name: str = DISCOVERY
) -> bool:
    """Take or renew the lease for ``ttl_s`` seconds; False while another worker holds it.

    One statement, whoever asks: an insert of the row that, when it exists (always but the
    first time ever), updates it only where it is held by ``holder``, free or run out.
    """
    now = utcnow()
    values = {"holder": holder, "expires_at": now + timedelta(seconds=ttl_s)}
    dialect = (
        session.dialect if isinstance(session, Connection) else session.get_bind().dialect
    ).name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(DiscoveryLease)
    lease = DiscoveryLease.__table__.c
    statement = (
        insert.values(name=name, **values)
        .on_conflict_do_update(
            index_elements=[lease.name],
            set_=values,
            where=(lease.holder == holder) | lease.holder.is_(None) | (lease.expires_at < now),
        )
        .returning(lease.name)
    )
    return session.execute(statement).first() is not None


def release_lease(session: Session, *, holder: str, name: str = DISCOVERY) -> None:
    """Give the lease up (a worker stopping): another worker takes it at its next poll."""
    session.execute(
        update(DiscoveryLease)
        .where(DiscoveryLease.name == name, DiscoveryLease.holder == holder)
        .values(holder=None, expires_at=None)
    )
