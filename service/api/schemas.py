"""Response and request bodies of the REST API, separate from the ORM rows they are read from.

Declared models also make FastAPI serialise through pydantic-core instead of walking plain
dicts in Python, which matters for histories and trends of thousands of points.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from sqlalchemy import Boolean, Float, Integer

from alphawatch.service.db.models import LayerMetric


class RunCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255, pattern=r"^[\w.\-]+$")
    path: str = Field(min_length=1, max_length=4096)


class RunRead(BaseModel):
    id: int
    name: str
    path: str
    created_at: datetime
    n_checkpoints: int
    n_done: int
    n_failed: int
    n_pending: int
    last_step: int | None
    latest_alpha: float | None = Field(description="median alpha of trusted layers, latest step")
    untrusted_share: float | None
    discovery_error: str | None = Field(
        None, description="why the latest discovery pass could not list the run, or the "
                          "entries it refused that have no step (null when all is well)")


class RunDetail(RunRead):
    thresholds: dict[str, Any]
    methods: list[str]


class RunList(BaseModel):
    runs: list[RunRead]
    total: int


class CheckpointRead(BaseModel):
    id: int
    step: int
    path: str
    format: str
    status: str = Field(description="pending | running | done | failed | vanished")
    error: str | None
    discovered_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    analysis_s: float | None
    device: str | None
    n_layers: int | None
    n_trusted: int | None
    attempts: int | None
    discovery_error: str | None = Field(
        None, description="why discovery refused it (it is then failed, never read), or what "
                          "it found wrong with it after the analysis")
    analysis_count: int = Field(0, description="completed analyses; more than 1 when its "
                                               "files were rewritten in place and re-analysed")
    rewritten_at: datetime | None = Field(
        None, description="when its files last changed after an analysis (queued again)")


class CheckpointList(BaseModel):
    run_id: int
    checkpoints: list[CheckpointRead]


def _python_type(column: Any) -> Any:
    if isinstance(column.type, Boolean):
        base: Any = bool
    elif isinstance(column.type, Integer):
        base = int
    elif isinstance(column.type, Float):
        base = float
    else:
        base = str
    return base | None if column.nullable else base


# One field per layer_metric column, so the schema follows the table without a second list.
LayerMetricRead: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "LayerMetricRead",
    __config__=ConfigDict(extra="ignore"),
    **{a.key: (_python_type(a.columns[0]), None if a.columns[0].nullable else ...)
       for a in LayerMetric.__mapper__.column_attrs if a.key not in ("id", "checkpoint_id")},
)


class CheckpointLayers(BaseModel):
    run_id: int
    step: int
    method: str
    layers: list[LayerMetricRead]  # type: ignore[valid-type]


class HistoryPoint(BaseModel):
    step: int
    value: float | None
    alpha: float | None
    D: float | None
    num_pl_spikes: int | None
    fit_status: str
    trusted: bool


class HistoryRead(BaseModel):
    run_id: int
    layer: str
    metric: str
    points: list[HistoryPoint]


class TrendPoint(BaseModel):
    step: int
    value: float | None = Field(description="the requested statistic")
    n_used: int
    n_excluded: int
    excluded: dict[str, int] = Field(description="excluded layers by reason")
    median: float | None
    mean: float | None
    trimmed_mean: float | None
    p10: float | None
    p25: float | None
    p75: float | None
    p90: float | None
    iqr: float | None


class TrendRead(BaseModel):
    run_id: int
    metric: str
    stat: str
    filter: str
    method: str
    outliers: str
    points: list[TrendPoint]


class FitLine(BaseModel):
    x: list[float]
    y: list[float]


class EsdRead(BaseModel):
    layer: str
    step: int
    method: str
    evals: list[float]
    rand_evals: list[float] | None
    alpha: float | None
    xmin: float | None
    xmax: float | None
    D: float | None
    num_pl_spikes: int | None
    mp_bulk_max: float | None
    fit_status: str
    fit_line: FitLine


class Violation(BaseModel):
    rule: str
    value: float | None
    threshold: float | None
    message: str


class GateRead(BaseModel):
    run_id: int
    passed: bool
    step: int | None
    stat: str
    filter: str
    value: float | None
    untrusted_share: float | None
    ref_step: int | None = None
    delta: float | None = None
    n_used: int | None = None
    violations: list[Violation]


class ComparePoint(BaseModel):
    step: int
    value: float | None
    n_used: int


class CompareRun(BaseModel):
    run_id: int
    name: str
    points: list[ComparePoint]


class CompareRead(BaseModel):
    metric: str
    stat: str
    runs: list[CompareRun]
