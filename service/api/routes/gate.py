"""The CI gate and a run's stored gate rules."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from alphawatch.service.api import gate as gates
from alphawatch.service.api.auth import require
from alphawatch.service.api.deps import MethodDep, SettingsDep
from alphawatch.service.api.errors import documented
from alphawatch.service.api.routes.common import (
    READ_ERRORS,
    RunId,
    SessionDep,
    api_router,
    unit_of_work,
    written,
)
from alphawatch.service.api.schemas import GateRead, GateRulesRead, GateRulesWrite
from alphawatch.service.api.selections import GateQuery
from alphawatch.service.db.alerts import GateCheck
from alphawatch.service.db.tokens import TokenScope

router = api_router()

# How often a waiting gate request looks at the database: one indexed query per look.
POLL_S = 0.5


@router.get(
    "/runs/{run_id}/gate",
    response_model=GateRead,
    responses={
        **READ_ERRORS,
        409: {"model": GateRead, "description": "strict=true and the gate failed"},
    },
)
async def gate(
    run_id: RunId,
    settings: SettingsDep,
    response: Response,
    method: MethodDep,
    query: Annotated[GateQuery, Query()],
) -> dict[str, Any]:
    """CI gate: the run's gate rules, or those the query names, on its robust alpha.

    With ``wait_s``, a long poll: the verdict as soon as the step is analysed (or the run moved
    past it), else ``pending: true`` when the wait runs out.
    """
    # Async, each look on the thread pool with its own short session: a waiting request holds
    # neither a pool thread nor a database connection between two looks.
    deadline = time.monotonic() + min(query.wait_s, settings.gate_wait_max_s)
    while True:
        final = time.monotonic() >= deadline
        verdict = await run_in_threadpool(
            gates.verdict_at,
            settings=settings,
            run_id=run_id,
            query=query,
            method=method,
            final=final,
        )
        if verdict is not None:
            break
        await asyncio.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))
    if query.strict and not verdict["passed"]:
        response.status_code = 409
    return verdict


@router.get("/runs/{run_id}/gate-rules", response_model=GateRulesRead, responses=READ_ERRORS)
def get_gate_rules(run_id: RunId, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """The gate rules that apply to a run, those it stores, and its last recorded verdict."""
    return gates.rules_read(session=session, run_id=run_id, defaults=settings.gate)


@router.put(
    "/runs/{run_id}/gate-rules",
    response_model=GateRulesRead,
    responses=documented(400, 401, 403, 404, 409, 413, 422, 503),
)
def put_gate_rules(
    run_id: RunId,
    body: GateRulesWrite,
    request: Request,
    settings: SettingsDep,
    _token: Annotated[object, Depends(require(TokenScope.WRITE))],
) -> dict[str, Any]:
    """Store a run's gate rules (left out: server default; null: off); needs a write token.

    ``preset`` names a set of rules (``early-warning``) that expands to concrete ones.
    """
    check = GateCheck(
        defaults=settings.gate,
        method=settings.fit_method,
        thresholds=settings.trust,
        notify=settings.alerts.webhook_url is not None,
    )
    with unit_of_work(request) as session:
        answer = gates.rules_write(
            session=session,
            run_id=run_id,
            defaults=settings.gate,
            check=check,
            overrides=body.overrides(),
        )
    written(request)
    return answer
