"""The CI gate and a run's stored gate rules: the API's side of ``service.db.gate``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from alphawatch.gate_rules import GateRules
from alphawatch.service.api import queries
from alphawatch.service.api.errors import Conflict, Invalid
from alphawatch.service.api.selections import GateQuery
from alphawatch.service.db import alerts
from alphawatch.service.db import gate as gates
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import DEFAULT_VARIANT


def _reason(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'rules'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
    return str(exc)


def _rules(
    session: Session, *, run_id: int, query: dict[str, Any], defaults: GateRules
) -> GateRules:
    try:
        return gates.stored_rules(session, run_id=run_id, defaults=defaults).merged(
            query, empty_band_allowed=True
        )
    except ValueError as exc:
        raise Invalid(_reason(exc)) from exc


def evaluate(
    *,
    session: Session,
    run_id: int,
    step: int | None,
    query: dict[str, Any],
    defaults: GateRules,
    method: str,
    thresholds: Thresholds,
    variant: str = DEFAULT_VARIANT,
) -> dict[str, Any]:
    """The gate at ``step`` (default: latest analysed) under the run's rules and ``query``'s.

    The rules are the server's defaults, then the run's stored rules, then every rule the query
    names (a query may name an empty band: the gate then fails rather than refusing).
    """
    queries.get_run(session=session, run_id=run_id)
    rules = _rules(session, run_id=run_id, query=query, defaults=defaults)
    return gates.evaluate(
        session,
        run_id=run_id,
        rules=rules,
        step=step,
        method=method,
        thresholds=thresholds,
        variant=variant,
    )


def verdict_at(
    *,
    settings: Settings,
    run_id: int,
    query: GateQuery,
    method: str,
    final: bool,
) -> dict[str, Any] | None:
    """The gate's verdict with ``pending`` set; None while pending unless ``final``.

    One short session: a waiting request holds no connection between two looks.
    """
    with session_scope(make_engine(settings.database_url)) as session:
        queries.get_run(session=session, run_id=run_id)
        # A bad query is refused at once, not after the wait.
        _rules(session, run_id=run_id, query=query.rules(), defaults=settings.gate)
        waiting = gates.pending(session, run_id=run_id, step=query.step)
        if waiting and not final:
            return None
        verdict = evaluate(
            session=session,
            run_id=run_id,
            step=query.step,
            query=query.rules(),
            defaults=settings.gate,
            method=method,
            thresholds=settings.trust,
            variant=query.variant,
        )
    verdict["pending"] = waiting
    return verdict


def rules_read(*, session: Session, run_id: int, defaults: GateRules) -> dict[str, Any]:
    """The rules that apply to a run, what it overrides, the server's defaults, the verdict."""
    queries.get_run(session=session, run_id=run_id)
    row = alerts.gate_row(session, run_id=run_id)
    overrides: dict[str, Any] = json.loads(row.rules) if row is not None else {}
    verdict = None
    if row is not None and row.passed is not None:
        verdict = {
            "passed": row.passed,
            "step": row.step,
            "violations": json.loads(row.violations or "[]"),
            "evaluated_at": row.evaluated_at,
        }
    return {
        "run_id": run_id,
        "rules": gates.stored_rules(session, run_id=run_id, defaults=defaults),
        "overrides": overrides,
        "defaults": defaults,
        "updated_at": row.rules_updated_at if row is not None else None,
        "last_verdict": verdict,
    }


def rules_write(
    *,
    session: Session,
    run_id: int,
    overrides: dict[str, Any],
    defaults: GateRules,
    check: alerts.GateCheck,
) -> dict[str, Any]:
    """Replace a run's stored rules, then record its verdict under them (alerting on a change).

    Raises:
        NotFound: no such run.
        Invalid: a rule the schema cannot refuse, e.g. a null ``stat``.
        Conflict: the rules contradict each other once merged with the server's defaults
            (min_alpha above max_alpha). Not 422: the body alone may be valid, as
            ``{"min_alpha": 7}`` is against a server whose max_alpha is 6.
    """
    queries.get_run(session=session, run_id=run_id)
    try:
        empty = defaults.merged(overrides, empty_band_allowed=True).empty_band()
    except ValueError as exc:
        raise Invalid(_reason(exc)) from exc
    if empty is not None:
        raise Conflict(
            f"{empty}; the server's defaults are min_alpha {defaults.min_alpha}, "
            f"max_alpha {defaults.max_alpha}"
        )
    alerts.set_rules(session, run_id=run_id, overrides=overrides, defaults=defaults)
    if queries.done_checkpoints(session=session, run_id=run_id):
        # New rules can flip the verdict as much as a new checkpoint can.
        alerts.record_verdict(session, run_id=run_id, check=check)
    return rules_read(session=session, run_id=run_id, defaults=defaults)


def alerts_read(*, session: Session, run_id: int, limit: int, offset: int) -> dict[str, Any]:
    """A page of a run's alerts with their delivery state, newest first."""
    queries.get_run(session=session, run_id=run_id)
    rows = alerts.list_alerts(session, run_id=run_id, limit=limit, offset=offset)
    return {
        "run_id": run_id,
        "alerts": [
            {
                "id": a.id,
                "step": a.step,
                "verdict": "pass" if a.passed else "fail",
                "previous": None if a.previous is None else ("pass" if a.previous else "fail"),
                "status": a.status,
                "attempts": a.attempts,
                "last_status_code": a.last_status_code,
                "last_error": a.last_error,
                "created_at": a.created_at,
                "next_attempt_at": a.next_attempt_at,
                "finished_at": a.finished_at,
                "body": json.loads(a.payload),
            }
            for a in rows
        ],
    }
