"""Trend service: robust trends, layer histories, heatmaps, flags and ESDs (keyword-only)."""

from __future__ import annotations

import contextlib
import functools
import re
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic_core import from_json
from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Double,
    Integer,
    Select,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alphawatch.service import robust
from alphawatch.service.api.errors import NotFound
from alphawatch.service.api.schemas import HistoryPoint, TrendPoint
from alphawatch.service.api.selections import BlockQuery, CompareQuery, HeatmapQuery, TrendQuery
from alphawatch.service.db import lag
from alphawatch.service.db.aggregates import (
    BLOCK_KINDS,
    BLOCK_METRICS,
    PRECOMPUTED_KINDS,
    PRECOMPUTED_METRICS,
    kinds_key,
)
from alphawatch.service.db.layers import LayerSelection
from alphawatch.service.db.models import (
    BlockStat,
    Checkpoint,
    CheckpointStat,
    CheckpointStatus,
    LayerMetric,
    Run,
    Spectrum,
)
from alphawatch.service.db.session import utcnow
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import (
    DEFAULT_VARIANT,
    KIND_ORDER,
    VARIANT_PATTERN,
    FitStatus,
    Kind,
    LayerOrder,
    OutlierRule,
    Source,
    source_of,
    split_variant,
)

# Analysed checkpoints only: their layer rows are complete.
ANALYSED = Checkpoint.status == CheckpointStatus.DONE.value


def get_run(*, session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return run


def run_lags(*, session: Session, run_ids: Collection[int]) -> dict[int, dict[str, Any]]:
    """The lag fields of runs' summaries, for any number of runs in two queries."""
    now = utcnow()
    waiting = lag.waiting(session, run_ids=run_ids)
    last = lag.last_analysis_lags(session, run_ids=run_ids)
    return {
        run_id: {
            "lag_checkpoints": waiting[run_id].checkpoints if run_id in waiting else 0,
            "lag_oldest_seconds": lag.seconds_since(waiting[run_id].oldest_since, now)
            if run_id in waiting
            else None,
            "last_analysis_lag_seconds": last.get(run_id),
        }
        for run_id in run_ids
    }


def run_summary(
    *,
    session: Session,
    run: Run,
    thresholds: Thresholds,
    method: str,
    lags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run's counts, latest robust alpha and lag; ``lags`` from :func:`run_lags` when the
    caller summarises many runs (else they are read for this one)."""
    counts: dict[str, int] = dict(
        session.execute(
            select(Checkpoint.status, func.count())
            .where(Checkpoint.run_id == run.id)
            .group_by(Checkpoint.status)
        ).all()
    )
    last = session.execute(
        select(Checkpoint.id, Checkpoint.step)
        .where(Checkpoint.run_id == run.id, ANALYSED)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    ).first()
    latest_alpha = untrusted_share = None
    if last is not None:
        layers = layer_dicts(
            session=session, checkpoint_ids=[last[0]], layers=LayerSelection(method=method)
        )
        summary = robust.summarize(layers, thresholds=thresholds)
        latest_alpha, untrusted_share = summary["alpha_median"], summary["untrusted_share"]
    return {
        "id": run.id,
        "name": run.name,
        "path": run.path,
        "created_at": run.created_at,
        "n_checkpoints": sum(counts.values()),
        "n_done": counts.get(CheckpointStatus.DONE.value, 0),
        "n_failed": counts.get(CheckpointStatus.FAILED.value, 0)
        + counts.get(CheckpointStatus.VANISHED.value, 0),
        "n_pending": counts.get(CheckpointStatus.PENDING.value, 0)
        + counts.get(CheckpointStatus.RUNNING.value, 0),
        "n_skipped": counts.get(CheckpointStatus.SKIPPED.value, 0),
        "last_step": last[1] if last else None,
        "latest_alpha": latest_alpha,
        "untrusted_share": untrusted_share,
        "discovery_error": run.discovery_error,
        **(lags if lags is not None else run_lags(session=session, run_ids=[run.id])[run.id]),
    }


_LAYER_FIELDS = [
    getattr(LayerMetric, a.key).label(a.key)
    for a in LayerMetric.__mapper__.column_attrs
    if a.key != "id"
]


def layer_dicts(
    *,
    session: Session,
    checkpoint_ids: list[int],
    layers: LayerSelection,
    fields: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """The selected layer rows of checkpoints as dicts, of every column or only ``fields``."""
    columns = (
        _LAYER_FIELDS
        if fields is None
        else [getattr(LayerMetric, f).label(f) for f in dict.fromkeys(fields)]
    )
    result = session.execute(
        select(*columns).where(LayerMetric.checkpoint_id.in_(checkpoint_ids), *layers.where())
    )
    keys = tuple(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result]


def done_checkpoints(*, session: Session, run_id: int) -> list[tuple[int, int]]:
    """(checkpoint id, step) of analysed checkpoints, by step."""
    return [
        (int(i), int(s))
        for i, s in session.execute(
            select(Checkpoint.id, Checkpoint.step)
            .where(Checkpoint.run_id == run_id, ANALYSED)
            .order_by(Checkpoint.step)
        )
    ]


def many_rows(session: Session, statement: Select[Any]) -> Sequence[Sequence[Any]]:
    """The rows of a select of columns, for answers of a hundred thousand rows and more.

    On PostgreSQL they are read from the driver's cursor as plain tuples: psycopg returns the
    Python types the columns declare, and SQLAlchemy's processing of each row would cost more
    than the query (a 500 x 300 heatmap: 0.9 s instead of 0.35 s). Elsewhere as usual.
    """
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return session.execute(statement).all()
    compiled = statement.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    return _driver_rows(session, str(compiled), compiled.params)


# SQL text and default values of the statements rows_of runs, compiled once per process.
_COMPILED: dict[Select[Any], tuple[str, Mapping[str, Any]]] = {}


def rows_of(
    session: Session, statement: Select[Any], params: Mapping[str, Any]
) -> Sequence[Sequence[Any]]:
    """The rows of a statement built once (its values as ``bindparam``s), run with ``params``.

    A trend's 500 rows cost 1.0 ms of client CPU with the statement built per request, found
    in SQLAlchemy's compiled cache and its rows processed by the ORM, and 0.4 ms so: compiled
    once per process, its rows read from the driver as :func:`many_rows` reads them.
    """
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return session.execute(statement, dict(params)).all()
    found = _COMPILED.get(statement)
    if found is None:
        compiled = statement.compile(dialect=connection.dialect)
        # The values built into the statement; those bound per request have none yet.
        values = {key: b.effective_value for key, b in compiled.binds.items() if not b.required}
        found = _COMPILED[statement] = (str(compiled), values)
    sql, defaults = found
    return _driver_rows(session, sql, {**defaults, **params})


def _driver_rows(session: Session, sql: str, params: Mapping[str, Any]) -> list[Any]:
    connection = session.connection()
    raw = connection.connection.driver_connection
    cursor = raw.cursor()  # type: ignore[union-attr]
    dialect = connection.dialect
    try:
        cursor.execute(sql, params)
        return list(cursor.fetchall())
    except dialect.loaded_dbapi.Error as exc:
        # As SQLAlchemy's own execution fails: a connection the server dropped is invalidated
        # (never pooled again), and the error is SQLAlchemy's (OperationalError: the API
        # answers 503; DataError: 422), not the driver's (500).
        invalidated = dialect.is_disconnect(exc, raw, cursor)
        if invalidated:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            sql,
            dict(params),
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=invalidated,
            dialect=dialect,
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


def downsample(items: Sequence[Any], max_points: int | None) -> list[Any]:
    """Evenly spaced subset that always keeps the first and the last item."""
    if not max_points or len(items) <= max_points:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, max_points).round().astype(int))
    return [items[i] for i in idx]


# A trend's point as a tuple in TrendPoint's field order: step, value, n_used, n_excluded,
# excluded (a dict, or the JSON text a kept row holds), then every statistic of robust.STATS.
TrendRow = tuple[Any, ...]
TREND_FIELDS = tuple(TrendPoint.model_fields)
# A layer history's point in HistoryPoint's order: step, value, alpha, D, num_pl_spikes,
# fit_status, trusted.
HistoryRow = tuple[Any, ...]
HISTORY_FIELDS = tuple(HistoryPoint.model_fields)


def trend_point(row: TrendRow) -> dict[str, Any]:
    """A trend row as the dict TrendPoint validates."""
    point = dict(zip(TREND_FIELDS, row, strict=True))
    if isinstance(point["excluded"], str):
        point["excluded"] = from_json(point["excluded"])
    return point


def _point(
    step: int, chosen: robust.Selection, described: Mapping[str, float | None], stat: str
) -> TrendRow:
    """A point computed from layer rows: the selection and its :func:`robust.describe`."""
    return (
        step,
        described[stat],
        chosen.n_used,
        chosen.n_excluded,
        chosen.excluded,
        *described.values(),
    )


def _chosen(
    layers: list[dict[str, Any]], query: TrendQuery | BlockQuery, thresholds: Thresholds
) -> robust.Selection:
    # One reading of a query's filter and outlier rule for the trend and the per-block trends.
    return robust.select(
        layers,
        metric=query.metric,
        filter=query.filter,
        alpha_max=thresholds.alpha_max,
        outliers=query.outliers,
        mad_k=thresholds.mad_k if query.mad_k is None else query.mad_k,
    )


def _chosen_from_rows(
    *,
    session: Session,
    checkpoint_ids: list[int],
    layers: LayerSelection,
    query: TrendQuery | BlockQuery,
    thresholds: Thresholds,
    by_block: bool,
) -> dict[tuple[int, int | None], robust.Selection]:
    """The selections of checkpoints (or of each block of them) computed from their layer rows,
    keyed by (checkpoint id, block or None): the rules run over the columns of all rows at once
    (:func:`robust.select_groups`)."""
    columns = _layer_columns(
        session,
        checkpoint_ids=checkpoint_ids,
        layers=layers,
        metric=query.metric,
        by_block=by_block,
    )
    if columns.ids.size == 0:
        return {}
    if by_block:
        keys, groups = np.unique(
            np.stack([columns.ids, columns.blocks], axis=1), axis=0, return_inverse=True
        )
        key_of: list[tuple[int, int | None]] = [(int(c), int(b)) for c, b in keys]
    else:
        unique_ids, groups = np.unique(columns.ids, return_inverse=True)
        key_of = [(int(c), None) for c in unique_ids]
    chosen = robust.select_groups(
        groups.reshape(-1),
        values=columns.values,
        alpha=columns.alpha,
        reasons=columns.reasons,
        metric=query.metric,
        filter=query.filter,
        alpha_max=thresholds.alpha_max,
        outliers=query.outliers,
        mad_k=thresholds.mad_k if query.mad_k is None else query.mad_k,
    )
    return {key_of[g]: selection for g, selection in chosen.items()}


@dataclass(frozen=True)
class LayerColumns:
    """The columns of layer rows that the selection rules read, one entry per row."""

    ids: np.ndarray  # checkpoint id, int64
    blocks: np.ndarray  # int64; only when read by block (empty otherwise)
    values: np.ndarray  # the metric, float64, NaN where none
    alpha: np.ndarray  # float64, NaN where none
    reasons: robust.Reasons
    layers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Read by layer: the row's layer, a position in :attr:`names` (empty otherwise)."""
    names: tuple[str, ...] = ()


def _layer_columns(
    session: Session,
    *,
    checkpoint_ids: list[int],
    layers: LayerSelection,
    metric: str,
    by_block: bool = False,
    by_layer: bool = False,
) -> LayerColumns:
    """The :class:`LayerColumns` of the layer rows of ``checkpoint_ids`` that ``layers`` keeps
    (those in a block, with ``by_block``; with the layer of each row, with ``by_layer``)."""
    where = [*layers.where()] + ([LayerMetric.block.is_not(None)] if by_block else [])
    if session.connection().dialect.name == "postgresql":
        found = _layer_arrays(
            session, checkpoint_ids, where, metric=metric, by_block=by_block, by_layer=by_layer
        )
        if found is not None:
            return found
    return _tuple_columns(
        session, checkpoint_ids, where, metric=metric, by_block=by_block, by_layer=by_layer
    )


def _tuple_columns(
    session: Session,
    checkpoint_ids: list[int],
    where: list[ColumnElement[bool]],
    *,
    metric: str,
    by_block: bool,
    by_layer: bool,
) -> LayerColumns:
    """:func:`_layer_columns` from a tuple per row."""
    names = dict.fromkeys(
        ("checkpoint_id", "block", "name", metric, "alpha", *_REASON_FIELDS)
    )  # alpha read once when it is the metric too
    rows = many_rows(
        session,
        select(*(getattr(LayerMetric, n) for n in names)).where(
            LayerMetric.checkpoint_id.in_(checkpoint_ids), *where
        ),
    )
    if not rows:
        return _NO_COLUMNS
    column = dict(zip(names, zip(*rows, strict=True), strict=True))
    layer_of: dict[str, int] = {}
    if by_layer:
        layer_of = {name: i for i, name in enumerate(dict.fromkeys(column["name"]))}
    return LayerColumns(
        ids=np.asarray(column["checkpoint_id"], dtype=np.int64),
        blocks=np.asarray(column["block"], dtype=np.int64) if by_block else np.zeros(0, np.int64),
        values=np.asarray(column[metric], dtype=np.float64),
        alpha=np.asarray(column["alpha"], dtype=np.float64),
        reasons=robust.untrusted_reasons(*(column[n] for n in _REASON_FIELDS)),
        layers=np.fromiter(map(layer_of.__getitem__, column["name"]), np.int64, len(rows))
        if by_layer
        else np.zeros(0, np.int64),
        names=tuple(layer_of),
    )


_NO_COLUMNS = LayerColumns(
    ids=np.zeros(0, np.int64),
    blocks=np.zeros(0, np.int64),
    values=np.zeros(0),
    alpha=np.zeros(0),
    reasons=robust.Reasons.trusted(0),
)
_REASON_FIELDS = ("fit_status", "correlation_trap", "rank_collapse", "trusted")
# The fit statuses by their code in :func:`_layer_arrays` (0: none, -1: one not listed here).
_STATUSES = tuple(s.value for s in FitStatus)


def _reason_key() -> ColumnElement[Any]:
    """A row's fields of :data:`_REASON_FIELDS` as one integer, which :func:`_reason_of_key`
    reads back: 27 x the status code + 9 x trusted + 3 x rank collapse + correlation trap, each
    flag 0 (false), 1 (true) or 2 (none); negative for a status not in :data:`_STATUSES`."""
    status = case(
        (LayerMetric.fit_status.is_(None), 0),
        else_=func.coalesce(
            func.array_position(
                bindparam("statuses", list(_STATUSES), type_=ARRAY(Text)),
                cast(LayerMetric.fit_status, Text),
            ),
            -1,
        ),
    )
    flags = [
        func.coalesce(cast(getattr(LayerMetric, name), Integer), 2)
        for name in ("correlation_trap", "rank_collapse", "trusted")
    ]
    return status * 27 + flags[2] * 9 + flags[1] * 3 + flags[0]


def _reason_of_key(key: int) -> str | None:
    status, flags = divmod(key, 27)
    trusted, collapse, trap = (
        None if f == 2 else bool(f) for f in (flags // 9, flags // 3 % 3, flags % 3)
    )
    return robust.untrusted_reason_of(
        _STATUSES[status - 1] if status else None, trap, collapse, trusted
    )


def _layer_arrays(
    session: Session,
    checkpoint_ids: list[int],
    where: list[ColumnElement[bool]],
    *,
    metric: str,
    by_block: bool,
    by_layer: bool,
) -> LayerColumns | None:
    """:func:`_layer_columns` on PostgreSQL: the rows' columns come back as one row of arrays
    (``array_agg``, sent in PostgreSQL's binary form and read by NumPy), the reason fields as
    one integer per row (:func:`_reason_key`), instead of a tuple per row. A block range's
    35,000 rows: 7 ms of the API's CPU instead of 45, PostgreSQL's about 3 ms more; a
    heatmap's 150,000: the whole answer 40 ms of the API's CPU instead of 216, PostgreSQL's
    ~40 ms more. None where a row holds a fit status this version does not know (the rows
    are then read as tuples).

    Every ``array_agg`` of one query level reads the rows in the same order, so the arrays'
    entries belong together. By layer, a row of arrays per layer.
    """

    def packed(expression: Any) -> ColumnElement[Any]:
        return func.array_send(func.array_agg(expression))

    nan = literal(float("nan"), Double)
    wanted = [
        packed(LayerMetric.checkpoint_id),
        packed(func.coalesce(cast(LayerMetric.alpha, Double), nan)),
        packed(_reason_key()),
    ]
    if metric != "alpha":
        wanted.append(packed(func.coalesce(cast(getattr(LayerMetric, metric), Double), nan)))
    if by_block:
        wanted.append(packed(LayerMetric.block))
    ids_of = bindparam("ids", checkpoint_ids, type_=ARRAY(Integer))
    statement = select(*wanted).where(LayerMetric.checkpoint_id == any_(ids_of), *where)
    if by_layer:
        statement = statement.add_columns(LayerMetric.name).group_by(LayerMetric.name)
    rows = [r for r in many_rows(session, statement) if r[0] is not None]
    if not rows:
        return _NO_COLUMNS

    def column(at: int, kind: str) -> np.ndarray:
        return np.concatenate([_unpacked(r[at], kind) for r in rows])

    keys = column(2, "i4")
    if (keys < 0).any():
        return None
    alpha = column(1, "f8")
    ids = [_unpacked(r[0], "i4") for r in rows]
    return LayerColumns(
        ids=np.concatenate(ids).astype(np.int64),
        blocks=column(len(wanted) - 1, "i4").astype(np.int64)
        if by_block
        else np.zeros(0, np.int64),
        values=column(3, "f8") if metric != "alpha" else alpha,
        alpha=alpha,
        reasons=robust.Reasons.of_keys(keys, _reason_of_key),
        layers=np.repeat(np.arange(len(rows)), [i.size for i in ids])
        if by_layer
        else np.zeros(0, np.int64),
        names=tuple(r[-1] for r in rows) if by_layer else (),
    )


def _unpacked(data: bytes, kind: str) -> np.ndarray:
    """A one-dimensional array without nulls, in PostgreSQL's binary form (``array_send``:
    dimensions, a null flag, the element type, a length and lower bound per dimension, then a
    length and the big-endian value of each element), as a native NumPy array of ``kind``."""
    ndim, has_null = (int(v) for v in np.frombuffer(data, ">i4", count=2))
    if ndim == 0:
        return np.zeros(0, kind)
    n = int(np.frombuffer(data, ">i4", count=1, offset=12)[0])
    width = np.dtype(kind).itemsize
    entries = np.frombuffer(data, [("length", ">i4"), ("value", ">" + kind)], count=n, offset=20)
    if ndim != 1 or has_null or (entries["length"] != width).any():
        raise ValueError(f"unexpected array of {ndim} dimensions, nulls {has_null}")
    return entries["value"].astype(kind)


_KEPT_FIELDS = ("n_used", "n_excluded", "excluded", *robust.STATS)


def _kept_on(
    table: type[CheckpointStat] | type[BlockStat],
    *,
    mad: bool,
    values: Mapping[str, Any] | None = None,
) -> list[ColumnElement[bool]]:
    """The conditions that pick a query's kept rows: its selection, made under the thresholds
    this server applies (rows made under others are recomputed from the layer rows); ``mad``
    when the outlier rule is MAD, whose k is then part of the selection. With the
    :func:`_kept_params` of a query as ``values``, or as parameters bound later."""

    def value(name: str) -> Any:
        return bindparam(name) if values is None else values[name]

    on = [
        table.method == value("method"),
        table.metric == value("metric"),
        table.filter == value("filter"),
        table.outliers == value("outliers"),
        table.kinds == value("kinds"),
        table.alpha_max == value("alpha_max"),
    ]
    if mad:
        on.append(table.mad_k == value("mad_k"))
    return on


def _kept_params(
    *, query: TrendQuery | BlockQuery, kinds: str, method: str, thresholds: Thresholds
) -> dict[str, Any]:
    """The values of :func:`_kept_on`'s conditions for a query (plain strings, not enums)."""
    return {
        "method": str(method),
        "metric": str(query.metric),
        "filter": str(query.filter),
        "outliers": str(query.outliers),
        "kinds": kinds,
        "alpha_max": thresholds.alpha_max,
        "mad_k": thresholds.mad_k if query.mad_k is None else query.mad_k,
    }


@functools.cache
def _trend_statement(
    table: type[CheckpointStat] | type[BlockStat] | None, *, mad: bool
) -> Select[Any]:
    """The analysed checkpoints of run ``run_id`` by step, with their kept row joined: of
    ``checkpoint_stat``, or of block ``block`` of variant ``variant`` in ``block_stat`` (none
    with ``table`` None). Built once per shape: values are bound per request."""
    columns: list[Any] = [Checkpoint.id, Checkpoint.step]
    if table is None:
        statement = select(*columns)
    else:
        on = [table.checkpoint_id == Checkpoint.id, *_kept_on(table, mad=mad)]
        if table is BlockStat:
            on += [BlockStat.variant == bindparam("variant"), BlockStat.block == bindparam("block")]
        columns += [getattr(table, f) for f in _KEPT_FIELDS]
        statement = select(*columns).outerjoin(table, and_(*on))
    return statement.where(Checkpoint.run_id == bindparam("run_id"), ANALYSED).order_by(
        Checkpoint.step
    )


def _kept_point(step: int, row: Sequence[Any], at: int, value: int) -> TrendRow:
    """A point from a kept row's :data:`_KEPT_FIELDS`, starting at ``row[at]``; ``value`` is
    the position of the requested statistic in ``row``."""
    # Tuples by position: this runs once per checkpoint (and block) of every request. The
    # exclusions stay the JSON text kept: the answer's writer reads it.
    return (step, row[value], row[at], row[at + 1], row[at + 2], *row[at + 3 : at + _KEPT_END])


_KEPT_END = 3 + len(robust.STATS)


def _kept_value(at: int, stat: str) -> int:
    """Where a kept row's statistic ``stat`` is, the row's :data:`_KEPT_FIELDS` at ``at``."""
    return at + 3 + robust.STATS.index(stat)


def trend(
    *, session: Session, run_id: int, query: TrendQuery, method: str, thresholds: Thresholds
) -> list[dict[str, Any]]:
    """The robust statistic per analysed checkpoint, with what was excluded and why: the
    points of :func:`trend_rows` as dicts."""
    return [
        trend_point(row)
        for row in trend_rows(
            session=session, run_id=run_id, query=query, method=method, thresholds=thresholds
        )
    ]


def trend_rows(
    *, session: Session, run_id: int, query: TrendQuery, method: str, thresholds: Thresholds
) -> list[TrendRow]:
    """The robust statistic per analysed checkpoint, with what was excluded and why, as
    :data:`TrendRow` tuples.

    Selections kept in ``checkpoint_stat`` (whole model, or a dashboard kind group) or in
    ``block_stat`` (one block) are read in the same query as the checkpoints, one row per
    checkpoint; block ranges, other kind sets and checkpoints without a kept row are computed
    from the layer rows by the same functions.
    """
    layers = query.layers(method)
    metric = query.metric
    key = kinds_key(layers.kinds)
    one_block = layers.block_min is not None and layers.block_min == layers.block_max
    table: type[CheckpointStat] | type[BlockStat] | None = None
    if (
        # Only the weights' whole-model statistics are kept; other variants come from rows.
        layers.variant == DEFAULT_VARIANT
        and layers.block_min is None
        and layers.block_max is None
        and key in PRECOMPUTED_KINDS
        and (metric in PRECOMPUTED_METRICS if not key else metric == "alpha")
    ):
        table = CheckpointStat
    elif one_block and key in BLOCK_KINDS and metric in BLOCK_METRICS:
        table = BlockStat
    kept = table is not None
    params = {
        **_kept_params(query=query, kinds=key, method=method, thresholds=thresholds),
        "run_id": run_id,
        "variant": layers.variant,
        "block": layers.block_min,
    }
    statement = _trend_statement(table, mad=query.outliers == OutlierRule.MAD)
    rows = downsample(rows_of(session, statement, params), query.max_points)
    if not rows:
        get_run(session=session, run_id=run_id)  # 404 for an unknown run, [] for an empty one
    points: dict[int, TrendRow] = {}
    missing: list[int] = []
    value = _kept_value(2, query.stat)
    for row in rows:
        if kept and row[2] is not None:
            points[row[0]] = _kept_point(row[1], row, 2, value)
        else:
            missing.append(row[0])
    if missing:
        computed = _chosen_from_rows(
            session=session,
            checkpoint_ids=missing,
            layers=layers,
            query=query,
            thresholds=thresholds,
            by_block=False,
        )
        empty = _chosen([], query, thresholds)
        step = {row[0]: row[1] for row in rows}
        selections = [computed.get((c, None), empty) for c in missing]
        for checkpoint_id, chosen, described in zip(
            missing, selections, robust.describe_all(selections), strict=True
        ):
            points[checkpoint_id] = _point(step[checkpoint_id], chosen, described, query.stat)
    return [points[row[0]] for row in rows]


def compare(
    *, session: Session, query: CompareQuery, method: str, thresholds: Thresholds
) -> dict[str, Any]:
    """Whole-model robust trends of several runs, to overlay."""
    out = []
    for run_id in query.run_ids:
        run = get_run(session=session, run_id=run_id)
        rows = trend_rows(
            session=session,
            run_id=run_id,
            query=query.trend(),
            method=method,
            thresholds=thresholds,
        )
        out.append(
            {
                "run_id": run_id,
                "name": run.name,
                "points": [{"step": r[0], "value": r[1], "n_used": r[2]} for r in rows],
            }
        )
    return {"metric": query.metric, "stat": query.stat, "runs": out}


def layer_history_rows(
    *,
    session: Session,
    run_id: int,
    layer_name: str,
    metric: str,
    method: str,
    max_points: int | None,
    limit: int | None,
    offset: int,
) -> list[HistoryRow]:
    """One layer's rows over the analysed steps of a run, in step order, as
    :data:`HistoryRow` tuples."""
    params = {"run_id": run_id, "method": method, "name": layer_name, "offset": offset}
    if limit is not None:
        params["limit"] = limit
    statement = _history_statement(metric, limited=limit is not None)
    rows = downsample(rows_of(session, statement, params), max_points)
    if not rows and offset == 0:
        get_run(session=session, run_id=run_id)
        raise NotFound(f"run {run_id} has no layer {layer_name!r} (method {method!r})")
    trusted_of = robust.untrusted_reason_of
    # HistoryPoint's value is a float: an integer metric's (num_pl_spikes, ...) as one.
    as_float = isinstance(getattr(LayerMetric, metric).type, Integer)
    # Positions, not mappings: this runs once per point of every history request.
    return [
        (
            r[0],
            float(r[1]) if as_float and r[1] is not None else r[1],
            *r[2:6],
            trusted_of(r[5], r[7], r[8], r[6]) is None,
        )
        for r in rows
    ]


@functools.cache
def _history_statement(metric: str, *, limited: bool) -> Select[Any]:
    """Step, ``metric``, alpha, D, num_pl_spikes, fit_status, trusted, correlation_trap and
    rank_collapse of layer ``name`` (any variant, fit method ``method``) at each analysed
    step of run ``run_id``, from ``offset``, ``limit`` rows when ``limited``. Built once per
    shape: values are bound per request."""
    fields = (
        *(metric, "alpha", "D", "num_pl_spikes"),
        *("fit_status", "trusted", "correlation_trap", "rank_collapse"),
    )
    statement = (
        select(Checkpoint.step, *[getattr(LayerMetric, f) for f in fields])
        .join(Checkpoint, Checkpoint.id == LayerMetric.checkpoint_id)
        .where(
            Checkpoint.run_id == bindparam("run_id"),
            ANALYSED,
            # LayerSelection(method=..., variant=None, name=...), its values bound later.
            LayerMetric.method == bindparam("method"),
            LayerMetric.name == bindparam("name"),
        )
        .order_by(Checkpoint.step)
        .offset(bindparam("offset"))
    )
    return statement.limit(bindparam("limit")) if limited else statement


def layer_order(layer: dict[str, Any]) -> tuple[int, int, str]:
    """Sort key of a layer: embeddings first, then by block and kind, the head last."""
    kind = layer.get("kind") or Kind.OTHER
    block = layer.get("block")
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    if kind == Kind.EMBED:
        return (-1, rank, layer["name"])
    if kind == Kind.LM_HEAD:
        return (1 << 30, rank, layer["name"])
    return (block if block is not None else (1 << 29), rank, layer["name"])


def _rounded(values: np.ndarray, digits: int) -> np.ndarray:
    """The matrix rounded to ``digits`` decimals at once (a long run's 150,000 calls of
    ``round`` were a quarter of the heatmap's cost); NaN stays NaN.

    NumPy rounds ``x * 10**digits`` to even: a value within an ulp of a half-way case may
    round the other way from ``round``, never by more than half the last decimal kept."""
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.round(values, digits)
    # NumPy scales by 10**digits first: a value past ~1e293 overflows there, and has no
    # decimals to round anyway.
    overflowed = np.isinf(scaled) & np.isfinite(values)
    scaled[overflowed] = values[overflowed]
    return scaled


def _places(
    session: Session,
    checkpoint_ids: list[int],
    where: Sequence[ColumnElement[bool]],
    names: set[str],
) -> dict[str, tuple[str, int | None]]:
    """The kind and block of each layer of ``names``, read once per layer rather than with
    every cell (two columns of 150,000 rows: 30 ms of a long run's heatmap): from the last of
    the checkpoints, then, for layers it lacks, from their rows in the others."""
    places: dict[str, tuple[str, int | None]] = {}
    for chosen in (checkpoint_ids[-1:], checkpoint_ids):
        missing = names - places.keys()
        if not missing:
            break
        statement = select(LayerMetric.name, LayerMetric.kind, LayerMetric.block).where(
            LayerMetric.checkpoint_id.in_(chosen), *where
        )
        if chosen is checkpoint_ids:
            # One row per layer, not one per cell of it.
            statement = statement.where(LayerMetric.name.in_(missing)).distinct()
        for name, kind, block in session.execute(statement):
            places.setdefault(name, (kind, block))
    return places


# A heatmap cell's trust verdict by its code: untrusted, trusted, no cell.
_VERDICTS = np.array([False, True, None], dtype=object)


def heatmap(*, session: Session, run_id: int, query: HeatmapQuery, method: str) -> dict[str, Any]:
    """Layer x step matrix of a metric with each cell's trust verdict.

    Rows are one variant's (the weights by default), optionally only some kinds or blocks,
    ordered by block then kind, or with ``order=block_desc`` from the head and the last block
    back to the embeddings.
    """
    get_run(session=session, run_id=run_id)
    metric = query.metric
    checkpoints = downsample(done_checkpoints(session=session, run_id=run_id), query.max_points)
    ids = [c for c, _ in checkpoints]
    layers = query.layers(method)
    cells = _layer_columns(session, checkpoint_ids=ids, layers=layers, metric=metric, by_layer=True)
    where = layers.where()
    places = _places(session, ids, where, set(cells.names))
    keys = {
        n: layer_order({"name": n, "kind": kind, "block": block})
        for n, (kind, block) in places.items()
    }
    blocks = {n: block for n, (_, block) in places.items()}
    names = sorted(keys, key=keys.__getitem__)
    if query.order == LayerOrder.BLOCK_DESC:
        # Blocks from the last back; inside a block the kinds keep the order the model runs them.
        names = sorted(names, key=lambda n: (-keys[n][0], keys[n][1:]))
    # Every cell placed at once: its row from its layer, its column from its checkpoint.
    row_of = {n: i for i, n in enumerate(names)}
    rows = np.asarray([row_of[n] for n in cells.names], dtype=np.int64)[cells.layers]
    by_id = np.argsort(np.asarray(ids, dtype=np.int64))
    columns = by_id[np.searchsorted(np.asarray(ids, dtype=np.int64)[by_id], cells.ids)]
    values = np.full((len(names), len(checkpoints)), np.nan)
    values[rows, columns] = cells.values
    verdicts = np.full(values.shape, 2, dtype=np.int64)  # 2: no cell
    verdicts[rows, columns] = cells.reasons.codes == 0
    trusted: list[list[bool | None]] = _VERDICTS[verdicts].tolist()
    if query.digits is not None:
        values = _rounded(values, query.digits)
    z: list[list[float | None]] = values.tolist()
    for i, j in zip(*np.nonzero(np.isnan(values)), strict=True):
        z[i][j] = None  # no cell, or a cell without a value
    return {
        "metric": metric,
        "variant": query.variant,
        "steps": [s for _, s in checkpoints],
        "layers": names,
        "blocks": [blocks[n] for n in names],
        "z": z,
        "trusted": trusted,
    }


def block_trend_rows(
    *, session: Session, run_id: int, query: BlockQuery, method: str, thresholds: Thresholds
) -> list[tuple[int, list[TrendRow]]]:
    """The robust statistic per block and checkpoint: one trend per block, (block, its
    :data:`TrendRow` points), the last block first by default (layers outside a block,
    embeddings and head, are left out).

    Selections kept in ``block_stat`` are read from it, one row per block and checkpoint;
    other selections, and checkpoints without kept rows, are computed from the layer rows.
    """
    get_run(session=session, run_id=run_id)
    checkpoints = downsample(done_checkpoints(session=session, run_id=run_id), query.max_points)
    step = dict(checkpoints)
    layers = query.layers(method)
    key = kinds_key(layers.kinds)
    points: dict[int, dict[int, TrendRow]] = defaultdict(dict)
    missing = list(step)
    if key in BLOCK_KINDS and query.metric in BLOCK_METRICS and step:
        kept = many_rows(
            session,
            select(
                BlockStat.checkpoint_id,
                BlockStat.block,
                *(getattr(BlockStat, f) for f in _KEPT_FIELDS),
            ).where(
                BlockStat.checkpoint_id.in_(missing),
                BlockStat.variant == layers.variant,
                *_kept_on(
                    BlockStat,
                    mad=query.outliers == OutlierRule.MAD,
                    values=_kept_params(
                        query=query, kinds=key, method=method, thresholds=thresholds
                    ),
                ),
            ),
        )
        value = _kept_value(2, query.stat)
        for row in kept:
            points[row[1]][row[0]] = _kept_point(step[row[0]], row, 2, value)
        # A checkpoint with no kept row of any block was analysed before they were kept (or
        # under other thresholds); one whose selection holds no block has none either.
        have = {row[0] for row in kept}
        missing = [c for c in missing if c not in have]
    if missing:
        computed = _chosen_from_rows(
            session=session,
            checkpoint_ids=missing,
            layers=layers,
            query=query,
            thresholds=thresholds,
            by_block=True,
        )
        for ((checkpoint_id, block), chosen), described in zip(
            computed.items(), robust.describe_all(list(computed.values())), strict=True
        ):
            assert block is not None
            points[block][checkpoint_id] = _point(
                step[checkpoint_id], chosen, described, query.stat
            )
    empty = _chosen([], query, thresholds)
    nothing = robust.describe(empty.values)
    out = []
    for block in sorted(points, reverse=query.order == LayerOrder.BLOCK_DESC):
        kept_points = points[block]
        out.append(
            (
                block,
                [
                    kept_points.get(checkpoint_id) or _point(s, empty, nothing, query.stat)
                    for checkpoint_id, s in checkpoints
                ],
            )
        )
    return out


def variants(*, session: Session, run_id: int, method: str) -> list[dict[str, Any]]:
    """The variants analysed in a run (weights, gradients, update spectra, nested widths) with
    their row counts,
    read from its latest analysed checkpoint."""
    get_run(session=session, run_id=run_id)
    done = done_checkpoints(session=session, run_id=run_id)
    counts: dict[str, int] = {DEFAULT_VARIANT: 0}
    if done:
        names = session.scalars(
            select(LayerMetric.name).where(
                LayerMetric.checkpoint_id == done[-1][0], LayerMetric.method == method
            )
        )
        for name in names:
            variant = split_variant(name)[1]
            if re.fullmatch(VARIANT_PATTERN, variant):  # no variant alphawatch cannot name
                counts[variant] = counts.get(variant, 0) + 1

    def key(variant: str) -> tuple[int, int]:
        # Weights, gradients, nested widths from the narrowest, then the update spectra.
        width = int(variant[1:]) if variant[1:].isdigit() else 0
        return list(Source).index(source_of(variant)), width

    return [
        {"name": v, "source": source_of(v).value, "label": _variant_label(v), "n_layers": counts[v]}
        for v in sorted(counts, key=key)
    ]


def _variant_label(variant: str) -> str:
    source = source_of(variant)
    return f"nested width {variant[1:]}" if source is Source.NESTED else source.label


FLAG_KEYS = ("correlation_trap", "rank_collapse", "near_random", "over_trained", "under_trained")
FIT_STATUSES = tuple(s.value for s in FitStatus)


def flags(
    *, session: Session, run_id: int, method: str, variant: str = DEFAULT_VARIANT
) -> list[dict[str, Any]]:
    """Per analysed checkpoint: layers, and how many carry each flag and each fit status.

    Counted by the database: a long run has hundreds of thousands of layer rows.
    """
    get_run(session=session, run_id=run_id)

    def count(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    labels = ("n_layers", *FLAG_KEYS, *FIT_STATUSES)
    counts = [
        # A column the covering index carries: the counts are read from the index alone.
        func.count(LayerMetric.checkpoint_id),
        *[count(getattr(LayerMetric, key).is_(True)) for key in FLAG_KEYS],
        *[count(LayerMetric.fit_status == status) for status in FIT_STATUSES],
    ]
    query = (
        select(Checkpoint.step, *counts)
        .outerjoin(
            LayerMetric,
            and_(
                LayerMetric.checkpoint_id == Checkpoint.id,
                *LayerSelection(method=method, variant=variant).where(),
            ),
        )
        .where(Checkpoint.run_id == run_id, ANALYSED)
        .group_by(Checkpoint.id, Checkpoint.step)
        .order_by(Checkpoint.step)
    )
    return [
        {"step": row[0], **{label: int(n) for label, n in zip(labels, row[1:], strict=True)}}
        for row in session.execute(query)
    ]


def checkpoint_id_at(*, session: Session, run_id: int, step: int) -> int:
    found = session.scalars(
        select(Checkpoint.id).where(Checkpoint.run_id == run_id, Checkpoint.step == step)
    ).first()
    if found is None:
        raise NotFound(f"run {run_id} has no checkpoint at step {step}")
    return int(found)


def esd(
    *, session: Session, run_id: int, step: int, layer_name: str, method: str
) -> dict[str, Any]:
    """Eigenvalues of one layer at one step, its power-law fit line and the MP bulk edge."""
    get_run(session=session, run_id=run_id)
    checkpoint_id = checkpoint_id_at(session=session, run_id=run_id, step=step)
    found = session.execute(
        select(LayerMetric, Spectrum)
        .outerjoin(Spectrum, Spectrum.layer_metric_id == LayerMetric.id)
        .where(
            LayerMetric.checkpoint_id == checkpoint_id,
            *LayerSelection(method=method, variant=None, name=layer_name).where(),
        )
    ).first()
    if found is None:
        raise NotFound(f"no layer {layer_name!r} at step {step} of run {run_id}")
    layer, spectrum = found
    evals = np.frombuffer(spectrum.evals, dtype=np.float32) if spectrum and spectrum.evals else None
    rand = (
        np.frombuffer(spectrum.rand_evals, dtype=np.float32)
        if spectrum and spectrum.rand_evals
        else None
    )
    fit_line: dict[str, list[float]] = {"x": [], "y": []}
    if evals is not None and layer.alpha and layer.xmin and layer.xmax and layer.alpha > 1:
        # Density of the fitted power law p(x) = (α−1)/xmin · (x/xmin)^−α, scaled by the share
        # of eigenvalues in the tail so it overlays the histogram of all eigenvalues.
        xs = np.geomspace(layer.xmin, layer.xmax, 50)
        share = (layer.num_pl_spikes or 0) / max(evals.size, 1)
        ys = share * (layer.alpha - 1) / layer.xmin * (xs / layer.xmin) ** (-layer.alpha)
        # The dashboard draws histograms of log10 λ: density in log10 space is p(x)·x·ln 10.
        fit_line = {"x": xs.tolist(), "y": (ys * xs * np.log(10)).tolist()}
    return {
        "layer": layer_name,
        "step": step,
        "method": method,
        "evals": evals.tolist() if evals is not None else [],
        "rand_evals": rand.tolist() if rand is not None else None,
        "alpha": layer.alpha,
        "xmin": layer.xmin,
        "xmax": layer.xmax,
        "D": layer.D,
        "num_pl_spikes": layer.num_pl_spikes,
        "mp_bulk_max": layer.mp_bulk_max,
        "fit_status": layer.fit_status,
        "fit_line": fit_line,
        "correlation_trap": layer.correlation_trap,
        "trap_localisation": from_json(layer.trap_localisation)
        if layer.trap_localisation
        else None,
    }
