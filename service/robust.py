"""Robust model-level statistics over layers: pure functions, shared by trend, gate and CLI.

Which layers count, and why the others do not, is decided here once: the dashboard, the REST
trend, the CI gate and ``alphawatch analyze`` all report the same numbers.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alphawatch.trust import Thresholds
from alphawatch.vocabulary import (
    DEFAULT_FILTER,
    DEFAULT_OUTLIER_RULE,
    LayerFilter,
    OutlierRule,
    Statistic,
)

# Plain strings: they key rows and JSON objects, where an enum member would leak its type.
STATS: tuple[str, ...] = tuple(s.value for s in Statistic)
ALPHA_METRICS = frozenset({"alpha", "alpha_weighted", "log_alpha_norm"})
TRIM = 0.1


@dataclass(frozen=True)
class Selection:
    """Values that entered a statistic, and the count of layers left out per reason."""

    values: np.ndarray
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def n_used(self) -> int:
        return int(self.values.size)

    @property
    def n_excluded(self) -> int:
        return sum(self.excluded.values())


def untrusted_reason(layer: Mapping[str, Any]) -> str | None:
    """Why a layer is not trusted (its fit status, a trap, rank collapse), or None."""
    return untrusted_reason_of(
        layer.get("fit_status"),
        layer.get("correlation_trap"),
        layer.get("rank_collapse"),
        layer.get("trusted"),
    )


def untrusted_reason_of(
    fit_status: str | None,
    correlation_trap: bool | None,
    rank_collapse: bool | None,
    trusted: bool | None,
) -> str | None:
    """:func:`untrusted_reason` from the four fields, for callers that hold rows as tuples."""
    if fit_status not in (None, "ok"):
        return str(fit_status)
    if correlation_trap:
        return "correlation_trap"
    if rank_collapse:
        return "rank_collapse"
    if trusted is False:
        return "untrusted"
    return None


def untrusted_reasons(
    fit_status: Sequence[str | None],
    correlation_trap: Sequence[bool | None],
    rank_collapse: Sequence[bool | None],
    trusted: Sequence[bool | None],
) -> np.ndarray:
    """:func:`untrusted_reason_of` of rows given as columns: an object array of reasons (None
    where trusted). The rule is applied once per distinct combination, not once per row."""
    keys = list(zip(fit_status, correlation_trap, rank_collapse, trusted, strict=True))
    memo = {key: untrusted_reason_of(*key) for key in set(keys)}
    return np.fromiter(map(memo.__getitem__, keys), dtype=object, count=len(keys))


def exclusions(
    values: np.ndarray,
    alpha: np.ndarray,
    reasons: np.ndarray,
    *,
    metric: str,
    filter: str,
    alpha_max: float,
) -> np.ndarray:
    """Why each row is left out of a statistic, or None where it is used (the rules of
    :func:`select` before the outlier rule, in their order).

    Args:
        values: the metric per row, float64 (NaN where the row has none).
        alpha: alpha per row, float64 (NaN where the row has none).
        reasons: :func:`untrusted_reasons` of the rows.
    """
    label = np.full(values.shape, None, dtype=object)
    # Assigned from the last rule to the first, so the first rule that applies wins.
    if filter == LayerFilter.TRUSTED:
        untrusted = np.fromiter((r is not None for r in reasons), dtype=bool, count=reasons.size)
        label[untrusted] = reasons[untrusted]
    if metric in ALPHA_METRICS:
        with np.errstate(invalid="ignore"):
            label[alpha > alpha_max] = f"alpha_gt_{alpha_max:g}"
    label[~np.isfinite(values)] = "no_value"
    return label


def chosen(values: np.ndarray, label: np.ndarray, *, outliers: str, mad_k: float) -> Selection:
    """The :class:`Selection` of rows given their values and :func:`exclusions` labels: the
    used values sorted, then the outlier rule applied to them."""
    used = np.fromiter((x is None for x in label), dtype=bool, count=label.size)
    excluded: Counter[str] = Counter(label[~used].tolist())
    # Sorted: every statistic then sees the same array whatever order the rows came in.
    kept = np.sort(values[used].astype(np.float64, copy=False))
    if outliers == OutlierRule.MAD and kept.size >= 3:
        median = float(np.median(kept))
        mad = 1.4826 * float(np.median(np.abs(kept - median)))
        if mad > 0:
            keep = np.abs(kept - median) <= mad_k * mad
            if (~keep).any():
                excluded["mad_outlier"] += int((~keep).sum())
            kept = kept[keep]
    return Selection(values=kept, excluded=dict(excluded))


def select(
    layers: Iterable[Mapping[str, Any]],
    *,
    metric: str = "alpha",
    filter: str = DEFAULT_FILTER,
    alpha_max: float,
    outliers: str = DEFAULT_OUTLIER_RULE,
    mad_k: float,
) -> Selection:
    """Pick the values of ``metric`` that a robust statistic may use.

    Rules, in order: a layer without a value is excluded (``no_value``); for alpha-like metrics
    α > ``alpha_max`` is excluded (``alpha_gt_8``), as weightwatcher's maintainers advise;
    with ``filter="trusted"`` untrusted layers are excluded with their reason; with
    ``outliers="mad"`` values farther than ``mad_k`` scaled MADs from the median are excluded.
    The rules live in :func:`exclusions` and :func:`chosen`, which :func:`select_groups`
    applies to many checkpoints' rows at once.
    """
    rows = list(layers)
    return select_groups(
        np.zeros(len(rows), dtype=np.int64),
        values=_floats([x.get(metric) for x in rows]),
        alpha=_floats([x.get("alpha") for x in rows]),
        reasons=untrusted_reasons(
            [x.get("fit_status") for x in rows],
            [x.get("correlation_trap") for x in rows],
            [x.get("rank_collapse") for x in rows],
            [x.get("trusted") for x in rows],
        )
        if filter == LayerFilter.TRUSTED
        else np.full(len(rows), None, dtype=object),
        metric=metric,
        filter=filter,
        alpha_max=alpha_max,
        outliers=outliers,
        mad_k=mad_k,
    ).get(0) or Selection(values=np.zeros(0, dtype=np.float64))


def _floats(column: Sequence[Any]) -> np.ndarray:
    """A column as float64, None (and anything not a number) as NaN."""
    try:
        return np.asarray(column, dtype=np.float64).reshape(len(column))
    except (TypeError, ValueError):
        out = np.full(len(column), np.nan)
        for i, v in enumerate(column):
            with contextlib.suppress(TypeError, ValueError):
                out[i] = float(v)
        return out


def select_groups(
    groups: np.ndarray,
    *,
    values: np.ndarray,
    alpha: np.ndarray,
    reasons: np.ndarray,
    metric: str,
    filter: str,
    alpha_max: float,
    outliers: str,
    mad_k: float,
) -> dict[int, Selection]:
    """:func:`select` of each group of rows (a checkpoint, a block of one), from columns.

    ``groups`` is an integer key per row; the rows' ``values`` and ``alpha`` are float64 (NaN
    where none) and ``reasons`` their :func:`untrusted_reasons`. A trend computed from layer
    rows runs the rules once over every row, not once per checkpoint.
    """
    label = exclusions(values, alpha, reasons, metric=metric, filter=filter, alpha_max=alpha_max)
    if groups.size == 0:
        return {}
    # Stable: inside a group the rows keep their order, so the reasons are counted in it.
    order = np.argsort(groups, kind="stable")
    ordered = groups[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    out: dict[int, Selection] = {}
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        rows = order[start:end]
        out[int(ordered[start])] = chosen(values[rows], label[rows], outliers=outliers, mad_k=mad_k)
    return out


def trimmed_mean(values: np.ndarray, proportion: float = TRIM) -> float:
    """Mean after dropping ``proportion`` of the values at each end (as scipy's trim_mean)."""
    ordered = np.sort(values)
    cut = int(proportion * ordered.size)
    return float(ordered[cut : ordered.size - cut].mean())


def statistic(values: np.ndarray, stat: str) -> float | None:
    """One statistic of ``values``; None when there is no value to summarise."""
    if values.size == 0:
        return None
    if stat == Statistic.MEDIAN:
        return float(np.median(values))
    if stat == Statistic.MEAN:
        return float(values.mean())
    if stat == Statistic.TRIMMED_MEAN:
        return trimmed_mean(values)
    if stat == Statistic.IQR:
        return float(np.percentile(values, 75) - np.percentile(values, 25))
    if stat in STATS and stat.startswith("p") and stat[1:].isdigit():
        return float(np.percentile(values, int(stat[1:])))
    raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")


def describe(values: np.ndarray) -> dict[str, float | None]:
    """Every statistic of :data:`STATS` at once (the same numbers as :func:`statistic`)."""
    if values.size == 0:
        return dict.fromkeys(STATS)
    # One percentile call for the four quantiles: element for element the same arithmetic as
    # four calls, at a quarter of numpy's per-call overhead (trends make one per checkpoint).
    p10, p25, p75, p90 = (float(v) for v in np.percentile(values, (10, 25, 75, 90)))
    return {
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "trimmed_mean": trimmed_mean(values),
        "p10": p10,
        "p25": p25,
        "p75": p75,
        "p90": p90,
        "iqr": p75 - p25,
    }


def summarize(layers: Sequence[Mapping[str, Any]], *, thresholds: Thresholds) -> dict[str, Any]:
    """Model-level alpha of one checkpoint: trusted layers, alpha > alpha_max excluded."""
    chosen = select(
        layers,
        metric="alpha",
        filter="trusted",
        alpha_max=thresholds.alpha_max,
        mad_k=thresholds.mad_k,
    )
    n = len(layers)
    untrusted = sum(1 for layer in layers if untrusted_reason(layer) is not None)
    return {
        "n_layers": n,
        "n_used": chosen.n_used,
        "n_excluded": chosen.n_excluded,
        "excluded": chosen.excluded,
        "untrusted_share": (untrusted / n) if n else None,
        **{f"alpha_{k}": v for k, v in describe(chosen.values).items()},
    }
