"""REST routes under /api/v1: thin handlers over keyword-only query functions."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic_core import to_json
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from alphawatch.service.api import queries
from alphawatch.service.api.cache import ResultCache
from alphawatch.service.api.schemas import (
    CheckpointLayers,
    CheckpointList,
    CompareRead,
    EsdRead,
    GateRead,
    HistoryRead,
    RunCreate,
    RunDetail,
    RunList,
    RunRead,
    TrendRead,
)
from alphawatch.service.db import queue
from alphawatch.service.db.models import AnalysisJob, Checkpoint, LayerMetric, Run
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import verify_token
from alphawatch.settings import Settings


async def get_settings(request: Request) -> Settings:
    # async: no I/O here, and a sync dependency would cost a thread-pool hop per request.
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(make_engine(request.app.state.settings.database_url)) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


_TOKEN_REQUIRED = ("a valid API token is required: Authorization: Bearer <token>"
                   " (create one with `alphawatch token create NAME`)")


def require_token(session: SessionDep, authorization: Annotated[str | None, Header()] = None
                  ) -> None:
    token = _bearer(authorization)
    if token is None or not verify_token(session, token):
        raise HTTPException(401, _TOKEN_REQUIRED)


def _known_token(settings: Settings, token: str) -> bool:
    with session_scope(make_engine(settings.database_url)) as session:
        return verify_token(session, token)


async def read_access(settings: SettingsDep,
                      authorization: Annotated[str | None, Header()] = None) -> None:
    # async so open reads pay nothing; the token lookup, when required, runs off the loop.
    if settings.read_requires_token:
        token = _bearer(authorization)
        if token is None or not await run_in_threadpool(_known_token, settings, token):
            raise HTTPException(401, _TOKEN_REQUIRED)


router = APIRouter(prefix="/api/v1", dependencies=[Depends(read_access)])
health_router = APIRouter()

Method = Annotated[str, Query(max_length=32, pattern=r"^[a-z0-9_]+$",
                              description="fit method; methods are never mixed")]
Metric = Annotated[str, Query(description="a layer metric column, e.g. alpha, D, stable_rank")]
# Database integer ranges: a larger id or step is a bad request, not a database error.
INT32, INT64 = 2**31 - 1, 2**63 - 1
RunId = Annotated[int, PathParam(ge=1, le=INT32, description="run id")]
StepPath = Annotated[int, PathParam(ge=0, le=INT64, description="training step")]
MaxPoints = Annotated[int | None, Query(ge=2, le=100_000, description="downsample to N steps")]


def _compute(settings: Settings, build: Callable[[Session], dict[str, Any]]) -> bytes:
    with session_scope(make_engine(settings.database_url)) as session:
        return to_json(build(session))


async def _cached(request: Request, build: Callable[[Session], dict[str, Any]]) -> Response:
    """The JSON body ``build`` makes, from the result cache when the results have not changed.

    On a hit no thread, session or query is involved; on a miss ``build`` runs on the thread
    pool with its own session, and its body is kept under the version read before it ran.
    """
    settings: Settings = request.app.state.settings
    cache: ResultCache | None = request.app.state.cache
    if cache is None:
        return Response(await run_in_threadpool(_compute, settings, build),
                        media_type="application/json")
    key = f"{request.url.path}?{sorted(request.query_params.multi_items())}"
    body = cache.get(key)
    if body is not None:
        return Response(body, media_type="application/json", headers={"X-Cache": "hit"})
    version = cache.version()
    body = await run_in_threadpool(_compute, settings, build)
    cache.put(key, version, body)
    return Response(body, media_type="application/json", headers={"X-Cache": "miss"})


def _metric(metric: str) -> str:
    allowed = queries.numeric_metrics()
    if metric not in allowed:
        raise HTTPException(422, f"unknown metric {metric!r}; choose one of {', '.join(allowed)}")
    return metric


def _kinds(kind: str | None) -> list[str] | None:
    if not kind:
        return None
    return [k.strip() for k in kind.split(",") if k.strip()]


@health_router.get("/health")
@health_router.get("/api/v1/health")
def health(session: SessionDep, request: Request, response: Response) -> dict[str, str]:
    """Liveness, database reachability and, under `alphawatch up`, the worker's state."""
    session.execute(select(1))
    liveness: Callable[[], str | None] | None = request.app.state.liveness
    reason = liveness() if liveness is not None else None
    if reason is not None:
        response.status_code = 503
        return {"status": "degraded", "reason": reason}
    return {"status": "ok"}


@health_router.get("/metrics", response_class=PlainTextResponse)
def metrics(session: SessionDep) -> str:
    """Prometheus metrics: checkpoints by status, queue depth, runs."""
    lines = ["# HELP alphawatch_checkpoints Checkpoints by analysis status.",
             "# TYPE alphawatch_checkpoints gauge"]
    for status, count in session.execute(
        select(Checkpoint.status, func.count()).group_by(Checkpoint.status)
    ):
        lines.append(f'alphawatch_checkpoints{{status="{status}"}} {count}')
    lines += ["# HELP alphawatch_queue_depth Jobs waiting for a worker.",
              "# TYPE alphawatch_queue_depth gauge",
              f"alphawatch_queue_depth {queue.queue_depth(session)}",
              "# HELP alphawatch_runs Runs known.", "# TYPE alphawatch_runs gauge",
              f"alphawatch_runs {session.scalar(select(func.count()).select_from(Run))}"]
    return "\n".join(lines) + "\n"


@router.get("/runs", response_model=RunList)
def list_runs(session: SessionDep, settings: SettingsDep,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=INT64)] = 0) -> dict[str, Any]:
    """Runs with their status counts, last step and latest robust alpha."""
    total = session.scalar(select(func.count()).select_from(Run)) or 0
    runs = session.scalars(select(Run).order_by(Run.id).limit(limit).offset(offset)).all()
    return {"runs": [queries.run_summary(session=session, run=r,
                                         alpha_max=settings.trust.alpha_max) for r in runs],
            "total": total}


@router.post("/runs", status_code=201, dependencies=[Depends(require_token)],
             response_model=RunRead)
def create_run(body: RunCreate, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Register a run directory (must lie under an allowed root)."""
    path = _allowed_path(body.path, settings)
    if session.scalars(select(Run.id).where(Run.name == body.name)).first() is not None:
        raise HTTPException(409, f"a run named {body.name!r} exists already")
    run_id = queue.ensure_run(session, name=body.name, path=str(path))
    session.flush()
    return queries.run_summary(session=session, run=queries.get_run(session=session,
                               run_id=run_id), alpha_max=settings.trust.alpha_max)


def _allowed_path(raw: str, settings: Settings) -> Path:
    if "\x00" in raw:
        raise HTTPException(422, "path contains a NUL byte")
    given = Path(raw)
    if not given.is_absolute() or ".." in given.parts:
        raise HTTPException(422, "path must be absolute and must not contain '..'")
    if not settings.allowed_roots:
        raise HTTPException(403, "no checkpoint root is allowed on this server "
                                 "(set ALPHAWATCH_ALLOWED_ROOTS)")
    resolved = given.resolve()  # follows symlinks: a link out of the root is caught below
    for root in settings.allowed_roots:
        if resolved == root or root in resolved.parents:
            if not resolved.is_dir():
                raise HTTPException(422, f"{resolved} is not a directory")
            return resolved
    raise HTTPException(403, f"{raw} is not under an allowed root "
                             f"({', '.join(map(str, settings.allowed_roots))})")


@router.get("/runs/{run_id}", response_model=RunDetail)
def get_run(run_id: RunId, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """One run, with the thresholds applied to its trust verdicts."""
    run = queries.get_run(session=session, run_id=run_id)
    # Methods of the latest analysed checkpoint: scanning every layer row of a long run for
    # DISTINCT would cost more than the rest of the page.
    latest = session.scalar(select(Checkpoint.id).where(
        Checkpoint.run_id == run_id, Checkpoint.status == "done")
        .order_by(Checkpoint.step.desc()).limit(1))
    methods = sorted(set(session.scalars(
        select(LayerMetric.method).where(LayerMetric.checkpoint_id == latest).distinct()
    ))) if latest is not None else []
    return {**queries.run_summary(session=session, run=run, alpha_max=settings.trust.alpha_max),
            "thresholds": settings.trust.model_dump(), "methods": methods}


@router.delete("/runs/{run_id}", status_code=204, dependencies=[Depends(require_token)])
def delete_run(run_id: RunId, session: SessionDep) -> Response:
    """Delete a run and everything stored for it (the checkpoint files are not touched)."""
    queries.get_run(session=session, run_id=run_id)
    session.execute(delete(Run).where(Run.id == run_id))
    return Response(status_code=204)


@router.get("/runs/{run_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(run_id: RunId, session: SessionDep,
                     limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
                     offset: Annotated[int, Query(ge=0, le=INT64)] = 0) -> dict[str, Any]:
    """Checkpoints of a run with analysis status, timings and errors."""
    queries.get_run(session=session, run_id=run_id)
    rows = session.execute(
        select(Checkpoint, AnalysisJob.attempts).outerjoin(AnalysisJob)
        .where(Checkpoint.run_id == run_id).order_by(Checkpoint.step).limit(limit).offset(offset)
    ).all()
    return {"run_id": run_id, "checkpoints": [
        {"id": c.id, "step": c.step, "path": c.path, "format": c.format, "status": c.status,
         "error": c.error, "discovered_at": c.discovered_at, "started_at": c.started_at,
         "finished_at": c.finished_at, "analysis_s": c.analysis_s, "device": c.device,
         "n_layers": c.n_layers, "n_trusted": c.n_trusted, "attempts": attempts,
         "discovery_error": c.discovery_error, "analysis_count": c.analysis_count,
         "rewritten_at": c.rewritten_at}
        for c, attempts in rows]}


@router.get("/runs/{run_id}/checkpoints/{step}/layers", response_model=CheckpointLayers)
def checkpoint_layers(run_id: RunId, step: StepPath, session: SessionDep,
                      method: Method = "ww") -> dict[str, Any]:
    """Every layer metric of one checkpoint."""
    queries.get_run(session=session, run_id=run_id)
    checkpoint_id = queries.checkpoint_id_at(session=session, run_id=run_id, step=step)
    layers = queries.layer_dicts(session=session, checkpoint_ids=[checkpoint_id], method=method)
    return {"run_id": run_id, "step": step, "method": method,
            "layers": sorted(layers, key=queries._layer_order)}


@router.get("/runs/{run_id}/layers.csv", response_class=PlainTextResponse)
def export_csv(run_id: RunId, session: SessionDep, method: Method = "ww") -> Response:
    """Every layer metric of every analysed checkpoint, as CSV."""
    queries.get_run(session=session, run_id=run_id)
    checkpoints = queries.done_checkpoints(session=session, run_id=run_id)
    steps = dict(checkpoints)
    layers = queries.layer_dicts(session=session, checkpoint_ids=list(steps), method=method)
    buffer = io.StringIO()
    columns = ["step", *[c for c in (layers[0] if layers else {}) if c != "checkpoint_id"]]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for layer in layers:
        writer.writerow({**layer, "step": steps[layer["checkpoint_id"]]})
    return Response(buffer.getvalue(), media_type="text/csv")


@router.get("/runs/{run_id}/layers/{layer_name}/history", response_model=HistoryRead)
async def layer_history(request: Request, run_id: RunId, layer_name: str,
                        metric: Metric = "alpha", method: Method = "ww",
                        max_points: MaxPoints = None,
                        limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
                        offset: Annotated[int, Query(ge=0, le=INT64)] = 0) -> Response:
    """One layer's metric over steps, with fit quality and status (paged, then downsampled)."""
    metric = _metric(metric)

    def build(session: Session) -> dict[str, Any]:
        points = queries.layer_history(session=session, run_id=run_id, layer_name=layer_name,
                                       metric=metric, method=method, max_points=max_points,
                                       limit=limit, offset=offset)
        return {"run_id": run_id, "layer": layer_name, "metric": metric, "points": points}

    return await _cached(request, build)


@router.get("/runs/{run_id}/trend", response_model=TrendRead)
async def get_trend(
    request: Request, run_id: RunId, settings: SettingsDep,
    metric: Metric = "alpha",
    stat: Annotated[Literal["median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90",
                            "iqr"], Query()] = "median",
    filter: Annotated[Literal["trusted", "all"], Query()] = "trusted",
    kind: Annotated[str | None,
                    Query(max_length=200, description="comma-separated kinds: q,k,v,o,...")] = None,
    block_min: Annotated[int | None, Query(ge=0, le=INT32)] = None,
    block_max: Annotated[int | None, Query(ge=0, le=INT32)] = None,
    outliers: Annotated[Literal["none", "mad"], Query()] = "none",
    mad_k: Annotated[float, Query(gt=0, le=100)] = 3.0,
    method: Method = "ww",
    max_points: MaxPoints = None,
) -> Response:
    """Model-level robust statistic of a metric per checkpoint, with exclusions explained."""
    metric = _metric(metric)

    def build(session: Session) -> dict[str, Any]:
        points = queries.trend(session=session, run_id=run_id, metric=metric, stat=stat,
                               filter=filter, method=method, kinds=_kinds(kind),
                               block_min=block_min, block_max=block_max, outliers=outliers,
                               mad_k=mad_k, alpha_max=settings.trust.alpha_max,
                               max_points=max_points)
        return {"run_id": run_id, "metric": metric, "stat": stat, "filter": filter,
                "method": method, "outliers": outliers, "points": points}

    return await _cached(request, build)


@router.get("/runs/{run_id}/heatmap")
async def get_heatmap(request: Request, run_id: RunId, metric: Metric = "alpha",
                      method: Method = "ww", max_points: MaxPoints = 500) -> Response:
    """Layer x step matrix of a metric; layers ordered by block, then kind."""
    metric = _metric(metric)
    return await _cached(request, lambda session: queries.heatmap(
        session=session, run_id=run_id, metric=metric, method=method, max_points=max_points))


@router.get("/runs/{run_id}/flags")
async def get_flags(request: Request, run_id: RunId, method: Method = "ww") -> Response:
    """Per checkpoint: how many layers carry each flag and each fit status."""
    return await _cached(request, lambda session: {
        "run_id": run_id, "points": queries.flags(session=session, run_id=run_id,
                                                  method=method)})


@router.get("/runs/{run_id}/checkpoints/{step}/layers/{layer_name}/esd",
            response_model=EsdRead)
def get_esd(run_id: RunId, step: StepPath, layer_name: str, session: SessionDep,
            method: Method = "ww") -> dict[str, Any]:
    """Eigenvalues of one layer at one step, its power-law fit and the MP bulk edge."""
    queries.get_run(session=session, run_id=run_id)
    return queries.esd(session=session, run_id=run_id, step=step, layer_name=layer_name,
                       method=method)


@router.get("/runs/{run_id}/gate", response_model=GateRead)
def gate(
    run_id: RunId, session: SessionDep, settings: SettingsDep, response: Response,
    stat: Annotated[Literal["median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90"],
                    Query()] = "median",
    filter: Annotated[Literal["trusted", "all"], Query()] = "trusted",
    step: Annotated[int | None, Query(ge=0, le=INT64,
                                      description="default: the latest analysed")] = None,
    min_alpha: Annotated[float | None, Query(description="default: 2 (over-trained)")] = None,
    max_alpha: Annotated[float | None, Query(description="default: 6 (under-trained)")] = None,
    max_untrusted_share: Annotated[float | None, Query(ge=0, le=1)] = None,
    ref_step: Annotated[int | None, Query(ge=0, le=INT64)] = None,
    max_delta: Annotated[float | None, Query(ge=0)] = None,
    method: Method = "ww",
    strict: Annotated[bool, Query(description="answer 409 when the gate fails")] = False,
) -> dict[str, Any]:
    """CI gate: thresholds on the robust alpha, the untrusted share and the change since a step."""
    from alphawatch.service.api.gate import evaluate

    verdict = evaluate(
        session=session, run_id=run_id, stat=stat, filter=filter, step=step,
        min_alpha=settings.trust.over_trained_below if min_alpha is None else min_alpha,
        max_alpha=settings.trust.under_trained_above if max_alpha is None else max_alpha,
        max_untrusted_share=max_untrusted_share, ref_step=ref_step, max_delta=max_delta,
        method=method, alpha_max=settings.trust.alpha_max,
    )
    if strict and not verdict["passed"]:
        response.status_code = 409
    return verdict


@router.get("/compare", response_model=CompareRead)
async def compare(
    request: Request, settings: SettingsDep,
    runs: Annotated[str, Query(pattern=r"^\d{1,9}(,\d{1,9}){0,49}$",
                               description="up to 50 run ids, comma-separated")],
    metric: Metric = "alpha",
    stat: Annotated[Literal["median", "mean", "trimmed_mean", "p25", "p75"], Query()] = "median",
    filter: Annotated[Literal["trusted", "all"], Query()] = "trusted",
    method: Method = "ww", max_points: MaxPoints = 500,
) -> dict[str, Any]:
    """Robust trends of several runs, to overlay."""
    metric = _metric(metric)

    def build(session: Session) -> dict[str, Any]:
        out = []
        for run_id in dict.fromkeys(int(r) for r in runs.split(",")):
            run = queries.get_run(session=session, run_id=run_id)
            points = queries.trend(session=session, run_id=run_id, metric=metric, stat=stat,
                                   filter=filter, method=method, kinds=None, block_min=None,
                                   block_max=None, outliers="none", mad_k=3.0,
                                   alpha_max=settings.trust.alpha_max, max_points=max_points)
            out.append({"run_id": run_id, "name": run.name,
                        "points": [{"step": p["step"], "value": p["value"],
                                    "n_used": p["n_used"]} for p in points]})
        return {"metric": metric, "stat": stat, "runs": out}

    return await _cached(request, build)
