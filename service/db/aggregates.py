"""Robust statistics of a checkpoint and of each of its blocks, computed once when its layers
are written.

A trend over a long run would otherwise read every layer row of every checkpoint on each
request (500 checkpoints x 300 layers = 150 000 rows). The rows kept here are made by the same
pure functions (``service.robust``) the API applies to layer rows, so both paths give the same
numbers; the API falls back to the layer rows for anything not kept here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from alphawatch.service import robust
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import (
    DEFAULT_VARIANT,
    KIND_GROUPS,
    Kind,
    LayerFilter,
    OutlierRule,
    split_variant,
)

PRECOMPUTED_METRICS: tuple[str, ...] = (
    "alpha",
    "alpha_weighted",
    "log_alpha_norm",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "D",
    "entropy",
    "mp_softrank",
    "distance_from_init",
)
PRECOMPUTED_FILTERS: tuple[str, ...] = tuple(f.value for f in LayerFilter)
PRECOMPUTED_OUTLIERS: tuple[str, ...] = tuple(r.value for r in OutlierRule)
# The kind groups users pick (attention, MLP, embeddings), for alpha only.
PRECOMPUTED_GROUPS: tuple[tuple[str, ...], ...] = tuple(
    tuple(k.value for k in group.kinds) for group in KIND_GROUPS
)


def kinds_key(kinds: Iterable[str] | None) -> str:
    """Canonical form of a set of layer kinds: sorted, unique, comma-joined ("" = all)."""
    return ",".join(sorted(set(kinds or ())))


# Each layer kind alone, for alpha only: the dashboard's "alpha by layer kind" panels ask for one
# kind each, and a run page would otherwise read every layer row once per kind present.
PRECOMPUTED_SINGLE_KINDS: frozenset[str] = frozenset(k.value for k in Kind)
PRECOMPUTED_KINDS = frozenset(
    {"", *(kinds_key(g) for g in PRECOMPUTED_GROUPS), *PRECOMPUTED_SINGLE_KINDS}
)


def weight_rows(layers: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of weight matrices themselves, without gradient or nested-width variants."""
    return [x for x in layers if split_variant(str(x.get("name", "")))[1] == DEFAULT_VARIANT]


# Per block: alpha, for every variant (the per-block view is where gradients are read), over
# every kind of the block and over each kind group.
BLOCK_METRICS: tuple[str, ...] = ("alpha",)
BLOCK_KINDS = frozenset({"", *(kinds_key(g) for g in PRECOMPUTED_GROUPS)})


def stat_rows(
    layers: Sequence[Mapping[str, Any]],
    *,
    checkpoint_id: int,
    thresholds: Thresholds,
) -> list[dict[str, Any]]:
    """``checkpoint_stat`` rows for every method, kept metric, kind set, filter and outlier rule:
    every kept metric over all layers; alpha over each kind group and over each kind present.

    Each row records the ``alpha_max`` and ``mad_k`` it was made with: the API serves a kept row
    only when they equal the thresholds it applies, so a changed setting is never answered with
    numbers made under the old one. Only the weights' rows are kept: gradient (``@exp_avg``) and
    nested-width (``@w<k>``) rows never enter a weights statistic, and are summarised on request.
    """
    rows: list[dict[str, Any]] = []
    for method, of_method in _weights_by_method(layers).items():
        selections: list[tuple[str, str, Sequence[Mapping[str, Any]]]] = [
            (metric, "", of_method) for metric in PRECOMPUTED_METRICS
        ]
        for group in PRECOMPUTED_GROUPS:
            selections.append(
                ("alpha", kinds_key(group), [x for x in of_method if x.get("kind") in group])
            )
        selections.extend(_single_kinds(of_method, taken={kinds for _, kinds, _ in selections}))
        for metric, kinds, chosen_layers in selections:
            for kept in _kept(chosen_layers, metric=metric, thresholds=thresholds):
                rows.append(
                    {"checkpoint_id": checkpoint_id, "method": method, "kinds": kinds, **kept}
                )
    return rows


def _weights_by_method(
    layers: Iterable[Mapping[str, Any]],
) -> dict[str, list[Mapping[str, Any]]]:
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for layer in weight_rows(layers):
        by_method.setdefault(str(layer.get("method", "ww")), []).append(layer)
    return by_method


def _single_kinds(
    layers: Sequence[Mapping[str, Any]], *, taken: Collection[str] = frozenset()
) -> list[tuple[str, str, Sequence[Mapping[str, Any]]]]:
    """Alpha over each layer kind alone, only where the checkpoint has a layer of it (a kind it
    lacks is answered from its (no) layer rows, with the same empty statistics); kind sets in
    ``taken`` (a group of one kind) are kept already."""
    present = sorted({str(x.get("kind")) for x in layers} & PRECOMPUTED_SINGLE_KINDS - set(taken))
    return [("alpha", kind, [x for x in layers if x.get("kind") == kind]) for kind in present]


def single_kind_rows(
    layers: Sequence[Mapping[str, Any]],
    *,
    checkpoint_id: int,
    thresholds: Thresholds,
) -> list[dict[str, Any]]:
    """The ``checkpoint_stat`` rows of alpha over each layer kind alone: the part of
    :func:`stat_rows` that checkpoints analysed before 2026-12-07 lack (migration 0017 fills
    them from their layer rows)."""
    groups = {kinds_key(g) for g in PRECOMPUTED_GROUPS}
    return [
        {"checkpoint_id": checkpoint_id, "method": method, "kinds": kinds, **kept}
        for method, of_method in _weights_by_method(layers).items()
        for metric, kinds, chosen in _single_kinds(of_method, taken=groups)
        for kept in _kept(chosen, metric=metric, thresholds=thresholds)
    ]


def _kept(
    layers: Sequence[Mapping[str, Any]], *, metric: str, thresholds: Thresholds
) -> Iterator[dict[str, Any]]:
    """The columns of a kept statistic of ``metric`` over ``layers`` under each filter and
    outlier rule."""
    # Where a filter or the MAD rule leaves out nothing the values are the same array, and so
    # are its statistics: described once (a block's few layers often are).
    described: dict[bytes, dict[str, float | None]] = {}
    for flt in PRECOMPUTED_FILTERS:
        for outliers in PRECOMPUTED_OUTLIERS:
            chosen = robust.select(
                layers,
                metric=metric,
                filter=flt,
                alpha_max=thresholds.alpha_max,
                outliers=outliers,
                mad_k=thresholds.mad_k,
            )
            yield {
                "metric": metric,
                "filter": flt,
                "outliers": outliers,
                "alpha_max": thresholds.alpha_max,
                "mad_k": thresholds.mad_k,
                "n_used": chosen.n_used,
                "n_excluded": chosen.n_excluded,
                "excluded": json.dumps(chosen.excluded),
                **_described(chosen.values, described),
            }


def _described(values: np.ndarray, seen: dict[bytes, dict[str, float | None]]) -> dict[str, Any]:
    key = values.tobytes()
    stats = seen.get(key)
    if stats is None:
        stats = seen[key] = robust.describe(values)
    return stats


def block_stat_rows(
    layers: Sequence[Mapping[str, Any]],
    *,
    checkpoint_id: int,
    thresholds: Thresholds,
) -> list[dict[str, Any]]:
    """``block_stat`` rows: per method, variant, block and kind set of :data:`BLOCK_KINDS`.

    A row is made only where the selection holds a layer of that block, so the blocks a
    per-block trend lists are the blocks its layer rows hold; layers outside a block
    (embeddings, head) make none. Each row records its ``alpha_max`` and ``mad_k``, as
    :func:`stat_rows` does.
    """
    cells: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for layer in layers:
        block = layer.get("block")
        if block is None:
            continue
        variant = split_variant(str(layer.get("name", "")))[1]
        cells[(str(layer.get("method", "ww")), variant, int(block))].append(layer)
    groups = [("", None), *((kinds_key(g), frozenset(g)) for g in PRECOMPUTED_GROUPS)]
    rows: list[dict[str, Any]] = []
    for (method, variant, block), of_block in sorted(cells.items()):
        for kinds, members in groups:
            chosen = (
                of_block if members is None else [x for x in of_block if x.get("kind") in members]
            )
            if not chosen:
                continue
            for metric in BLOCK_METRICS:
                for kept in _kept(chosen, metric=metric, thresholds=thresholds):
                    rows.append(
                        {
                            "checkpoint_id": checkpoint_id,
                            "method": method,
                            "variant": variant,
                            "kinds": kinds,
                            "block": block,
                            **kept,
                        }
                    )
    return rows
