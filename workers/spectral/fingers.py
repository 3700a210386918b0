"""Finger-robust power-law fits: weightwatcher 0.7.7's ``fix_fingers`` options, vectorised.

"Fingers" are a few outlying eigenvalues at the top of a spectrum. They pull the KS-chosen xmin
up into a short tail and give a spuriously large alpha. weightwatcher offers two fixes, applied
through the powerlaw package (1.5); these are the same computations on every candidate xmin at
once:

``xmin_peak`` (``fix_fingers='xmin_peak'``)
    Histogram log10 λ (λ > 1e-5) in 100 bins; with p = 10^(left edge of the fullest bin), xmin
    may only be chosen among the eigenvalues between log10(0.95·p) and 1.5·p (weightwatcher
    passes the lower end as a log10 — we keep its numbers, quirk included — and powerlaw takes
    the range's min and max and skips the largest candidate in it). α and D as in ``ww``, on
    the whole tail above each candidate.
``clip_xmax`` (``fix_fingers='clip_xmax'``)
    The plain fit of the whole spectrum, then of the spectrum without its 2, 3, ... 9 largest
    values; the first clipped fit whose α is more than 1 below the unclipped one wins (the
    number of clipped fingers is then k − 1, as weightwatcher counts). Clipping stops early when
    a clipped α falls to 2 or below; the unclipped fit stands if no clip qualifies.

The tail size reported is, as weightwatcher reports it, the number of eigenvalues ≥ xmin in the
whole spectrum (clipped fingers included); ``sigma`` is powerlaw's (α − 1)/√n over the fitted
values.
"""

from __future__ import annotations

import numpy as np

from alphawatch.workers.spectral.ks import (
    _PRUNE_BELOW,
    EVALS_THRESH,
    bootstrap_delta,
    pruned_best,
    tail_alphas,
)
from alphawatch.workers.spectral.types import PowerLawFit

PEAK_BINS = 100
"""Histogram bins of log10 λ whose fullest one locates the ESD's peak (weightwatcher's)."""
MAX_FINGERS = 10
"""weightwatcher's ``DEFAULT_MAX_FINGERS``: clips of 2..MAX_FINGERS − 1 values are tried."""
FINGER_THRESH = 1.0
"""A clip wins when α drops by more than this (weightwatcher's ``DEFAULT_FINGER_THRESH``)."""
CLIP_MIN_ALPHA = 2.0
"""Clipping stops when the clipped α falls to this or below (weightwatcher's ``min_alpha``)."""
_CHUNK_ELEMENTS = 1 << 22


def _tail_ks(logs: np.ndarray, starts: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """KS distance max_j |1 − (λ_j/xmin)^(1−α) − j/n| of the tails starting at ``starts``."""
    total = logs.size
    out = np.empty(starts.size, dtype=np.float64)
    j = np.arange(total)
    chunk = max(1, _CHUNK_ELEMENTS // max(total, 1))
    for lo in range(0, starts.size, chunk):
        idx = starts[lo : lo + chunk]
        a = alphas[lo : lo + chunk]
        k = (j[None, :] - idx[:, None]).astype(np.float64)
        n = (total - idx).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            cdf = 1.0 - np.exp((1.0 - a[:, None]) * (logs[None, :] - logs[idx][:, None]))
        gap = np.where(k >= 0, np.abs(cdf - k / n[:, None]), 0.0)
        out[lo : lo + chunk] = gap.max(axis=1)
    return out


def _best(data: np.ndarray, starts: np.ndarray) -> tuple[int, float, float, np.ndarray] | None:
    """powerlaw 1.5's choice among candidate start indices: the valid (α > 1) smallest D.

    Returns (start index, α, D, the α of every candidate), or None without a valid candidate.
    """
    if starts.size == 0:
        return None
    logs = np.log(data)
    all_alphas, n = tail_alphas(logs)
    alphas = all_alphas[starts]
    valid = np.isfinite(alphas) & (alphas > 1.0)
    if not valid.any():
        return None
    if data.size >= _PRUNE_BELOW:  # the same choice, without every candidate's distance
        found = pruned_best(logs, all_alphas, n, starts[valid])
        if found is not None:
            start, distance = found
            return start, float(all_alphas[start]), distance, alphas
    ds = np.full(starts.size, np.inf)
    ds[valid] = _tail_ks(logs, starts[valid], alphas[valid])
    i = int(np.argmin(ds))
    return int(starts[i]), float(alphas[i]), float(ds[i]), alphas


def _unique_starts(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Indices of the distinct values in [lo, hi], the largest of them left out (powerlaw 1.5)."""
    inside = np.flatnonzero((data >= lo) & (data <= hi))
    if inside.size == 0:
        return inside
    _, first = np.unique(data[inside], return_index=True)
    return np.asarray(inside[first][:-1], dtype=np.int64)


def _fit_of(
    method: str,
    data: np.ndarray,
    all_evals: np.ndarray,
    start: int,
    alpha: float,
    D: float,
    neighbours: list[float],
    num_fingers: int,
    samples: int,
    seed: int,
) -> PowerLawFit:
    xmin = float(data[start])
    fitted = data.size - start
    delta = max((abs(a - alpha) for a in neighbours if np.isfinite(a)), default=0.0)
    if samples > 0 and fitted >= 2:
        logs = np.log(data[start:])
        delta = max(delta, bootstrap_delta(logs - logs[0], samples, seed))
    return PowerLawFit(
        method=method,
        alpha=alpha,
        xmin=xmin,
        xmax=float(data[-1]),
        D=D,
        n=int(np.count_nonzero(all_evals >= xmin)),
        sigma=float((alpha - 1.0) / np.sqrt(fitted)),
        alpha_delta=float(delta),
        num_fingers=num_fingers,
    )


def peak_of(data: np.ndarray) -> float:
    """10^(left edge of the fullest of 100 log10 bins): where the ESD peaks."""
    counts, edges = np.histogram(np.log10(data), bins=PEAK_BINS)
    return float(10 ** edges[int(np.argmax(counts))])


def fit_xmin_peak(
    evals: np.ndarray, *, bootstrap_samples: int = 0, seed: int = 0
) -> PowerLawFit | None:
    """weightwatcher's ``fix_fingers='xmin_peak'`` fit (see the module docstring)."""
    values = np.sort(np.asarray(evals, dtype=np.float64))
    data = values[values > EVALS_THRESH]
    if data.size < 2:
        return None
    peak = peak_of(data)
    ends = (float(np.log10(0.95 * peak)), 1.5 * peak)
    starts = _unique_starts(data, min(ends), max(ends))
    best = _best(data, starts)
    if best is None:
        return None
    start, alpha, D, alphas = best
    i = int(np.flatnonzero(starts == start)[0])
    neighbours = [float(alphas[j]) for j in (i - 1, i + 1) if 0 <= j < alphas.size]
    return _fit_of(
        "xmin_peak", data, values, start, alpha, D, neighbours, 0, bootstrap_samples, seed
    )


def _plain(data: np.ndarray) -> tuple[int, float, float, np.ndarray] | None:
    return _best(data, _unique_starts(data, float(data[0]), float(data[-1])))


def fit_clip_xmax(
    evals: np.ndarray, *, bootstrap_samples: int = 0, seed: int = 0
) -> PowerLawFit | None:
    """weightwatcher's ``fix_fingers='clip_xmax'`` fit (see the module docstring)."""
    values = np.sort(np.asarray(evals, dtype=np.float64))
    data = values[values > EVALS_THRESH]
    if data.size < 2:
        return None
    first = _plain(data)
    if first is None:
        return None
    chosen, clipped, fingers = first, data, 0
    for k in range(2, MAX_FINGERS):
        if data.size - k < 2:
            break
        fit = _plain(data[:-k])
        if fit is None:
            break
        if fit[1] + FINGER_THRESH < first[1]:
            chosen, clipped, fingers = fit, data[:-k], k - 1
            break
        if fit[1] <= CLIP_MIN_ALPHA:
            break
    start, alpha, D, alphas = chosen
    neighbours = [float(alphas[j]) for j in (start - 1, start + 1) if 0 <= j < alphas.size]
    return _fit_of(
        "clip_xmax", clipped, values, start, alpha, D, neighbours, fingers, bootstrap_samples, seed
    )
