"""Layer distances service: how far each layer moved between checkpoints (keyword-only).

The worker stores, on each weight row, the layer's change from the checkpoint before it by step
(``change_fro``, ``change_spectral``, ``subspace_overlap``, ``change_ref_step``). This module
reads them as layer x step matrices (the heatmap's layout) and, between two chosen steps, ranks
the layers by how much they changed, with the change of alpha beside: the same numbers for the
dashboard and for any client.
"""

from __future__ import annotations

import io
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from alphawatch.service.api.errors import NotFound
from alphawatch.service.api.queries import (
    done_checkpoints,
    downsample,
    get_run,
    layer_order,
    many_rows,
)
from alphawatch.service.api.selections import DISTANCE_MATRICES, DistanceQuery
from alphawatch.service.db.models import LayerMetric
from alphawatch.spreadsheet import write_csv
from alphawatch.vocabulary import LayerOrder

DISTANCES = ("change_fro", "change_spectral", "subspace_overlap")
"""The stored distances, each a layer x step matrix of the answer."""

_FIELDS = ("checkpoint_id", "name", "kind", "block", "alpha", *DISTANCES, "change_ref_step")
# Columns set on a row whose distance from the checkpoint before was measured.
_STORED = (*DISTANCES, "change_ref_step")


def distances(
    *, session: Session, run_id: int, query: DistanceQuery, method: str
) -> dict[str, Any]:
    """The distances of every selected layer at every analysed step (downsampled to
    ``max_points`` steps), and with ``from_step`` or ``to_step`` the layers ranked by their
    change between the two.

    Raises:
        NotFound: no run ``run_id``, or ``from_step``/``to_step`` is not an analysed step.
    """
    get_run(session=session, run_id=run_id)
    done = done_checkpoints(session=session, run_id=run_id)
    interval = _interval(query, [s for _, s in done], run_id)
    shown = downsample(done, query.max_points)
    # The ranking sums over every analysed step of its interval, shown or not.
    wanted = ({c for c, s in done if interval[0] <= s <= interval[1]} if interval else set()) | {
        c for c, _ in shown
    }
    asked = query.matrix_names()
    within = [LayerMetric.checkpoint_id.in_(sorted(wanted)), *query.layers(method).where()]
    statement = select(*[getattr(LayerMetric, f) for f in _FIELDS]).where(*within)
    if "alpha" in asked:
        rows = many_rows(session, statement)
        named = rows
    else:
        # Without the alpha matrix a row matters only where a distance is stored, or for the
        # ranking's steps: a run measured at few steps (or none) is not read whole. The rows'
        # names, kinds and blocks come from a query of their own.
        ranked = [c for c, s in done if interval and interval[0] <= s <= interval[1]]
        rows = many_rows(
            session,
            statement.where(
                or_(
                    LayerMetric.checkpoint_id.in_(ranked),
                    *(getattr(LayerMetric, f).is_not(None) for f in _STORED),
                )
            ),
        )
        named = session.execute(
            select(LayerMetric.name, LayerMetric.kind, LayerMetric.block).where(*within).distinct()
        ).all()
    at = {f: i for i, f in enumerate(_FIELDS)}
    name_at, kind_at, block_at = (
        (0, 1, 2) if named is not rows else (at["name"], at["kind"], at["block"])
    )
    keys: dict[str, tuple[int, int, str]] = {}
    places: dict[str, tuple[str, int | None]] = {}
    for r in named:
        name = r[name_at]
        if name not in keys:
            keys[name] = layer_order({"name": name, "kind": r[kind_at], "block": r[block_at]})
            places[name] = (r[kind_at], r[block_at])
    names = sorted(keys, key=keys.__getitem__)
    if query.order == LayerOrder.BLOCK_DESC:
        names = sorted(names, key=lambda n: (-keys[n][0], keys[n][1:]))
    row_of = {n: i for i, n in enumerate(names)}
    column = {c: j for j, (c, _) in enumerate(shown)}
    fields = {"ref_steps": "change_ref_step"}
    matrices: dict[str, list[list[Any]]] = {m: [[None] * len(shown) for _ in names] for m in asked}
    filled = [(at[fields.get(m, m)], cells) for m, cells in matrices.items()]
    by_layer: dict[str, dict[int, Any]] = {n: {} for n in names}
    for r in rows:
        name, checkpoint = r[at["name"]], r[at["checkpoint_id"]]
        by_layer[name][checkpoint] = r
        j = column.get(checkpoint)
        if j is not None:
            i = row_of[name]
            for field, cells in filled:
                cells[i][j] = r[field]
    answer: dict[str, Any] = {
        "run_id": run_id,
        "steps": [s for _, s in shown],
        "layers": names,
        "kinds": [places[n][0] for n in names],
        "blocks": [places[n][1] for n in names],
        **{m: matrices.get(m) for m in DISTANCE_MATRICES},
        "from_step": None if interval is None else interval[0],
        "to_step": None if interval is None else interval[1],
        "rank_by": query.rank_by,
        "ranking": [],
    }
    if interval is not None:
        answer["ranking"] = _ranking(names, places, by_layer, done, interval, at, query.rank_by)
    return answer


def _interval(query: DistanceQuery, steps: list[int], run_id: int) -> tuple[int, int] | None:
    """(earlier, later) step of the ranking, both analysed; None when the query names neither.

    ``to_step`` alone is compared with the analysed step before it; ``from_step`` alone with
    the latest; two steps in either order make one interval (the same one).
    """
    if query.from_step is None and query.to_step is None:
        return None
    analysed = set(steps)
    for step in (query.from_step, query.to_step):
        if step is not None and step not in analysed:
            raise NotFound(f"run {run_id} has no analysed checkpoint at step {step}")
    end = query.to_step if query.to_step is not None else steps[-1]
    if query.from_step is not None:
        start = query.from_step
    else:
        earlier = [s for s in steps if s < end]
        start = earlier[-1] if earlier else end
    return min(start, end), max(start, end)


def _ranking(
    names: list[str],
    places: dict[str, tuple[str, int | None]],
    by_layer: dict[str, dict[int, Any]],
    done: list[tuple[int, int]],
    interval: tuple[int, int],
    at: dict[str, int],
    rank_by: str,
) -> list[dict[str, Any]]:
    """The layers by their change over ``interval``, the most changed first.

    Between consecutive analysed checkpoints the stored distances are the change itself; over
    longer intervals the relative changes are summed (the path length, an upper bound of the
    direct change) and the overlap is the smallest of one step's (the largest rotation).
    ``complete`` says whether each analysed step of the interval was compared with the one
    before it, so that the sum covers the whole interval.
    """
    start, end = interval
    inside = [(c, s) for c, s in done if start < s <= end]
    from_id = next(c for c, s in done if s == start)
    to_id = next(c for c, s in done if s == end)
    out = []
    for name in names:
        rows = by_layer[name]
        fro = spectral = 0.0
        overlap: float | None = None
        measured = 0
        complete = True
        previous = start
        for checkpoint, step in inside:
            r = rows.get(checkpoint)
            if r is None or r[at["change_fro"]] is None:
                complete = False
                previous = step
                continue
            measured += 1
            complete = complete and r[at["change_ref_step"]] == previous
            previous = step
            fro += r[at["change_fro"]]
            spectral += r[at["change_spectral"]] or 0.0
            if r[at["subspace_overlap"]] is not None:
                o = r[at["subspace_overlap"]]
                overlap = o if overlap is None else min(overlap, o)
        before, after = rows.get(from_id), rows.get(to_id)
        alpha_from = None if before is None else before[at["alpha"]]
        alpha_to = None if after is None else after[at["alpha"]]
        out.append(
            {
                "layer": name,
                "kind": places[name][0],
                "block": places[name][1],
                "change_fro": fro if measured else None,
                "change_spectral": spectral if measured else None,
                "subspace_overlap": overlap,
                "n_steps": measured,
                "complete": bool(inside) and complete and measured == len(inside),
                "alpha_from": alpha_from,
                "alpha_to": alpha_to,
                "delta_alpha": (
                    None if alpha_from is None or alpha_to is None else alpha_to - alpha_from
                ),
            }
        )

    def key(item: dict[str, Any]) -> tuple[bool, float]:
        value = item[rank_by]
        if value is None:
            return (True, 0.0)  # unmeasured layers last
        # An overlap ranks the other way: the least overlap is the most rotation.
        return (False, value if rank_by == "subspace_overlap" else -value)

    return sorted(out, key=key)


_CSV_COLUMNS = (
    "step",
    "layer",
    "kind",
    "block",
    "ref_step",
    *DISTANCES,
    "overlap_k",
    "alpha",
)


def distances_csv(*, session: Session, run_id: int, method: str) -> str:
    """Every stored layer distance of a run, one row per layer and analysed step, as CSV."""
    get_run(session=session, run_id=run_id)
    steps = dict(done_checkpoints(session=session, run_id=run_id))
    rows = session.execute(
        select(
            LayerMetric.checkpoint_id,
            LayerMetric.name,
            LayerMetric.kind,
            LayerMetric.block,
            LayerMetric.change_ref_step,
            LayerMetric.change_fro,
            LayerMetric.change_spectral,
            LayerMetric.subspace_overlap,
            LayerMetric.overlap_k,
            LayerMetric.alpha,
        ).where(
            LayerMetric.checkpoint_id.in_(list(steps)),
            LayerMetric.change_fro.is_not(None),
            *DistanceQuery().layers(method).where(),
        )
    ).all()
    buffer = io.StringIO()
    write_csv(
        buffer,
        list(_CSV_COLUMNS),
        sorted(
            (dict(zip(_CSV_COLUMNS, (steps[r[0]], *r[1:]), strict=True)) for r in rows),
            key=lambda d: (d["step"], layer_order({"name": d["layer"], **d})),
        ),
    )
    return buffer.getvalue()
