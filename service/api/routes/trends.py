"""Model-level views over the checkpoints: trends, per-block trends, heatmaps, flags, compare.

Each route takes its selection as one query model (:mod:`~alphawatch.service.api.selections`)
and hands it whole to its query; answers come from the result cache when nothing changed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request, Response
from sqlalchemy.orm import Session

from alphawatch.service.api import bodies, distances, queries
from alphawatch.service.api.deps import MethodDep, SettingsDep
from alphawatch.service.api.routes.common import (
    READ_ERRORS,
    CsvResponse,
    RunId,
    SessionDep,
    api_router,
    cached,
)
from alphawatch.service.api.schemas import (
    BlockTrendRead,
    CompareRead,
    DistancesRead,
    FlagsRead,
    HeatmapRead,
    TrendRead,
)
from alphawatch.service.api.selections import (
    BlockQuery,
    CompareQuery,
    DistanceQuery,
    HeatmapQuery,
    TrendQuery,
    Variant,
)
from alphawatch.vocabulary import DEFAULT_VARIANT

router = api_router()


@router.get("/runs/{run_id}/trend", response_model=TrendRead, responses=READ_ERRORS)
async def get_trend(
    request: Request,
    run_id: RunId,
    settings: SettingsDep,
    method: MethodDep,
    query: Annotated[TrendQuery, Query()],
) -> Response:
    """Model-level robust statistic of a metric per checkpoint, with exclusions explained."""

    def build(session: Session) -> bytes:
        rows = queries.trend_rows(
            session=session, run_id=run_id, query=query, method=method, thresholds=settings.trust
        )
        head = {
            "run_id": run_id,
            "metric": query.metric,
            "stat": query.stat,
            "filter": query.filter,
            "method": method,
            "outliers": query.outliers,
            "variant": query.variant,
        }
        return bodies.with_list(TrendRead, head, "points", bodies.TREND_POINTS.points(rows))

    return await cached(request, TrendRead, build)


@router.get("/runs/{run_id}/heatmap", response_model=HeatmapRead, responses=READ_ERRORS)
async def get_heatmap(
    request: Request, run_id: RunId, method: MethodDep, query: Annotated[HeatmapQuery, Query()]
) -> Response:
    """Layer x step matrix of a metric; layers ordered by block (or last block first), then kind."""
    return await cached(
        request,
        HeatmapRead,
        lambda session: queries.heatmap(session=session, run_id=run_id, query=query, method=method),
    )


@router.get("/runs/{run_id}/distances", response_model=DistancesRead, responses=READ_ERRORS)
async def get_distances(
    request: Request, run_id: RunId, method: MethodDep, query: Annotated[DistanceQuery, Query()]
) -> Response:
    """Layer x step distances from the checkpoint before; layers ranked by change between steps."""
    return await cached(
        request,
        DistancesRead,
        lambda session: distances.distances(
            session=session, run_id=run_id, query=query, method=method
        ),
    )


@router.get(
    "/runs/{run_id}/distances.csv",
    response_class=CsvResponse,
    responses={
        **READ_ERRORS,
        200: {
            "description": "one row per layer and analysed step with a measured distance",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
    },
)
def export_distances(run_id: RunId, session: SessionDep, method: MethodDep) -> CsvResponse:
    """Every stored layer distance of a run, as CSV."""
    return CsvResponse(distances.distances_csv(session=session, run_id=run_id, method=method))


@router.get("/runs/{run_id}/blocks", response_model=BlockTrendRead, responses=READ_ERRORS)
async def get_block_trends(
    request: Request,
    run_id: RunId,
    settings: SettingsDep,
    method: MethodDep,
    query: Annotated[BlockQuery, Query()],
) -> Response:
    """The robust statistic of each block over the checkpoints, the last block first."""

    def build(session: Session) -> bytes:
        blocks = queries.block_trend_rows(
            session=session, run_id=run_id, query=query, method=method, thresholds=settings.trust
        )
        head = {
            "run_id": run_id,
            "metric": query.metric,
            "stat": query.stat,
            "filter": query.filter,
            "variant": query.variant,
            "order": query.order,
        }
        return bodies.with_list(BlockTrendRead, head, "blocks", bodies.block_trends(blocks))

    return await cached(request, BlockTrendRead, build)


@router.get("/runs/{run_id}/flags", response_model=FlagsRead, responses=READ_ERRORS)
async def get_flags(
    request: Request, run_id: RunId, method: MethodDep, variant: Variant = DEFAULT_VARIANT
) -> Response:
    """Per checkpoint: how many layers carry each flag and each fit status."""
    return await cached(
        request,
        FlagsRead,
        lambda session: {
            "run_id": run_id,
            "points": queries.flags(session=session, run_id=run_id, method=method, variant=variant),
        },
    )


@router.get("/compare", response_model=CompareRead, responses=READ_ERRORS)
async def compare(
    request: Request,
    settings: SettingsDep,
    method: MethodDep,
    query: Annotated[CompareQuery, Query()],
) -> Response:
    """Robust trends of several runs, to overlay."""
    return await cached(
        request,
        CompareRead,
        lambda session: queries.compare(
            session=session, query=query, method=method, thresholds=settings.trust
        ),
    )
