"""REST routes under /api/v1: parameters in, one service call, the answer out.

Reads use a session closed when the route returns. A write commits in the route, and drops
this process's kept answers, before it answers: the next request on any connection sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.orm import Session

from alphawatch.service.api import gate as gates
from alphawatch.service.api import metrics as metrics_
from alphawatch.service.api import queries, runs
from alphawatch.service.api.auth import read_access, require
from alphawatch.service.api.cache import ResultCache
from alphawatch.service.api.deps import MethodDep, SettingsDep
from alphawatch.service.api.errors import documented
from alphawatch.service.api.schemas import (
    AlertList,
    BlockTrendRead,
    CheckpointLayers,
    CheckpointList,
    CompareRead,
    EsdRead,
    FlagsRead,
    GateRead,
    GateRulesRead,
    GateRulesWrite,
    HealthDegraded,
    HealthRead,
    HeatmapRead,
    HistoryRead,
    RunCreate,
    RunDetail,
    RunList,
    RunRead,
    ScanRequested,
    TrendRead,
    VariantsRead,
)
from alphawatch.service.db.alerts import GateCheck
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope
from alphawatch.settings import Settings
from alphawatch.vocabulary import (
    DEFAULT_FILTER,
    DEFAULT_OUTLIER_RULE,
    DEFAULT_STATISTIC,
    DEFAULT_VARIANT,
    VARIANT_PATTERN,
    LayerFilter,
    LayerOrder,
    OutlierRule,
    Statistic,
)


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(make_engine(request.app.state.settings.database_url)) as session:
        yield session


# scope="function": the session ends when the route returns, before the answer is sent.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


class CsvResponse(PlainTextResponse):
    media_type = "text/csv"


router = APIRouter(prefix="/api/v1", dependencies=[Depends(read_access)])
health_router = APIRouter()

# The schema lists the metrics, so a client (or a fuzzer) knows which names are valid.
MetricName = Literal[tuple(queries.numeric_metrics())]  # type: ignore[valid-type]
Metric = Annotated[MetricName, Query(description="a numeric layer metric")]  # type: ignore[valid-type]
# The gate bands a level of alpha: its schema offers the statistics that are levels, only.
LevelName = Literal[tuple(s.value for s in Statistic if s.is_level)]  # type: ignore[valid-type]
# Database integer ranges: a larger id or step is a bad request, not a database error.
INT32, INT64 = 2**31 - 1, 2**63 - 1
RunId = Annotated[int, PathParam(ge=1, le=INT32, description="run id")]
StepPath = Annotated[int, PathParam(ge=0, le=INT64, description="training step")]
LayerName = Annotated[str, PathParam(max_length=512, description="layer name")]
Variant = Annotated[str, Query(max_length=16, pattern=VARIANT_PATTERN,
                               description="weight (default), exp_avg (gradients) or a nested "
                                           "width w<k>; variants are never mixed")]
KindList = Annotated[str | None,
                     Query(max_length=200, description="comma-separated kinds: q,k,v,o,...")]
BlockBound = Annotated[int | None, Query(ge=0, le=2**31 - 1)]
MaxPoints = Annotated[int | None, Query(ge=2, le=100_000, description="downsample to N steps")]

READ_ERRORS = documented(404, 422, 503)


def _unit_of_work(request: Request) -> AbstractContextManager[Session]:
    """A session that commits when its block ends: a write route answers after that."""
    return session_scope(make_engine(request.app.state.settings.database_url))


def _written(request: Request) -> None:
    # Committed already; other API processes hear of it through NOTIFY.
    cache: ResultCache | None = request.app.state.cache
    if cache is not None:
        cache.invalidate()


def _compute(settings: Settings, build: Callable[[Session], dict[str, Any]],
             adapter: TypeAdapter[Any]) -> bytes:
    with session_scope(make_engine(settings.database_url)) as session:
        answer = build(session)
    # Validated like any response model: a kept answer is as checked as a fresh one.
    return adapter.dump_json(adapter.validate_python(answer))


_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}


async def _cached(request: Request, model: type[BaseModel],
                  build: Callable[[Session], dict[str, Any]]) -> Response:
    """The JSON body ``build`` makes, from the result cache when the results have not changed.

    On a hit no thread, session or query is involved; on a miss ``build`` runs on the thread
    pool with its own session, and its body is kept under the version read before it ran.
    """
    settings: Settings = request.app.state.settings
    cache: ResultCache | None = request.app.state.cache
    adapter = _ADAPTERS.get(model) or _ADAPTERS.setdefault(model, TypeAdapter(model))
    if cache is None:
        return Response(await run_in_threadpool(_compute, settings, build, adapter),
                        media_type="application/json")
    key = f"{request.url.path}?{sorted(request.query_params.multi_items())}"
    body = cache.get(key)
    if body is not None:
        return Response(body, media_type="application/json", headers={"X-Cache": "hit"})
    version = cache.version()
    body = await run_in_threadpool(_compute, settings, build, adapter)
    cache.put(key, version, body)
    return Response(body, media_type="application/json", headers={"X-Cache": "miss"})


def _kinds(kind: str | None) -> list[str] | None:
    if not kind:
        return None
    return [k.strip() for k in kind.split(",") if k.strip()]


@health_router.get("/health", responses={
    **documented(503), 503: {"model": HealthDegraded, "description":
                             "the database is unreachable, or the embedded worker is down"}})
@health_router.get("/api/v1/health", include_in_schema=False)
def health(session: SessionDep, request: Request) -> Any:
    """Liveness, database reachability and, under `alphawatch up`, the worker's state."""
    runs.ping(session=session)
    liveness: Callable[[], str | None] | None = request.app.state.liveness
    reason = liveness() if liveness is not None else None
    if reason is not None:
        return JSONResponse(HealthDegraded(detail=f"degraded: {reason}", reason=reason)
                            .model_dump(), status_code=503)
    return HealthRead(status="ok")


@health_router.get("/metrics", response_class=PlainTextResponse,
                   dependencies=[Depends(read_access)], responses=documented(503))
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: per run alpha, untrusted share, gate, last step; analyses; queue."""
    return Response(metrics_.metrics_text(session=session, method=settings.fit_method,
                                          thresholds=settings.trust),
                    media_type=metrics_.CONTENT_TYPE)


@router.get("/runs", response_model=RunList, responses=documented(422, 503))
def list_runs(session: SessionDep, settings: SettingsDep,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=INT64)] = 0) -> dict[str, Any]:
    """Runs with their status counts, last step and latest robust alpha."""
    return runs.list_runs(session=session, limit=limit, offset=offset,
                          thresholds=settings.trust, method=settings.fit_method)


@router.post("/runs", status_code=201, response_model=RunRead,
             responses=documented(400, 401, 403, 409, 413, 422, 503))
def create_run(body: RunCreate, request: Request, settings: SettingsDep,
               _token: Annotated[object, Depends(require(TokenScope.WRITE))]) -> dict[str, Any]:
    """Register a run directory (must lie under an allowed root); needs a write token."""
    path = runs.allowed_path(body.path, allowed_roots=settings.allowed_roots)
    with _unit_of_work(request) as session:
        created = runs.create(session=session, name=body.name, path=path,
                              thresholds=settings.trust, method=settings.fit_method)
    _written(request)
    return created


@router.get("/runs/{run_id}", response_model=RunDetail, responses=READ_ERRORS)
def get_run(run_id: RunId, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """One run, with the thresholds applied to its trust verdicts."""
    return runs.get(session=session, run_id=run_id, trust=settings.trust,
                    method=settings.fit_method, crosscheck=settings.crosscheck)


@router.delete("/runs/{run_id}", status_code=204,
               responses=documented(401, 403, 404, 422, 503))
def delete_run(run_id: RunId, request: Request,
               _token: Annotated[object, Depends(require(TokenScope.ADMIN))]) -> Response:
    """Delete a run and everything stored for it (not its files); needs an admin token."""
    with _unit_of_work(request) as session:
        runs.delete_run(session=session, run_id=run_id)
    _written(request)
    return Response(status_code=204)


@router.post("/runs/{run_id}/scan", status_code=202, response_model=ScanRequested,
             responses=documented(401, 403, 404, 422, 503))
def request_scan(run_id: RunId, request: Request,
                 _token: Annotated[object, Depends(require(TokenScope.WRITE))]) -> dict[str, Any]:
    """Ask the workers to scan a run now (e.g. after each checkpoint save); needs a write token."""
    with _unit_of_work(request) as session:
        return runs.request_scan(session=session, run_id=run_id)


@router.get("/runs/{run_id}/checkpoints", response_model=CheckpointList, responses=READ_ERRORS)
def list_checkpoints(run_id: RunId, session: SessionDep,
                     limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
                     offset: Annotated[int, Query(ge=0, le=INT64)] = 0) -> dict[str, Any]:
    """Checkpoints of a run with analysis status, timings and errors."""
    return runs.checkpoints(session=session, run_id=run_id, limit=limit, offset=offset)


@router.get("/runs/{run_id}/checkpoints/{step}/layers", response_model=CheckpointLayers,
            responses=READ_ERRORS)
def checkpoint_layers(run_id: RunId, step: StepPath, session: SessionDep,
                      method: MethodDep) -> dict[str, Any]:
    """Every layer metric of one checkpoint."""
    return runs.checkpoint_layers(session=session, run_id=run_id, step=step, method=method)


@router.get("/runs/{run_id}/layers.csv", response_class=CsvResponse, responses={
    **READ_ERRORS, 200: {"description": "one row per layer and analysed step",
                         "content": {"text/csv": {"schema": {"type": "string"}}}}})
def export_csv(run_id: RunId, session: SessionDep, method: MethodDep) -> CsvResponse:
    """Every layer metric of every analysed checkpoint, as CSV."""
    return CsvResponse(runs.layers_csv(session=session, run_id=run_id, method=method))


@router.get("/runs/{run_id}/layers/{layer_name}/history", response_model=HistoryRead,
            responses=READ_ERRORS)
async def layer_history(request: Request, run_id: RunId, layer_name: LayerName,
                        method: MethodDep, metric: Metric = "alpha",
                        max_points: MaxPoints = None,
                        limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
                        offset: Annotated[int, Query(ge=0, le=INT64)] = 0) -> Response:
    """One layer's metric over steps, with fit quality and status (paged, then downsampled)."""

    def build(session: Session) -> dict[str, Any]:
        points = queries.layer_history(session=session, run_id=run_id, layer_name=layer_name,
                                       metric=metric, method=method, max_points=max_points,
                                       limit=limit, offset=offset)
        return {"run_id": run_id, "layer": layer_name, "metric": metric, "points": points}

    return await _cached(request, HistoryRead, build)


@router.get("/runs/{run_id}/trend", response_model=TrendRead, responses=READ_ERRORS)
async def get_trend(
    request: Request, run_id: RunId, settings: SettingsDep, method: MethodDep,
    metric: Metric = "alpha",
    stat: Annotated[Statistic, Query()] = DEFAULT_STATISTIC,
    filter: Annotated[LayerFilter, Query()] = DEFAULT_FILTER,
    kind: Annotated[str | None,
                    Query(max_length=200, description="comma-separated kinds: q,k,v,o,...")] = None,
    block_min: Annotated[int | None, Query(ge=0, le=INT32)] = None,
    block_max: Annotated[int | None, Query(ge=0, le=INT32)] = None,
    outliers: Annotated[OutlierRule, Query()] = DEFAULT_OUTLIER_RULE,
    mad_k: Annotated[float | None, Query(gt=0, le=100,
                                         description="default: the server's trust.mad_k")] = None,
    max_points: MaxPoints = None,
    variant: Variant = DEFAULT_VARIANT,
) -> Response:
    """Model-level robust statistic of a metric per checkpoint, with exclusions explained."""

    def build(session: Session) -> dict[str, Any]:
        points = queries.trend(session=session, run_id=run_id, metric=metric, stat=stat,
                               filter=filter, method=method, kinds=_kinds(kind),
                               block_min=block_min, block_max=block_max, outliers=outliers,
                               mad_k=mad_k, thresholds=settings.trust,
                               max_points=max_points, variant=variant)
        return {"run_id": run_id, "metric": metric, "stat": stat, "filter": filter,
                "method": method, "outliers": outliers, "variant": variant, "points": points}

    return await _cached(request, TrendRead, build)


@router.get("/runs/{run_id}/heatmap", response_model=HeatmapRead, responses=READ_ERRORS)
async def get_heatmap(request: Request, run_id: RunId, method: MethodDep,
                      metric: Metric = "alpha", max_points: MaxPoints = 500,
                      variant: Variant = DEFAULT_VARIANT, kind: KindList = None,
                      block_min: BlockBound = None, block_max: BlockBound = None,
                      order: Annotated[LayerOrder, Query()] = LayerOrder.BLOCK) -> Response:
    """Layer x step matrix of a metric; layers ordered by block (or last block first), then kind."""
    return await _cached(request, HeatmapRead, lambda session: queries.heatmap(
        session=session, run_id=run_id, metric=metric, method=method, max_points=max_points,
        variant=variant, kinds=_kinds(kind), block_min=block_min, block_max=block_max,
        order=order))


@router.get("/runs/{run_id}/blocks", response_model=BlockTrendRead, responses=READ_ERRORS)
async def get_block_trends(
    request: Request, run_id: RunId, settings: SettingsDep, method: MethodDep,
    metric: Metric = "alpha",
    stat: Annotated[Statistic, Query()] = DEFAULT_STATISTIC,
    filter: Annotated[LayerFilter, Query()] = DEFAULT_FILTER,
    kind: KindList = None, variant: Variant = DEFAULT_VARIANT,
    outliers: Annotated[OutlierRule, Query()] = DEFAULT_OUTLIER_RULE,
    mad_k: Annotated[float | None, Query(gt=0, le=100)] = None,
    order: Annotated[LayerOrder, Query()] = LayerOrder.BLOCK_DESC,
    max_points: MaxPoints = 500,
) -> Response:
    """The robust statistic of each block over the checkpoints, the last block first."""

    def build(session: Session) -> dict[str, Any]:
        blocks = queries.block_trends(session=session, run_id=run_id, metric=metric, stat=stat,
                                      filter=filter, method=method, variant=variant,
                                      kinds=_kinds(kind), outliers=outliers, mad_k=mad_k,
                                      thresholds=settings.trust, max_points=max_points,
                                      order=order)
        return {"run_id": run_id, "metric": metric, "stat": stat, "filter": filter,
                "variant": variant, "order": order, "blocks": blocks}

    return await _cached(request, BlockTrendRead, build)


@router.get("/runs/{run_id}/variants", response_model=VariantsRead, responses=READ_ERRORS)
def get_variants(run_id: RunId, session: SessionDep, method: MethodDep) -> dict[str, Any]:
    """What the latest checkpoint analysed: weights, gradients (exp_avg), nested widths."""
    return {"run_id": run_id,
            "variants": queries.variants(session=session, run_id=run_id, method=method)}


@router.get("/runs/{run_id}/flags", response_model=FlagsRead, responses=READ_ERRORS)
async def get_flags(request: Request, run_id: RunId, method: MethodDep,
                    variant: Variant = DEFAULT_VARIANT) -> Response:
    """Per checkpoint: how many layers carry each flag and each fit status."""
    return await _cached(request, FlagsRead, lambda session: {
        "run_id": run_id, "points": queries.flags(session=session, run_id=run_id,
                                                  method=method, variant=variant)})


@router.get("/runs/{run_id}/checkpoints/{step}/layers/{layer_name}/esd",
            response_model=EsdRead, responses=READ_ERRORS)
def get_esd(run_id: RunId, step: StepPath, layer_name: LayerName, session: SessionDep,
            method: MethodDep) -> dict[str, Any]:
    """Eigenvalues of one layer at one step, its power-law fit and the MP bulk edge."""
    return queries.esd(session=session, run_id=run_id, step=step, layer_name=layer_name,
                       method=method)


@router.get("/runs/{run_id}/gate", response_model=GateRead,
            responses={**READ_ERRORS, 409: {"model": GateRead,
                                            "description": "strict=true and the gate failed"}})
def gate(
    run_id: RunId, session: SessionDep, settings: SettingsDep, response: Response,
    method: MethodDep,
    stat: Annotated[LevelName | None,  # type: ignore[valid-type]
                    Query(description="a level of alpha (a spread cannot be gated); "
                                      "default: the run's gate rules")] = None,
    filter: Annotated[LayerFilter | None, Query(description="default: the run's gate rules")
                      ] = None,
    step: Annotated[int | None, Query(ge=0, le=INT64,
                                      description="default: the latest analysed")] = None,
    min_alpha: Annotated[float | None, Query(
        allow_inf_nan=False,
        description="default: the run's gate rules (server: 2, over-trained)")] = None,
    max_alpha: Annotated[float | None, Query(
        allow_inf_nan=False,
        description="default: the run's gate rules (server: 6, under-trained)")] = None,
    max_untrusted_share: Annotated[float | None, Query(ge=0, le=1)] = None,
    ref_step: Annotated[int | None, Query(ge=0, le=INT64)] = None,
    max_delta: Annotated[float | None, Query(
        ge=0, allow_inf_nan=False,
        description="without ref_step: since the analysed checkpoint before")] = None,
    strict: Annotated[bool, Query(description="answer 409 when the gate fails")] = False,
    variant: Variant = DEFAULT_VARIANT,
) -> dict[str, Any]:
    """CI gate: the run's gate rules, or those the query names, on its robust alpha."""
    named = {"stat": stat, "filter": filter, "min_alpha": min_alpha, "max_alpha": max_alpha,
             "max_untrusted_share": max_untrusted_share, "ref_step": ref_step,
             "max_delta": max_delta}
    verdict = gates.evaluate(
        session=session, run_id=run_id, step=step,
        query={k: v for k, v in named.items() if v is not None},
        defaults=settings.gate, method=method, thresholds=settings.trust, variant=variant)
    if strict and not verdict["passed"]:
        response.status_code = 409
    return verdict


@router.get("/runs/{run_id}/gate-rules", response_model=GateRulesRead, responses=READ_ERRORS)
def get_gate_rules(run_id: RunId, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """The gate rules that apply to a run, those it stores, and its last recorded verdict."""
    return gates.rules_read(session=session, run_id=run_id, defaults=settings.gate)


@router.put("/runs/{run_id}/gate-rules", response_model=GateRulesRead,
            responses=documented(400, 401, 403, 404, 409, 413, 422, 503))
def put_gate_rules(run_id: RunId, body: GateRulesWrite, request: Request,
                   settings: SettingsDep,
                   _token: Annotated[object, Depends(require(TokenScope.WRITE))]
                   ) -> dict[str, Any]:
    """Store a run's gate rules (left out: server default; null: off); needs a write token."""
    check = GateCheck(defaults=settings.gate, method=settings.fit_method,
                      thresholds=settings.trust,
                      notify=settings.alerts.webhook_url is not None)
    with _unit_of_work(request) as session:
        answer = gates.rules_write(
            session=session, run_id=run_id, defaults=settings.gate, check=check,
            overrides=body.model_dump(mode="json", include=body.model_fields_set))
    _written(request)
    return answer


@router.get("/runs/{run_id}/alerts", response_model=AlertList, responses=READ_ERRORS)
def list_alerts(run_id: RunId, session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=INT64)] = 0) -> dict[str, Any]:
    """A run's gate alerts (verdict changes) and their webhook deliveries, newest first."""
    return gates.alerts_read(session=session, run_id=run_id, limit=limit, offset=offset)


@router.get("/compare", response_model=CompareRead, responses=READ_ERRORS)
async def compare(
    request: Request, settings: SettingsDep, method: MethodDep,
    runs: Annotated[str, Query(pattern=r"^\d{1,9}(,\d{1,9}){0,49}$",
                               description="up to 50 run ids, comma-separated")],
    metric: Metric = "alpha",
    stat: Annotated[Statistic, Query()] = DEFAULT_STATISTIC,
    filter: Annotated[LayerFilter, Query()] = DEFAULT_FILTER,
    max_points: MaxPoints = 500,
) -> Response:
    """Robust trends of several runs, to overlay."""
    run_ids = list(dict.fromkeys(int(r) for r in runs.split(",")))
    return await _cached(request, CompareRead, lambda session: queries.compare(
        session=session, run_ids=run_ids, metric=metric, stat=stat, filter=filter,
        method=method, thresholds=settings.trust, max_points=max_points))
