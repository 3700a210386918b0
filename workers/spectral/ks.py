"""The vectorised Kolmogorov–Smirnov search behind every power-law fit of a spectrum.

For eigenvalues λ_1 ≤ ... ≤ λ_N above a floor and every candidate xmin = λ_i, the
maximum-likelihood exponent of the tail is α_i = 1 + n_i / Σ_{j≥i} ln(λ_j / λ_i) (all of them
from one suffix sum) and its KS distance D_i = max_j |1 − (λ_j/λ_i)^(1−α_i) − (j − i)/n_i|; the
fit takes the xmin of smallest D (Clauset, Shalizi & Newman 2009). Each fit method
(:mod:`plfit`) is built from these pieces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from alphawatch.workers.spectral.device import Device

if TYPE_CHECKING:
    import torch

FitDevice: TypeAlias = "str | Device | torch.device"
"""Where the KS pass runs: the host path (numpy) for ``"cpu"``, a ``torch.device("cpu")`` and
the host :class:`Device`; torch on the device otherwise (a ``Device`` of kind ``"torch"``, even
one on the CPU)."""

EVALS_THRESH = 1e-5
"""Absolute eigenvalue floor of weightwatcher 0.7.7 (``EVALS_THRESH``) for the ``ww`` method."""
RELATIVE_FLOOR = 1e-6
"""Floor relative to λmax for ``ww_relfloor``: scale-free, unlike the absolute floor."""
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


def _torch_device(device: FitDevice) -> str | None:
    """The torch device the KS pass runs on, or None for numpy."""
    if isinstance(device, Device):
        return device.torch_device if device.accelerated else None
    return None if str(device).split(":", 1)[0] == "cpu" else str(device)


def _gaps(
    logs: np.ndarray,
    alphas: np.ndarray,
    n: np.ndarray,
    cand: np.ndarray,
    *,
    two_sided: bool,
    device: FitDevice,
) -> np.ndarray:
    """Exact KS distance of the tails starting at the indices ``cand`` (one matrix).

    D_i = max_j |1 − (λ_j/λ_i)^(1−α_i) − (j − i)/n_i| over j ≥ i (two-sided: the larger of
    both CDF gaps), written through logs to stay vectorised. numpy on the CPU (no torch in the
    fit's path), torch on the accelerator path.
    """
    first = int(cand.min())
    on = _torch_device(device)
    if on is not None:
        return _gaps_torch(logs, alphas, n, cand, first, two_sided=two_sided, device=on)
    k = (np.arange(first, logs.size)[None, :] - cand[:, None]).astype(np.float64)
    nn = n[cand, None]
    with np.errstate(over="ignore", invalid="ignore"):
        cdf = 1.0 - np.exp((1.0 - alphas[cand, None]) * (logs[None, first:] - logs[cand, None]))
        emp = k / nn
        gap = np.abs(cdf - emp) if not two_sided else np.maximum(cdf - emp, (k + 1.0) / nn - cdf)
        gap = np.where(k >= 0, gap, 0.0)
    return np.asarray(gap.max(axis=1), dtype=np.float64)


def _gaps_torch(
    logs: np.ndarray,
    alphas: np.ndarray,
    n: np.ndarray,
    cand: np.ndarray,
    first: int,
    *,
    two_sided: bool,
    device: str,
) -> np.ndarray:
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


def _all_ks(
    logs: np.ndarray,
    alphas: np.ndarray,
    n: np.ndarray,
    *,
    two_sided: bool,
    device: FitDevice = "cpu",
) -> np.ndarray:
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


def _best_ks(
    logs: np.ndarray,
    alphas: np.ndarray,
    n: np.ndarray,
    *,
    two_sided: bool,
    device: FitDevice = "cpu",
) -> tuple[int, float]:
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


def pruned_best(
    logs: np.ndarray,
    alphas: np.ndarray,
    n: np.ndarray,
    valid: np.ndarray,
    *,
    two_sided: bool = False,
    device: FitDevice = "cpu",
) -> tuple[int, float] | None:
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
        gap = (
            np.abs(cdf - emp)
            if not two_sided
            else np.maximum(cdf - emp, (k + 1.0) / n[valid, None] - cdf)
        )
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


def bootstrap_delta(tail: np.ndarray, samples: int, seed: int) -> float:
    """Standard deviation of α over resamples of the tail's log(λ/xmin), with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, tail.size, size=(samples, tail.size))
    sums = tail[picks].sum(axis=1)
    with np.errstate(divide="ignore"):
        boot = 1.0 + tail.size / sums
    boot = boot[np.isfinite(boot)]
    return float(np.std(boot)) if boot.size else 0.0
