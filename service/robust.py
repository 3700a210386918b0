"""Robust model-level statistics over layers: pure functions, shared by trend, gate and CLI.

Which layers count, and why the others do not, is decided here once: the dashboard, the REST
trend, the CI gate and ``alphawatch analyze`` all report the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
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


@dataclass(frozen=True)
class Reasons:
    """Why each of many rows is not trusted, as categories: ``codes[i]`` indexes ``labels``,
    whose first entry is None (trusted). Rules then run as integer comparisons, not once per
    row in Python."""

    codes: np.ndarray
    labels: tuple[str | None, ...] = (None,)

    @classmethod
    def trusted(cls, n: int) -> Reasons:
        """``n`` rows none of which has a reason."""
        return cls(np.zeros(n, dtype=np.int64))

    @classmethod
    def of_keys(
        cls, keys: Sequence[Hashable] | np.ndarray, reason_of: Callable[[Any], str | None]
    ) -> Reasons:
        """The reasons of rows given as keys (tuples of a row's fields, or an array of small
        non-negative integers that encode them): ``reason_of`` is applied once per distinct
        key, not once per row."""
        labels: list[str | None] = [None]
        code_of: dict[str | None, int] = {None: 0}

        def code(key: Any) -> int:
            reason = reason_of(key)
            if reason not in code_of:
                code_of[reason] = len(labels)
                labels.append(reason)
            return code_of[reason]

        if isinstance(keys, np.ndarray):
            # Small non-negative integers: a table from key to code, not a sort of the rows.
            present = np.flatnonzero(np.bincount(keys.astype(np.int64, copy=False)))
            table = np.zeros(present[-1] + 1 if present.size else 0, dtype=np.int64)
            table[present] = [code(k) for k in present.tolist()]
            return cls(table[keys], tuple(labels))
        memo = {key: code(key) for key in set(keys)}
        return cls(
            np.fromiter(map(memo.__getitem__, keys), dtype=np.int64, count=len(keys)),
            tuple(labels),
        )

    def tolist(self) -> list[str | None]:
        """The reason of each row, None where trusted."""
        return [self.labels[c] for c in self.codes.tolist()]


def untrusted_reasons(
    fit_status: Sequence[str | None],
    correlation_trap: Sequence[bool | None],
    rank_collapse: Sequence[bool | None],
    trusted: Sequence[bool | None],
) -> Reasons:
    """:func:`untrusted_reason_of` of rows given as columns. The rule is applied once per
    distinct combination, not once per row."""
    return Reasons.of_keys(
        list(zip(fit_status, correlation_trap, rank_collapse, trusted, strict=True)),
        lambda key: untrusted_reason_of(*key),
    )


def exclusions(
    values: np.ndarray,
    alpha: np.ndarray,
    reasons: Reasons,
    *,
    metric: str,
    filter: str,
    alpha_max: float,
) -> Reasons:
    """Why each row is left out of a statistic, code 0 where it is used (the rules of
    :func:`select` before the outlier rule, in their order).

    Args:
        values: the metric per row, float64 (NaN where the row has none).
        alpha: alpha per row, float64 (NaN where the row has none).
        reasons: :func:`untrusted_reasons` of the rows.
    """
    labels = list(reasons.labels)
    # Assigned from the last rule to the first, so the first rule that applies wins.
    code = (
        reasons.codes.copy() if filter == LayerFilter.TRUSTED else np.zeros(values.shape, np.int64)
    )
    if metric in ALPHA_METRICS:
        with np.errstate(invalid="ignore"):
            code[alpha > alpha_max] = len(labels)
        labels.append(f"alpha_gt_{alpha_max:g}")
    code[~np.isfinite(values)] = len(labels)
    labels.append("no_value")
    return Reasons(code, tuple(labels))


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
        else Reasons.trusted(len(rows)),
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
    reasons: Reasons,
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
    keys, group_of = np.unique(groups, return_inverse=True)
    group_of = group_of.reshape(-1)
    used = label.codes == 0
    # Reasons counted in the rows' order, each group's in its own dict (as a Counter of one
    # group's rows counts them): each (group, reason) once, in the order of its first row.
    excluded: list[dict[str, int]] = [{} for _ in range(keys.size)]
    left_out = np.flatnonzero(~used)
    width = len(label.labels)
    pairs, first, counts = np.unique(
        group_of[left_out] * width + label.codes[left_out], return_index=True, return_counts=True
    )
    for i in np.argsort(first, kind="stable").tolist():
        g, code = divmod(int(pairs[i]), width)
        reason = str(label.labels[code])
        excluded[g][reason] = excluded[g].get(reason, 0) + int(counts[i])
    # The used values sorted inside each group, the groups one after the other: every
    # statistic then sees the same array whatever order the rows came in.
    rows = np.flatnonzero(used)
    kept = values[rows].astype(np.float64, copy=False)
    kept_group = group_of[rows]
    order = np.lexsort((kept, kept_group))
    kept, kept_group = kept[order], kept_group[order]
    sizes = np.bincount(kept_group, minlength=keys.size)
    if outliers == OutlierRule.MAD:
        keep = _within_mad(kept, kept_group, sizes, mad_k)
        dropped = np.bincount(kept_group[~keep], minlength=keys.size)
        for g in np.flatnonzero(dropped).tolist():
            excluded[g]["mad_outlier"] = excluded[g].get("mad_outlier", 0) + int(dropped[g])
        kept, sizes = kept[keep], sizes - dropped
    starts = (np.cumsum(sizes) - sizes).tolist()
    return {
        int(key): Selection(values=kept[start : start + size], excluded=excluded[g])
        for g, (key, start, size) in enumerate(
            zip(keys.tolist(), starts, sizes.tolist(), strict=True)
        )
    }


def _within_mad(kept: np.ndarray, group: np.ndarray, sizes: np.ndarray, mad_k: float) -> np.ndarray:
    """Which of the sorted groups' values the MAD rule keeps: in a group of three values or
    more whose scaled MAD is positive, those within ``mad_k`` scaled MADs of its median."""
    starts = np.cumsum(sizes) - sizes
    ruled = np.flatnonzero(sizes >= 3)
    median = np.full(sizes.size, np.nan)
    median[ruled] = _medians(kept, starts[ruled], sizes[ruled])
    with np.errstate(invalid="ignore"):
        deviation = np.abs(kept - median[group])
    mad = np.full(sizes.size, np.nan)
    mad[ruled] = 1.4826 * _medians(
        deviation[np.lexsort((deviation, group))], starts[ruled], sizes[ruled]
    )
    applies = np.zeros(sizes.size, dtype=bool)
    applies[ruled] = mad[ruled] > 0
    with np.errstate(invalid="ignore"):
        within: np.ndarray = ~applies[group] | (deviation <= mad_k * mad[group])
    return within


def statistic(values: np.ndarray, stat: str) -> float | None:
    """One statistic of ``values``; None when there is no value to summarise."""
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    return describe(values)[stat]


def describe(values: np.ndarray) -> dict[str, float | None]:
    """Every statistic of :data:`STATS` of ``values`` (any order): :func:`describe_groups` of
    one group."""
    return describe_groups(np.sort(np.asarray(values, dtype=np.float64)), [values.size])[0]


def describe_all(selections: Sequence[Selection]) -> list[dict[str, float | None]]:
    """:func:`describe` of each selection's values, all at once (:func:`describe_groups`)."""
    if not selections:
        return []
    values = np.concatenate([s.values for s in selections])
    return describe_groups(values, [s.n_used for s in selections])


# np.percentile's own quantiles for 10, 25, 75 and 90: (10, 25, 75, 90) / 100.
_QUANTILES = np.true_divide((10, 25, 75, 90), 100)


def describe_groups(
    values: np.ndarray, counts: Sequence[int] | np.ndarray
) -> list[dict[str, float | None]]:
    """Every statistic of :data:`STATS` of many groups at once, None for an empty group.

    ``values`` holds the groups one after the other, each sorted (as :func:`select_groups` leaves
    them), group ``g`` being ``counts[g]`` values long. Medians and percentiles of all groups
    are taken in a few array operations with NumPy's own arithmetic (``np.percentile``'s
    linear interpolation, ``np.median``'s mean of the two middle values), so each number is,
    bit for bit, what ``np.median``, ``np.percentile`` and ``mean`` give for that group alone
    (``tests/service/test_robust_columns.py``); one such set of calls per group cost 0.24 ms,
    and a trend computed from layer rows describes 500 groups.
    """
    sizes = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    out: list[dict[str, float | None]] = [dict.fromkeys(STATS) for _ in range(sizes.size)]
    filled = np.flatnonzero(sizes > 0)
    if filled.size == 0:
        return out
    n, start = sizes[filled], starts[filled]
    medians = _medians(values, start, n)
    # np.percentile, method "linear": virtual index (n - 1) * q between its two neighbours,
    # both the last value once the index reaches it; NumPy's _lerp, including its second
    # form where the weight is at least a half.
    virtual = (n[:, None] - 1) * _QUANTILES
    below = np.floor(virtual)
    last = n[:, None] - 1
    lower = np.minimum(below.astype(np.int64), last)
    upper = np.minimum(lower + 1, last)
    weight = virtual - below
    a, b = values[start[:, None] + lower], values[start[:, None] + upper]
    step = b - a
    quantiles = a + step * weight
    high = weight >= 0.5
    quantiles[high] = (b - step * (1 - weight))[high]
    at_last = virtual >= last
    quantiles[at_last] = b[at_last]
    means, trimmed = _means(values, start, n, (TRIM * n).astype(np.int64))
    for g, median, mean, cut_mean, (p10, p25, p75, p90) in zip(
        filled.tolist(),
        medians.tolist(),
        means.tolist(),
        trimmed.tolist(),
        quantiles.tolist(),
        strict=True,
    ):
        out[g] = {
            "median": median,
            "mean": mean,
            "trimmed_mean": cut_mean,
            "p10": p10,
            "p25": p25,
            "p75": p75,
            "p90": p90,
            "iqr": p75 - p25,
        }
    return out


def _means(
    values: np.ndarray, starts: np.ndarray, counts: np.ndarray, cuts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each non-empty sorted group and of its values less ``cuts`` at either end, as
    ``mean()`` takes them: a pairwise sum over the values, divided by their count. Groups of one
    length are summed as the rows of one array, each row by the same pairwise sum as a group
    alone (NumPy sums the contiguous last axis so), instead of one call per group."""
    means = np.empty(counts.size)
    trimmed = np.empty(counts.size)
    for out, first, length in (
        (means, starts, counts),
        (trimmed, starts + cuts, counts - 2 * cuts),
    ):
        for size in np.unique(length).tolist():
            which = np.flatnonzero(length == size)
            rows = values[first[which, None] + np.arange(size)]
            out[which] = np.add.reduce(rows, axis=1) / size
    return means, trimmed


def _medians(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The median of each non-empty sorted group, as ``np.median`` takes it: the middle value,
    or the mean of the two middle values."""
    middle = starts + counts // 2
    even = counts % 2 == 0
    medians: np.ndarray = values[middle].copy()
    medians[even] = (values[middle[even] - 1] + values[middle[even]]) / 2
    return medians


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
