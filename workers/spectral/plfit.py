"""Vectorised power-law fit of an eigenvalue spectrum, weightwatcher-compatible by default.

References: Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review
51 (2009); Martin & Mahoney, "Implicit self-regularization in deep neural networks", JMLR 22
(2021).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from alphawatch.vocabulary import FitMethod
from alphawatch.workers.spectral.types import PowerLawFit

if TYPE_CHECKING:
    import torch

EVALS_THRESH = 1e-5
"""Absolute eigenvalue floor of weightwatcher 0.7.7 (``EVALS_THRESH``) for the ``ww`` method."""
RELATIVE_FLOOR = 1e-6
"""Floor relative to λmax for ``ww_relfloor``: scale-free, unlike the absolute floor."""
FIT_METHODS: tuple[str, ...] = tuple(m.value for m in FitMethod)
"""Every fit method's name; declared once, as :class:`alphawatch.vocabulary.FitMethod`."""
FINGER_METHODS = (FitMethod.XMIN_PEAK.value, FitMethod.CLIP_XMAX.value)
_CHUNK_ELEMENTS = 1 << 22


def tail_floor(evals: np.ndarray, method: str) -> np.ndarray:
    """Eigenvalues that take part in the fit under ``method`` (sorted ascending)."""
    values = np.sort(np.asarray(evals, dtype=np.float64))
    if method == "ww_relfloor":
        top = values[-1] if values.size else 0.0
        return values[values > RELATIVE_FLOOR * top]
    return values[values > EVALS_THRESH]


def tail_alphas(logs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """α of the tail starting at every index but the last (``logs`` ascending); tail sizes."""
    n_total = logs.size
    n = (n_total - np.arange(n_total - 1)).astype(np.float64)
    suffix = np.cumsum(logs[::-1])[::-1][: n_total - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (suffix - n * logs[: n_total - 1])
    return alphas, n


def _on_cpu(device: str | torch.device) -> bool:
    return str(device).split(":", 1)[0] == "cpu"


def _gaps(logs: np.ndarray, alphas: np.ndarray, n: np.ndarray, cand: np.ndarray, *,
          two_sided: bool, device: str | torch.device) -> np.ndarray:
    """Exact KS distance of the tails starting at the indices ``cand`` (one matrix).

    D_i = max_j |1 − (λ_j/λ_i)^(1−α_i) − (j − i)/n_i| over j ≥ i (two-sided: the larger of
    both CDF gaps), written through logs to stay vectorised. numpy on the CPU (no torch in the
    fit's path), torch on an accelerator.
    """
    first = int(cand.min())
    if not _on_cpu(device):
        return _gaps_torch(logs, alphas, n, cand, first, two_sided=two_sided, device=device)
    k = (np.arange(first, logs.size)[None, :] - cand[:, None]).astype(np.float64)
    nn = n[cand, None]
    with np.errstate(over="ignore", invalid="ignore"):
        cdf = 1.0 - np.exp((1.0 - alphas[cand, None]) * (logs[None, first:] - logs[cand, None]))
        emp = k / nn
        gap = np.abs(cdf - emp) if not two_sided else np.maximum(cdf - emp, (k + 1.0) / nn - cdf)
        gap = np.where(k >= 0, gap, 0.0)
    return np.asarray(gap.max(axis=1), dtype=np.float64)


def _gaps_torch(logs: np.ndarray, alphas: np.ndarray, n: np.ndarray, cand: np.ndarray,
                first: int, *, two_sided: bool, device: str | torch.device) -> np.ndarray:
    import torch

    log_t = torch.as_tensor(logs[first:], dtype=torch.float64, device=device)
    idx = torch.as_tensor(cand - first, device=device)
    a = torch.as_tensor(alphas[cand], dtype=torch.float64, device=device)
    nn = torch.as_tensor(n[cand], dtype=torch.float64, device=device)[:, None]
    j = torch.arange(log_t.numel(), device=device)
    k = (j[None, :] - idx[:, None]).to(torch.float64)
    cdf = 1.0 - torch.exp((1.0 - a[:, None]) * (log_t[None, :] - log_t[idx][:, None]))
    emp = k / nn
    gap = (cdf - emp).abs() if not two_sided else torch.maximum(cdf - emp, (k + 1.0) / nn - cdf)
    gap = torch.where(k >= 0, gap, torch.zeros_like(gap))
    return np.asarray(gap.max(dim=1).values.cpu().numpy(), dtype=np.float64)


def _all_ks(logs: np.ndarray, alphas: np.ndarray, n: np.ndarray, *, two_sided: bool,
            device: str | torch.device = "cpu") -> np.ndarray:
    """KS distance of every candidate xmin (1 where α ≤ 1 or undefined), in chunks."""
    out = np.ones(alphas.size, dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(logs.size, 1))
    for start in range(0, alphas.size, chunk):
        stop = min(start + chunk, alphas.size)
        d = _gaps(logs, alphas, n, np.arange(start, stop), two_sided=two_sided, device=device)
        valid = np.isfinite(alphas[start:stop]) & (alphas[start:stop] > 1.0)
        out[start:stop] = np.where(valid, d, 1.0)
    return out


_BOUND_POINTS = 64
_PRUNE_BELOW = 256
_MARGIN = 1e-12
_FIRST_EXACT = 8


def _best_ks(logs: np.ndarray, alphas: np.ndarray, n: np.ndarray, *, two_sided: bool,
             device: str | torch.device = "cpu") -> tuple[int, float]:
    """``i = argmin(_all_ks(...))`` and its distance, without every candidate's full distance.

    The gap of candidate i evaluated at ``_BOUND_POINTS`` positions spread over its tail is a
    lower bound of its distance D_i (a maximum over fewer positions). Candidates are computed
    exactly in increasing order of that bound, in batches of 8, 16, 32, ..., until the next
    bound exceeds the smallest exact distance found: every candidate left has a larger D, so
    the minimum, and the first index reaching it, are those of the full search.
    O(N·(points + a few candidates)) instead of O(N²). Anything unusual (no valid candidate,
    NaN, a best D of 1) takes the full search.
    """
    valid = np.flatnonzero(np.isfinite(alphas) & (alphas > 1.0))

    def full() -> tuple[int, float]:
        ds = _all_ks(logs, alphas, n, two_sided=two_sided, device=device)
        i = int(np.argmin(ds))
        return i, float(ds[i])

    if logs.size < _PRUNE_BELOW or valid.size == 0:
        return full()
    found = pruned_best(logs, alphas, n, valid, two_sided=two_sided, device=device)
    if found is None or found[1] >= 1.0:
        return full()
    return found


def pruned_best(logs: np.ndarray, alphas: np.ndarray, n: np.ndarray, valid: np.ndarray, *,
                two_sided: bool = False,
                device: str | torch.device = "cpu") -> tuple[int, float] | None:
    """Among the candidate indices ``valid`` (α finite and > 1), the first one of smallest KS
    distance and that distance, by the bound-ordered search of :func:`_best_ks`; None where
    a bound or a distance is not finite (the caller then searches in full)."""
    total = logs.size
    steps = np.linspace(0.0, 1.0, _BOUND_POINTS)
    pos = valid[:, None] + np.floor(steps[None, :] * (n[valid, None] - 1.0)).astype(np.int64)
    k = (pos - valid[:, None]).astype(np.float64)
    a = alphas[valid, None]
    with np.errstate(over="ignore", invalid="ignore"):
        cdf = 1.0 - np.exp((1.0 - a) * (logs[pos] - logs[valid, None]))
        emp = k / n[valid, None]
        gap = np.abs(cdf - emp) if not two_sided else np.maximum(
            cdf - emp, (k + 1.0) / n[valid, None] - cdf)
    bound = gap.max(axis=1)
    if not np.all(np.isfinite(bound)):
        return None
    order = np.argsort(bound, kind="stable")
    most = max(_FIRST_EXACT, _CHUNK_ELEMENTS // max(total, 1))
    chunk = _FIRST_EXACT
    best, best_i = np.inf, -1
    start = 0
    while start < order.size and bound[order[start]] <= best * (1.0 + _MARGIN) + _MARGIN:
        stop = min(start + chunk, order.size)
        cand = valid[order[start:stop]]
        ds = _gaps(logs, alphas, n, cand, two_sided=two_sided, device=device)
        if not np.all(np.isfinite(ds)):
            return None
        for i, d in zip(cand.tolist(), ds.tolist(), strict=True):
            if d < best or (d == best and i < best_i):
                best, best_i = d, i
        start, chunk = stop, min(2 * chunk, most)
    return None if best_i < 0 else (best_i, float(best))


def fit_power_law(
    evals: np.ndarray,
    method: str = "ww",
    *,
    bootstrap_samples: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> PowerLawFit | None:
    """Fit p(λ) ∝ λ^−α to the tail of a spectrum, choosing xmin by the smallest KS distance.

    Parameters
    ----------
    evals : numpy.ndarray, shape (M,)
        Eigenvalues λ_i = σ_i(W)² (any order, float).
    method : {"ww", "ww_relfloor", "ks2"}
        ``ww``: weightwatcher 0.7.7's fit — eigenvalues above 1e-5, every one but the largest an
        xmin candidate, α = 1 + n / Σ ln(λ_j / xmin), D = max_j |1 − (λ_j/xmin)^(1−α) − j/n|
        (j = 0..n−1), D = 1 when α ≤ 1. ``ww_relfloor``: the same above 1e-6·λmax.
        ``ks2``: two-sided KS distance (max of both CDF gaps), otherwise ``ww``.
    bootstrap_samples : int
        Resamples of the tail (with replacement, xmin fixed) to measure stability.
    seed : int
        Seed of the bootstrap.
    device : str or torch.device
        Where the KS pass runs: numpy on the CPU, torch elsewhere.

    Returns
    -------
    PowerLawFit or None
        None when fewer than two eigenvalues lie above the floor. ``alpha_delta`` is the larger
        of the bootstrap's standard deviation of α and the change of α at the neighbouring xmin
        candidates: a value of 0.1 means α is known to about ±0.1.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"unknown fit method {method!r}; choose one of {', '.join(FIT_METHODS)}")
    if method in FINGER_METHODS:
        from alphawatch.workers.spectral import fingers

        fitter = fingers.fit_xmin_peak if method == "xmin_peak" else fingers.fit_clip_xmax
        return fitter(evals, bootstrap_samples=bootstrap_samples, seed=seed)
    if method == "tpl":
        from alphawatch.workers.spectral import compare

        plain = fit_power_law(evals, "ww", bootstrap_samples=bootstrap_samples, seed=seed,
                              device=device)
        return None if plain is None else compare.tpl_fit(plain, tail_floor(evals, "ww"))
    data = tail_floor(evals, method)
    if data.size < 2:
        return None
    logs = np.log(data)
    alphas, n = tail_alphas(logs)
    i, distance = _best_ks(logs, alphas, n, two_sided=method == "ks2", device=device)
    alpha, xmin, tail_n = float(alphas[i]), float(data[i]), int(n[i])
    sigma = (alpha - 1.0) / np.sqrt(tail_n)
    neighbours = [alphas[j] for j in (i - 1, i + 1) if 0 <= j < alphas.size]
    delta = max((abs(float(a) - alpha) for a in neighbours if np.isfinite(a)), default=0.0)
    if bootstrap_samples > 0 and tail_n >= 2:
        delta = max(delta, bootstrap_delta(logs[i:] - logs[i], bootstrap_samples, seed))
    return PowerLawFit(method=method, alpha=alpha, xmin=xmin, xmax=float(data[-1]), D=distance,
                       n=tail_n, sigma=float(sigma), alpha_delta=float(delta))


def bootstrap_delta(tail: np.ndarray, samples: int, seed: int) -> float:
    """Standard deviation of α over resamples of the tail's log(λ/xmin), with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, tail.size, size=(samples, tail.size))
    sums = tail[picks].sum(axis=1)
    with np.errstate(divide="ignore"):
        boot = 1.0 + tail.size / sums
    boot = boot[np.isfinite(boot)]
    return float(np.std(boot)) if boot.size else 0.0

