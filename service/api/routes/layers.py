"""One checkpoint's layers, one layer's history and spectrum, every layer as CSV."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request, Response
from sqlalchemy.orm import Session

from alphawatch.service.api import bodies, queries, runs
from alphawatch.service.api.deps import MethodDep
from alphawatch.service.api.routes.common import (
    READ_ERRORS,
    CsvResponse,
    LayerName,
    Offset,
    RunId,
    SessionDep,
    StepPath,
    api_router,
    cached,
)
from alphawatch.service.api.schemas import CheckpointLayers, EsdRead, HistoryRead, VariantsRead
from alphawatch.service.api.selections import MaxPoints, Metric

router = api_router()


@router.get(
    "/runs/{run_id}/checkpoints/{step}/layers",
    response_model=CheckpointLayers,
    responses=READ_ERRORS,
)
def checkpoint_layers(
    run_id: RunId, step: StepPath, session: SessionDep, method: MethodDep
) -> dict[str, Any]:
    """Every layer metric of one checkpoint."""
    return runs.checkpoint_layers(session=session, run_id=run_id, step=step, method=method)


@router.get(
    "/runs/{run_id}/layers.csv",
    response_class=CsvResponse,
    responses={
        **READ_ERRORS,
        200: {
            "description": "one row per layer and analysed step",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
    },
)
def export_csv(run_id: RunId, session: SessionDep, method: MethodDep) -> CsvResponse:
    """Every layer metric of every analysed checkpoint, as CSV."""
    return CsvResponse(runs.layers_csv(session=session, run_id=run_id, method=method))


@router.get(
    "/runs/{run_id}/layers/{layer_name}/history", response_model=HistoryRead, responses=READ_ERRORS
)
async def layer_history(
    request: Request,
    run_id: RunId,
    layer_name: LayerName,
    method: MethodDep,
    metric: Metric = "alpha",
    max_points: MaxPoints = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
    offset: Offset = 0,
) -> Response:
    """One layer's metric over steps, with fit quality and status (paged, then downsampled)."""

    def build(session: Session) -> bytes:
        rows = queries.layer_history_rows(
            session=session,
            run_id=run_id,
            layer_name=layer_name,
            metric=metric,
            method=method,
            max_points=max_points,
            limit=limit,
            offset=offset,
        )
        head = {"run_id": run_id, "layer": layer_name, "metric": metric}
        return bodies.with_list(HistoryRead, head, "points", bodies.HISTORY_POINTS.points(rows))

    return await cached(request, HistoryRead, build)


@router.get("/runs/{run_id}/variants", response_model=VariantsRead, responses=READ_ERRORS)
def get_variants(run_id: RunId, session: SessionDep, method: MethodDep) -> dict[str, Any]:
    """What the latest checkpoint analysed: weights, gradients (exp_avg), nested widths."""
    return {
        "run_id": run_id,
        "variants": queries.variants(session=session, run_id=run_id, method=method),
    }


@router.get(
    "/runs/{run_id}/checkpoints/{step}/layers/{layer_name}/esd",
    response_model=EsdRead,
    responses=READ_ERRORS,
)
def get_esd(
    run_id: RunId, step: StepPath, layer_name: LayerName, session: SessionDep, method: MethodDep
) -> dict[str, Any]:
    """Eigenvalues of one layer at one step, its power-law fit and the MP bulk edge."""
    return queries.esd(
        session=session, run_id=run_id, step=step, layer_name=layer_name, method=method
    )
