"""Gate alerts: record each run's verdict, and queue a webhook delivery when it changes.

The outbox pattern. :func:`record_verdict` runs in the transaction that stores an analysed
checkpoint (``results.complete``): the verdict and, on a change, the alert row commit together with
the results or not at all, so no restart loses an alert. Delivery happens later, outside any
analysis, in a thread of each worker (``alphawatch.workers.alerts``) that claims due rows with a
lease, like jobs: a crashed sender's row is taken again when its lease runs out (at least once;
the body carries the alert ``id`` for receivers that want to drop a repeat).

What raises an alert: the verdict at the latest analysed step flipping (pass -> fail, fail ->
pass). A run's first verdict raises one only when it fails: a run that starts healthy is news to
no one, one that starts failing is.

A flapping verdict (a run near a threshold, rules PUT again and again) is coalesced, so the
receiver hears at most one alert per run per ``min_interval_s`` and always the latest verdict
last: a newer alert supersedes the run's older ones that have not gone out (they would be stale,
and sent after it they would say the opposite of the truth); a run's alert waits
``min_interval_s`` after the run's previous attempt; and an alert whose verdict is the one the
receiver was last told (the verdict flipped back meanwhile) is superseded unsent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from alphawatch.gate_rules import GateRules
from alphawatch.service.db import gate
from alphawatch.service.db.leases import lapsed
from alphawatch.service.db.models import Alert, AlertStatus, Run, RunGate
from alphawatch.service.db.session import dialect_insert, utcnow
from alphawatch.trust import Thresholds


@dataclass(frozen=True)
class GateCheck:
    """How the worker evaluates a run's gate after each analysed checkpoint."""

    defaults: GateRules  # Settings.gate: the server's rules, under each run's stored ones
    method: str  # the fit method the worker writes
    thresholds: Thresholds
    notify: bool  # a webhook is configured: queue an alert on a change of verdict


@dataclass(frozen=True)
class ClaimedAlert:
    """An alert a delivery thread holds a lease on."""

    alert_id: int
    run_id: int
    payload: bytes
    attempts: int


def _gate_row(session: Session, run_id: int) -> RunGate:
    """The run's gate row, created when missing, locked until the transaction ends."""
    session.execute(
        dialect_insert(session, RunGate)
        .values(run_id=run_id, rules="{}")
        .on_conflict_do_nothing(index_elements=["run_id"])
    )
    query = select(RunGate).where(RunGate.run_id == run_id)
    if session.get_bind().dialect.name == "postgresql":
        # Two workers finishing checkpoints of one run at once: the second waits here, then
        # evaluates with the first one's results committed and compares with its verdict.
        query = query.with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


def _verdict_word(passed: bool | None) -> str | None:
    return None if passed is None else ("pass" if passed else "fail")


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn reads &, < and > as markup: a run name must not become a link or mention.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def message_of(run_name: str, verdict: dict[str, Any], previous: bool | None) -> str:
    """The one-line, Slack-compatible ``text`` of an alert."""
    step = verdict.get("step")
    if not verdict["passed"]:
        reasons = "; ".join(v["message"] for v in verdict["violations"])
        before = "" if previous is None else " (it passed before)"
        text = f"alphawatch: run {run_name} FAILS its gate at step {step}{before}: {reasons}"
    else:
        value = verdict.get("value")
        level = f": {verdict['stat']} alpha {value:.3f}" if value is not None else ""
        text = f"alphawatch: run {run_name} passes its gate again at step {step}{level}"
    return _slack_escape(text)


def payload_of(
    alert_id: int, run: Run, verdict: dict[str, Any], previous: bool | None
) -> dict[str, Any]:
    """The JSON body POSTed for an alert: what changed, why, and ``text`` for Slack."""
    return {
        "id": alert_id,
        "run": {"id": run.id, "name": run.name},
        "step": verdict.get("step"),
        "verdict": _verdict_word(bool(verdict["passed"])),
        "previous": _verdict_word(previous),
        "stat": verdict.get("stat"),
        "value": verdict.get("value"),
        "untrusted_share": verdict.get("untrusted_share"),
        "violations": verdict["violations"],
        "text": message_of(run.name, verdict, previous),
    }


def record_verdict(session: Session, *, run_id: int, check: GateCheck) -> Alert | None:
    """Evaluate the run's gate with its stored rules, record it; the alert queued, if any."""
    row = _gate_row(session, run_id)
    rules = gate.stored_rules(session, run_id=run_id, defaults=check.defaults)
    verdict = gate.evaluate(
        session,
        run_id=run_id,
        rules=rules,
        step=None,
        method=check.method,
        thresholds=check.thresholds,
    )
    previous, passed = row.passed, bool(verdict["passed"])
    row.passed, row.step = passed, verdict["step"]
    row.violations = json.dumps(verdict["violations"])
    row.evaluated_at = utcnow()
    changed = passed is not previous if previous is not None else not passed
    if not (changed and check.notify):
        return None
    run = session.get(Run, run_id)
    assert run is not None  # the gate row's foreign key
    alert = Alert(
        run_id=run_id,
        step=verdict["step"],
        passed=passed,
        previous=previous,
        payload="{}",
        status=AlertStatus.PENDING.value,
        attempts=0,
        next_attempt_at=utcnow(),
        created_at=utcnow(),
    )
    session.add(alert)
    session.flush()  # the id goes into the body
    alert.payload = json.dumps(payload_of(alert.id, run, verdict, previous))
    _supersede_older(session, run_id=run_id)
    return alert


def set_rules(
    session: Session, *, run_id: int, overrides: dict[str, Any], defaults: GateRules
) -> GateRules:
    """Store a run's rule overrides (replacing earlier ones); the rules that now apply.

    Raises:
        ValueError: a rule out of range, or min_alpha above max_alpha once merged.
    """
    rules = defaults.merged(overrides)
    row = _gate_row(session, run_id)
    row.rules = json.dumps(overrides, sort_keys=True)
    row.rules_updated_at = utcnow()
    return rules


def gate_row(session: Session, *, run_id: int) -> RunGate | None:
    """The run's gate row (rules and last verdict), or None when nothing was stored yet."""
    return session.get(RunGate, run_id)


def list_alerts(session: Session, *, run_id: int, limit: int, offset: int) -> list[Alert]:
    """A run's alerts, newest first."""
    return list(
        session.scalars(
            select(Alert)
            .where(Alert.run_id == run_id)
            .order_by(Alert.id.desc())
            .limit(limit)
            .offset(offset)
        )
    )


def _supersede_older(session: Session, *, run_id: int | None = None) -> None:
    """Every pending alert of a run (of all runs: None) that a newer alert of its run follows.

    An alert being sent is left alone; should its attempt fail, :func:`finish` supersedes it.
    """
    newer = aliased(Alert)
    query = update(Alert).where(
        Alert.status == AlertStatus.PENDING.value,
        exists().where(and_(newer.run_id == Alert.run_id, newer.id > Alert.id)),
    )
    if run_id is not None:
        query = query.where(Alert.run_id == run_id)
    # The error of an attempt it had is kept in front of the note.
    note = func.coalesce(Alert.last_error + "; ", "") + "superseded by a newer verdict of the run"
    session.execute(
        query.values(
            status=AlertStatus.SUPERSEDED.value,
            finished_at=utcnow(),
            last_error=note,
            worker_id=None,
            lease_expires_at=None,
        ).execution_options(synchronize_session=False)
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite: naive


def recover_stale(session: Session, *, max_attempts: int) -> int:
    """Alerts whose sender died or hung mid-delivery: due again, or failed when spent."""
    now = utcnow()
    stale = lapsed(session, Alert, status=AlertStatus.SENDING.value, now=now)
    for alert in stale:
        note = "the worker sending it stopped before the receiver's answer was recorded"
        alert.last_error = note
        alert.worker_id, alert.lease_expires_at = None, None
        if alert.attempts >= max_attempts:
            alert.status, alert.finished_at = AlertStatus.FAILED.value, now
        else:
            alert.status, alert.next_attempt_at = AlertStatus.PENDING.value, now
    if stale:
        session.flush()
        _supersede_older(session)
    return len(stale)


def claim(
    session: Session, *, worker_id: str, lease_s: float, min_interval_s: float = 0.0
) -> ClaimedAlert | None:
    """Take the oldest due alert whose run has no earlier alert undelivered; commits at once.

    One run's alerts go out in order: a "passes again" never overtakes the "fails" it follows
    while that one waits for a retry, and an older alert still pending when a newer one exists is
    superseded, never sent after it. On the way, a due alert is skipped for good (superseded)
    when its verdict is the one the run's latest attempted alert delivered, or put off until
    ``min_interval_s`` after the run's latest attempt.
    """
    now = utcnow()
    # On SQLite this write also takes the database's write lock, so the senders' claims run
    # one after the other there (PostgreSQL's row locks below do that for the claim itself).
    _supersede_older(session)
    earlier = aliased(Alert)
    open_ = (AlertStatus.PENDING.value, AlertStatus.SENDING.value)
    query = (
        select(Alert)
        .where(
            Alert.status == AlertStatus.PENDING.value,
            Alert.next_attempt_at <= now,
            ~exists().where(
                and_(
                    earlier.run_id == Alert.run_id, earlier.id < Alert.id, earlier.status.in_(open_)
                )
            ),
        )
        .order_by(Alert.id)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        # Several workers deliver: each skips the rows another is taking instead of waiting.
        query = query.with_for_update(skip_locked=True, of=Alert)
    while (alert := session.scalars(query).first()) is not None:
        told = session.scalars(
            select(Alert)
            .where(Alert.run_id == alert.run_id, Alert.id < alert.id, Alert.attempts > 0)
            .order_by(Alert.id.desc())
            .limit(1)
        ).first()
        if (
            told is not None
            and told.status == AlertStatus.DELIVERED.value
            and told.passed == alert.passed
        ):
            alert.status, alert.finished_at = AlertStatus.SUPERSEDED.value, now
            alert.last_error = (
                f"not sent: the run's verdict is back to the one alert {told.id} delivered"
            )
            session.flush()
            continue
        last = session.scalar(
            select(func.max(Alert.last_attempt_at)).where(
                Alert.run_id == alert.run_id, Alert.id != alert.id
            )
        )
        if last is not None and _aware(last) + timedelta(seconds=min_interval_s) > now:
            alert.next_attempt_at = _aware(last) + timedelta(seconds=min_interval_s)
            session.flush()
            continue
        alert.status, alert.worker_id = AlertStatus.SENDING.value, worker_id
        alert.attempts += 1
        alert.last_attempt_at = now
        alert.lease_expires_at = now + timedelta(seconds=lease_s)
        claimed = ClaimedAlert(
            alert_id=alert.id,
            run_id=alert.run_id,
            payload=alert.payload.encode(),
            attempts=alert.attempts,
        )
        # Committed before the request goes out: the lease must be visible to other senders.
        session.commit()
        return claimed
    session.commit()
    return None


def finish(
    session: Session,
    *,
    alert_id: int,
    worker_id: str,
    status_code: int | None,
    error: str | None,
    retry_in_s: float | None,
) -> bool:
    """Record one attempt: delivered (no error), due again in ``retry_in_s``, or failed.

    An attempt to retry is superseded instead when a newer alert of its run exists.

    Returns False when this worker no longer held the alert (its lease ran out meanwhile).
    """
    now = utcnow()
    values: dict[str, Any] = {
        "last_status_code": status_code,
        "last_error": error,
        "worker_id": None,
        "lease_expires_at": None,
    }
    if error is None:
        values.update(status=AlertStatus.DELIVERED.value, finished_at=now)
    elif retry_in_s is not None:
        values.update(
            status=AlertStatus.PENDING.value, next_attempt_at=now + timedelta(seconds=retry_in_s)
        )
    else:
        values.update(status=AlertStatus.FAILED.value, finished_at=now)
    result = session.execute(
        update(Alert)
        .where(
            Alert.id == alert_id,
            Alert.worker_id == worker_id,
            Alert.status == AlertStatus.SENDING.value,
        )
        .values(**values)
    )
    if error is not None and retry_in_s is not None:
        # A verdict that changed while this attempt was out makes its retry stale.
        run_id = session.scalar(select(Alert.run_id).where(Alert.id == alert_id))
        if run_id is not None:
            _supersede_older(session, run_id=run_id)
    return bool(getattr(result, "rowcount", 0))


def next_due_in(session: Session) -> float | None:
    """Seconds until the earliest pending alert is due (<= 0: now); None when none is pending."""
    due = session.scalar(
        select(func.min(Alert.next_attempt_at)).where(Alert.status == AlertStatus.PENDING.value)
    )
    if due is None:
        return None
    return (_aware(due) - utcnow()).total_seconds()
