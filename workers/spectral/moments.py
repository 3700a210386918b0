"""W's entry moments, its Marchenko–Pastur bulk and spikes, its numerical rank and entropy.

Everything here reads W's entries or its spectrum (:class:`Spectrum`), never computes one:
the bulk is the one an iid matrix with W's entry variance would have (Martin & Mahoney 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from alphawatch.workers.spectral.device import (
    Device,
    Matrix,
    device_tensor,
    entry_count,
    host_array,
)
from alphawatch.workers.spectral.eigenvalues import Spectrum

# Machine epsilon of each stored dtype, by name: torch's dtypes print as ``torch.<name>``,
# numpy's as ``<name>``; numpy has no bfloat16 or float8, so their values are written out
# (torch.finfo gives the same, but for float8_e5m2fnuz: 2⁻³, where its values next to 1 are
# 1.25 and 0.875). Integer and unknown dtypes get float32's.
_EPS = {
    "float64": float(np.finfo(np.float64).eps),
    "float32": float(np.finfo(np.float32).eps),
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
    "float8_e4m3fn": 2.0**-3,
    "float8_e5m2": 2.0**-2,
    "float8_e4m3fnuz": 2.0**-3,
    "float8_e5m2fnuz": 2.0**-2,  # AMD's, same mantissas
}


RANK_EPS_FLOOR = _EPS["float32"]
"""No rank tolerance finer than this fraction of σmax, whatever the stored dtype: the float64
Gram matrix resolves σ to ~2e-8·σmax (the noise singular values of an exactly low-rank float64
matrix), and checkpoints are read as float32. Without it a rank-8 float64 matrix had rank 67."""


def dtype_eps(dtype: object) -> float:
    """Machine epsilon of a stored dtype (a torch or numpy dtype, or its name); float32's for
    None, integer and unknown dtypes."""
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    return _EPS.get(name, _EPS["float32"])


@dataclass(frozen=True)
class Moments:
    """Entry statistics of W (float64 sums): finite or not, constant or not, mean, variance."""

    finite: bool
    constant: bool
    mean: float
    variance: float  # unbiased (n − 1), as torch's and weightwatcher's; NaN until known


def moments_of(weight: Matrix, dev: Device) -> Moments:
    """Whether W is finite and non-constant, and its entries' mean (and on the accelerator path,
    variance).

    On the host the variance is left to :func:`with_variance`, which takes Σw² from W's spectrum
    instead of two more passes over W with a float64 temporary, and NaN/Inf are found by the
    sum: a sum of finite float32 values cannot overflow float64, so it is finite exactly when
    every entry is (a float64 W whose sum overflows is checked entry by entry).
    """
    if dev.accelerated:
        import torch

        flat = device_tensor(weight, dev).to(torch.float64)
        finite = bool(torch.isfinite(flat).all())
        return Moments(
            finite=finite,
            constant=finite and bool(flat.min() == flat.max()),
            mean=float(flat.mean()),
            variance=float(flat.var()),
        )
    w = host_array(weight)
    with np.errstate(over="ignore", invalid="ignore"):  # Inf − Inf, or a float64 overflow
        total = float(w.sum(dtype=np.float64))
    if not np.isfinite(total) and not (w.dtype == np.float64 and np.isfinite(w).all()):
        return Moments(finite=False, constant=False, mean=float("nan"), variance=float("nan"))
    return Moments(
        finite=True, constant=bool(w.min() == w.max()), mean=total / w.size, variance=float("nan")
    )


def with_variance(moments: Moments, spec: Spectrum, weight: Matrix) -> Moments:
    """``moments`` with the variance of W's entries, from Σw² = Σλ (the trace of the Gram
    matrices, to ~1e-13 relative) when the mean does not cancel most of it, else in two passes."""
    if not np.isnan(moments.variance):
        return moments
    count = entry_count(weight)
    centred = spec.norm - count * moments.mean * moments.mean
    if centred > 1e-3 * spec.norm:
        variance = centred / (count - 1)
    else:
        variance = float(host_array(weight).var(dtype=np.float64, ddof=1))
    return replace(moments, variance=variance)


def bulk_of(moments: Moments, spec: Spectrum, n: int, m: int) -> Bulk:
    """The MP bulk an iid n×m matrix with W's entry variance would have; spikes beyond it."""
    variance, mean = moments.variance, moments.mean
    edge, tw = mp_edge(variance, n, m)
    return Bulk(
        variance=variance,
        mean=mean,
        edge=edge,
        tw_scale=tw,
        edge_spikes=int(np.count_nonzero(spec.evals > edge)),
    )


def mp_edge(variance: float, n: int, m: int) -> tuple[float, float]:
    """MP bulk edge of an n×m iid matrix with entry variance, and the Tracy–Widom scale."""
    sn, sm = np.sqrt(max(n - 1, 1)), np.sqrt(m)
    edge = variance * (sn + sm) ** 2
    scale = variance * (sn + sm) * (1.0 / sn + 1.0 / sm) ** (1.0 / 3.0)
    return float(edge), float(scale)


@dataclass(frozen=True)
class Bulk:
    """Marchenko–Pastur bulk of an iid matrix with W's entry variance: edge λ+, TW scale, and
    W's eigenvalues beyond λ+ (``edge_spikes``; weightwatcher's ``num_spikes`` fits the bulk
    to the ESD instead, :mod:`mpfit`)."""

    variance: float
    mean: float
    edge: float
    tw_scale: float
    edge_spikes: int


@dataclass(frozen=True)
class Rank:
    """Numerical rank with a tolerance matched to the stored dtype, and the spectral entropy."""

    matrix_rank: int
    rank_loss: int
    rank_collapse: bool
    entropy: float | None


def rank_of(spec: Spectrum, stored_dtype: object, n: int, rank_loss_fraction: float) -> Rank:
    """Rank at tolerance σmax · eps(stored dtype); collapse when the loss passes the fraction."""
    num_evals = int(spec.evals.size)
    tol_eps = max(dtype_eps(stored_dtype), RANK_EPS_FLOOR)
    rank = int(sum(int(np.count_nonzero(s > s.max() * tol_eps)) for s in spec.svals))
    sv = np.sqrt(spec.evals)
    ent_rank = int(np.count_nonzero(sv > sv.max() * n * np.finfo(np.float64).eps))
    p = spec.evals / spec.norm + 1e-10
    entropy = float(-np.sum(p * np.log(p)) / np.log(ent_rank + 1e-10)) if ent_rank > 1 else None
    return Rank(
        matrix_rank=rank,
        rank_loss=num_evals - rank,
        rank_collapse=num_evals - rank > rank_loss_fraction * num_evals,
        entropy=entropy,
    )
