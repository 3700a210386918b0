"""A run's gate alerts and their webhook deliveries."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query

from alphawatch.service.api import gate as gates
from alphawatch.service.api.routes.common import READ_ERRORS, Offset, RunId, SessionDep, api_router
from alphawatch.service.api.schemas import AlertList

router = api_router()


@router.get("/runs/{run_id}/alerts", response_model=AlertList, responses=READ_ERRORS)
def list_alerts(
    run_id: RunId,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    """A run's gate alerts (verdict changes) and their webhook deliveries, newest first."""
    return gates.alerts_read(session=session, run_id=run_id, limit=limit, offset=offset)
