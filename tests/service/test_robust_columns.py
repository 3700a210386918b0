"""The selection rules applied to columns of many checkpoints' rows give what the rules applied
one layer at a time give.

``robust.select`` (one checkpoint's layer dicts) and ``robust.select_groups`` (the columns of
every checkpoint a trend computes from layer rows) share ``exclusions`` and ``chosen``. The
oracle below is the rules written out one layer at a time, as the docstring of ``select``
states them; rows are drawn with every kind of value the database holds (None, NaN, ±inf,
alphas either side of ``alpha_max``, each fit status, flags True/False/None).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alphawatch.service import robust
from alphawatch.vocabulary import FitStatus, LayerFilter, OutlierRule

ALPHA_MAX = 8.0
MAD_K = 3.0

values = st.one_of(
    st.none(),
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(-float("inf")),
    st.floats(min_value=0.5, max_value=12.0, allow_nan=False),
    st.sampled_from([2.0, 4.0, 8.0, 8.000001]),
)
flags = st.sampled_from([None, True, False])
layer = st.fixed_dictionaries(
    {
        "alpha": values,
        "stable_rank": values,
        "fit_status": st.sampled_from([None, *(s.value for s in FitStatus)]),
        "correlation_trap": flags,
        "rank_collapse": flags,
        "trusted": flags,
        "checkpoint": st.integers(min_value=1, max_value=6),
    }
)


def oracle(layers: list[dict[str, Any]], *, metric: str, filter: str, outliers: str) -> Any:
    """The rules of ``robust.select``, one layer at a time."""
    kept: list[float] = []
    excluded: Counter[str] = Counter()
    for row in layers:
        value = row.get(metric)
        if value is None or not np.isfinite(value):
            excluded["no_value"] += 1
            continue
        alpha = row.get("alpha")
        if metric in robust.ALPHA_METRICS and alpha is not None and alpha > ALPHA_MAX:
            excluded[f"alpha_gt_{ALPHA_MAX:g}"] += 1
            continue
        if filter == LayerFilter.TRUSTED and robust.untrusted_reason(row) is not None:
            excluded[str(robust.untrusted_reason(row))] += 1
            continue
        kept.append(float(value))
    used = np.sort(np.asarray(kept, dtype=np.float64))
    if outliers == OutlierRule.MAD and used.size >= 3:
        median = float(np.median(used))
        mad = 1.4826 * float(np.median(np.abs(used - median)))
        if mad > 0:
            keep = np.abs(used - median) <= MAD_K * mad
            if (~keep).any():
                excluded["mad_outlier"] += int((~keep).sum())
            used = used[keep]
    return used, dict(excluded)


SELECTIONS = list(
    itertools.product(
        ["alpha", "stable_rank"],
        [f.value for f in LayerFilter],
        [r.value for r in OutlierRule],
    )
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(layer, max_size=40), which=st.sampled_from(SELECTIONS))
def test_select_and_select_groups_follow_the_rules(
    rows: list[dict[str, Any]], which: tuple[str, str, str]
) -> None:
    metric, flt, outliers = which
    options = {"metric": metric, "filter": flt, "outliers": outliers}

    chosen = robust.select(rows, alpha_max=ALPHA_MAX, mad_k=MAD_K, **options)
    used, excluded = oracle(rows, **options)
    assert np.array_equal(chosen.values, used)
    assert chosen.excluded == excluded

    grouped = robust.select_groups(
        np.asarray([r["checkpoint"] for r in rows], dtype=np.int64),
        values=np.asarray([r[metric] for r in rows], dtype=np.float64),
        alpha=np.asarray([r["alpha"] for r in rows], dtype=np.float64),
        reasons=robust.untrusted_reasons(
            [r["fit_status"] for r in rows],
            [r["correlation_trap"] for r in rows],
            [r["rank_collapse"] for r in rows],
            [r["trusted"] for r in rows],
        ),
        alpha_max=ALPHA_MAX,
        mad_k=MAD_K,
        **options,
    )
    assert set(grouped) == {r["checkpoint"] for r in rows}
    for checkpoint, selection in grouped.items():
        of_checkpoint = [r for r in rows if r["checkpoint"] == checkpoint]
        used, excluded = oracle(of_checkpoint, **options)
        assert np.array_equal(selection.values, used)
        assert selection.excluded == excluded
        # Reasons counted in the rows' order, as one checkpoint's select counts them.
        assert list(selection.excluded) == list(excluded)


def test_untrusted_reasons_equal_the_rule_for_every_combination() -> None:
    combos = list(
        itertools.product(
            [None, *(s.value for s in FitStatus)],
            [None, True, False],
            [None, True, False],
            [None, True, False],
        )
    )
    columns = [list(c) for c in zip(*combos, strict=True)]
    reasons = robust.untrusted_reasons(*columns).tolist()
    assert reasons == [robust.untrusted_reason_of(*c) for c in combos]
    assert any(r is None for r in reasons) and any(r == "untrusted" for r in reasons)


@pytest.mark.parametrize("column", [[None, 1.5, "x"], [True, None, 2]])
def test_select_reads_odd_values_as_the_rules_do(column: list[Any]) -> None:
    rows = [{"alpha": v, "fit_status": "ok"} for v in column]
    chosen = robust.select(rows, filter="all", alpha_max=ALPHA_MAX, mad_k=MAD_K)
    numeric = [float(v) for v in column if isinstance(v, int | float) and v is not None]
    assert chosen.values.tolist() == sorted(numeric)
    assert chosen.excluded == {"no_value": len(column) - len(numeric)}


def numpy_describe(values: np.ndarray) -> dict[str, float]:
    """Each statistic of one group as NumPy's own functions take it, one call each."""
    ordered = np.sort(values)
    cut = int(robust.TRIM * ordered.size)
    p10, p25, p75, p90 = (float(np.percentile(ordered, q)) for q in (10, 25, 75, 90))
    return {
        "median": float(np.median(ordered)),
        "mean": float(ordered.mean()),
        "trimmed_mean": float(ordered[cut : ordered.size - cut].mean()),
        "p10": p10,
        "p25": p25,
        "p75": p75,
        "p90": p90,
        "iqr": p75 - p25,
    }


group_values = st.lists(
    st.one_of(
        st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
        st.sampled_from([0.0, -0.0, 1.0, 2.5, 8.0, 1e-300, 5e-324]),
    ),
    max_size=90,
)


@settings(max_examples=200, deadline=None)
@given(groups=st.lists(group_values, min_size=1, max_size=12))
def test_describe_groups_is_numpy_bit_for_bit(groups: list[list[float]]) -> None:
    # Every group's statistics taken at once equal, exactly, NumPy's functions called on that
    # group alone (ties, signed zeros, subnormals, sizes either side of NumPy's 8-wide sums).
    arrays = [np.sort(np.asarray(g, dtype=np.float64)) for g in groups]
    described = robust.describe_groups(np.concatenate(arrays), [a.size for a in arrays])
    for values, got in zip(arrays, described, strict=True):
        if values.size == 0:
            assert got == dict.fromkeys(robust.STATS)
            continue
        assert got == numpy_describe(values)
        assert robust.describe(values[::-1]) == got  # any order
        assert robust.statistic(values, "p90") == got["p90"]


def test_describe_all_of_many_checkpoints_equals_one_at_a_time() -> None:
    rng = np.random.default_rng(7)
    selections = [
        robust.Selection(values=np.sort(rng.lognormal(1.0, 0.5, size=n)))
        for n in rng.integers(0, 300, size=200)
    ]
    assert robust.describe_all(selections) == [
        numpy_describe(s.values) if s.n_used else dict.fromkeys(robust.STATS) for s in selections
    ]


def test_means_of_groups_of_one_length_are_numpy_bit_for_bit() -> None:
    # Groups of one length are summed together as the rows of one array: each mean and trimmed
    # mean must still be, to the bit, what mean() gives for that group alone, on both sides of
    # NumPy's 8-wide unrolled sums, its 128-value pairwise blocks and its 8192-value buffers.
    rng = np.random.default_rng(11)
    arrays = [
        np.sort(rng.standard_normal(size) * 10.0 ** rng.integers(-8, 9, size))
        for size in (1, 7, 8, 9, 127, 128, 129, 1000, 8193, 20000)
        for _ in range(4)
    ]
    described = robust.describe_groups(np.concatenate(arrays), [a.size for a in arrays])
    for values, got in zip(arrays, described, strict=True):
        cut = int(robust.TRIM * values.size)
        expected = [values.mean(), values[cut : values.size - cut].mean()]
        bits = np.asarray([got["mean"], got["trimmed_mean"]]).view(np.int64)
        assert bits.tolist() == np.asarray(expected).view(np.int64).tolist()
