"""Liveness and Prometheus metrics: outside /api/v1, for load balancers and scrapers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from alphawatch.service.api import metrics as metrics_
from alphawatch.service.api import runs
from alphawatch.service.api.auth import read_access
from alphawatch.service.api.deps import SettingsDep
from alphawatch.service.api.errors import documented
from alphawatch.service.api.routes.common import SessionDep
from alphawatch.service.api.schemas import HealthDegraded, HealthRead

health_router = APIRouter()


@health_router.get(
    "/health",
    responses={
        **documented(503),
        503: {
            "model": HealthDegraded,
            "description": "the database is unreachable, or the embedded worker is down",
        },
    },
)
@health_router.get("/api/v1/health", include_in_schema=False)
def health(session: SessionDep, request: Request) -> Any:
    """Liveness, database reachability and, under `alphawatch up`, the worker's state."""
    runs.ping(session=session)
    liveness: Callable[[], str | None] | None = request.app.state.liveness
    reason = liveness() if liveness is not None else None
    if reason is not None:
        return JSONResponse(
            HealthDegraded(detail=f"degraded: {reason}", reason=reason).model_dump(),
            status_code=503,
        )
    return HealthRead(status="ok")


@health_router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(read_access)],
    responses=documented(503),
)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: per run alpha, untrusted share, gate, last step; analyses; queue."""
    return Response(
        metrics_.metrics_text(
            session=session, method=settings.fit_method, thresholds=settings.trust
        ),
        media_type=metrics_.CONTENT_TYPE,
    )
