"""Robust model-level statistics over layers: pure functions, shared by trend, gate and CLI.

Which layers count, and why the others do not, is decided here once: the dashboard, the REST
trend, the CI gate and ``alphawatch analyze`` all report the same numbers.
"""

from __future__ import annotations

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
    """
    kept: list[float] = []
    excluded: Counter[str] = Counter()
    for layer in layers:
        value = layer.get(metric)
        if value is None or not np.isfinite(value):
            excluded["no_value"] += 1
            continue
        alpha = layer.get("alpha")
        if metric in ALPHA_METRICS and alpha is not None and alpha > alpha_max:
            excluded[f"alpha_gt_{alpha_max:g}"] += 1
            continue
        if filter == LayerFilter.TRUSTED:
            reason = untrusted_reason(layer)
            if reason is not None:
                excluded[reason] += 1
                continue
        kept.append(float(value))
    # Sorted: every statistic then sees the same array whatever order the rows came in.
    values = np.sort(np.asarray(kept, dtype=np.float64))
    if outliers == OutlierRule.MAD and values.size >= 3:
        median = float(np.median(values))
        mad = 1.4826 * float(np.median(np.abs(values - median)))
        if mad > 0:
            keep = np.abs(values - median) <= mad_k * mad
            if (~keep).any():
                excluded["mad_outlier"] += int((~keep).sum())
            values = values[keep]
    return Selection(values=values, excluded=dict(excluded))


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
