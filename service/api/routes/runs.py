"""Runs and their checkpoints: register, list, read, delete, scan now."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response

from alphawatch.service.api import runs
from alphawatch.service.api.auth import require
from alphawatch.service.api.deps import SettingsDep
from alphawatch.service.api.errors import documented
from alphawatch.service.api.routes.common import (
    READ_ERRORS,
    Offset,
    RunId,
    SessionDep,
    api_router,
    unit_of_work,
    written,
)
from alphawatch.service.api.schemas import (
    CheckpointList,
    RunCreate,
    RunDetail,
    RunList,
    RunRead,
    ScanRequested,
)
from alphawatch.service.db.tokens import TokenScope

router = api_router()


@router.get("/runs", response_model=RunList, responses=documented(422, 503))
def list_runs(
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Runs with their status counts, last step and latest robust alpha."""
    return runs.list_runs(
        session=session,
        limit=limit,
        offset=offset,
        thresholds=settings.trust,
        method=settings.fit_method,
    )


@router.post(
    "/runs",
    status_code=201,
    response_model=RunRead,
    responses=documented(400, 401, 403, 409, 413, 422, 503),
)
def create_run(
    body: RunCreate,
    request: Request,
    settings: SettingsDep,
    _token: Annotated[object, Depends(require(TokenScope.WRITE))],
) -> dict[str, Any]:
    """Register a run directory or object-store URL (under an allowed root); needs a write
    token."""
    path = runs.allowed_location(
        body.path, allowed_roots=settings.allowed_roots, url_roots=settings.allowed_url_roots
    )
    with unit_of_work(request) as session:
        created = runs.create(
            session=session,
            name=body.name,
            path=path,
            thresholds=settings.trust,
            method=settings.fit_method,
        )
    written(request)
    return created


@router.get("/runs/{run_id}", response_model=RunDetail, responses=READ_ERRORS)
def get_run(run_id: RunId, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """One run, with the thresholds applied to its trust verdicts."""
    return runs.get(
        session=session,
        run_id=run_id,
        trust=settings.trust,
        method=settings.fit_method,
        crosscheck=settings.crosscheck,
    )


@router.delete("/runs/{run_id}", status_code=204, responses=documented(401, 403, 404, 422, 503))
def delete_run(
    run_id: RunId, request: Request, _token: Annotated[object, Depends(require(TokenScope.ADMIN))]
) -> Response:
    """Delete a run and everything stored for it (not its files); needs an admin token."""
    with unit_of_work(request) as session:
        runs.delete_run(session=session, run_id=run_id)
    written(request)
    return Response(status_code=204)


@router.post(
    "/runs/{run_id}/scan",
    status_code=202,
    response_model=ScanRequested,
    responses=documented(401, 403, 404, 422, 503),
)
def request_scan(
    run_id: RunId, request: Request, _token: Annotated[object, Depends(require(TokenScope.WRITE))]
) -> dict[str, Any]:
    """Ask the workers to scan a run now (e.g. after each checkpoint save); needs a write token."""
    with unit_of_work(request) as session:
        return runs.request_scan(session=session, run_id=run_id)


@router.get("/runs/{run_id}/checkpoints", response_model=CheckpointList, responses=READ_ERRORS)
def list_checkpoints(
    run_id: RunId,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Checkpoints of a run with analysis status, timings and errors."""
    return runs.checkpoints(session=session, run_id=run_id, limit=limit, offset=offset)
