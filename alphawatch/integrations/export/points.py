"""What is exported: per analysed checkpoint, the robust statistics the API serves."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from alphawatch.service import robust
from alphawatch.service.api import queries
from alphawatch.service.api.selections import TrendQuery
from alphawatch.service.db.layers import LayerSelection
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import Statistic

if TYPE_CHECKING:
    from alphawatch.integrations.export.trackers import TrackerRun

log = logging.getLogger("alphawatch.export")

PREFIX = "alphawatch"
# What robust.untrusted_reason reads, and the layer's alpha.
_LAYER_FIELDS = (
    "checkpoint_id",
    "name",
    "alpha",
    "fit_status",
    "trusted",
    "correlation_trap",
    "rank_collapse",
)


@dataclass(frozen=True)
class Point:
    """The values logged at one training step, by tracker key."""

    step: int
    values: dict[str, float] = field(default_factory=dict)


def stat_key(stat: str) -> str:
    return f"{PREFIX}/alpha/{stat}"


def layer_key(name: str) -> str:
    return f"{PREFIX}/layers/{name}/alpha"


UNTRUSTED_KEY = f"{PREFIX}/untrusted_share"
USED_KEY = f"{PREFIX}/layers_used"


def points_of(
    *,
    session: Session,
    run_id: int,
    thresholds: Thresholds,
    method: str,
    layers: bool = False,
    steps: Iterable[int] | None = None,
) -> list[Point]:
    """One point per analysed checkpoint of the run (or of ``steps``), in step order.

    Model level: every statistic of the trusted-layer alpha (the trend the API serves, from the
    kept statistics), the untrusted share (as the run summary and the gate compute it) and the
    number of layers used. With ``layers``, every layer's alpha besides.
    """
    wanted = None if steps is None else set(steps)
    # The whole model's trusted layers, as the API's trend answers by default.
    trend = queries.trend(
        session=session,
        run_id=run_id,
        query=TrendQuery(stat=Statistic.MEDIAN),
        method=method,
        thresholds=thresholds,
    )
    done = dict(queries.done_checkpoints(session=session, run_id=run_id))
    by_step = {step: checkpoint_id for checkpoint_id, step in done.items()}
    chosen = [p for p in trend if wanted is None or p["step"] in wanted]
    rows = queries.layer_dicts(
        session=session,
        layers=LayerSelection(method=method),
        fields=_LAYER_FIELDS,
        checkpoint_ids=[by_step[p["step"]] for p in chosen if p["step"] in by_step],
    )
    of_checkpoint: dict[int, list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        of_checkpoint[int(row["checkpoint_id"])].append(row)
    points: list[Point] = []
    for p in chosen:
        values: dict[str, float] = {}
        for stat in Statistic:
            if p.get(stat.value) is not None:
                values[stat_key(stat.value)] = float(p[stat.value])
        values[USED_KEY] = float(p["n_used"])
        layer_rows = of_checkpoint.get(by_step.get(p["step"], -1), [])
        if layer_rows:
            untrusted = sum(1 for row in layer_rows if robust.untrusted_reason(row) is not None)
            values[UNTRUSTED_KEY] = untrusted / len(layer_rows)
        if layers:
            for row in layer_rows:
                if row["alpha"] is not None:
                    values[layer_key(str(row["name"]))] = float(row["alpha"])  # type: ignore[arg-type]
        points.append(Point(int(p["step"]), values))
    return points


def unlogged(points: Sequence[Point], logged: dict[str, set[int]]) -> list[Point]:
    """The part of ``points`` the tracker does not hold yet: (key, step) pairs never twice."""
    out = []
    for point in points:
        values = {k: v for k, v in point.values.items() if point.step not in logged.get(k, ())}
        if values:
            out.append(Point(point.step, values))
    return out


def export_run(
    *,
    session: Session,
    run_id: int,
    tracker: TrackerRun,
    thresholds: Thresholds,
    method: str,
    layers: bool = False,
    steps: Iterable[int] | None = None,
    known: dict[str, set[int]] | None = None,
) -> int:
    """Log what ``tracker`` lacks of the run's points; how many (key, step) values were logged.

    ``known`` is what the tracker holds, when the caller keeps it (the worker does, between
    checkpoints); it is read back from the tracker otherwise, and updated with what is logged.
    """
    points = points_of(
        session=session,
        run_id=run_id,
        thresholds=thresholds,
        method=method,
        layers=layers,
        steps=steps,
    )
    if known is None:
        known = {}
    keys = sorted({k for p in points for k in p.values} - set(known))
    if keys:
        known.update({k: set() for k in keys})
        for key, logged_steps in tracker.logged(keys).items():
            known[key] = set(logged_steps)
    count = 0
    for point in unlogged(points, known):
        tracker.log(point.step, point.values)
        for key in point.values:
            known[key].add(point.step)
        count += len(point.values)
    tracker.flush()
    return count
