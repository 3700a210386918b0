"""weightwatcher 0.7.7's Marchenko–Pastur fit (``mp_fit=True``) and its shuffle distance.

weightwatcher fits the MP law to an ESD by its density rather than by W's entry variance: the
ESD is rescaled to mean 1, smoothed by a linear-kernel density estimate, and the MP scale σ is
the grid-then-simplex minimiser of the squared gap between the two densities. ``num_spikes``,
``mp_softrank`` (and, on the shuffled ESD, ``num_traps``) come from that fit; ``rand_distance``
is the Jensen–Shannon distance of the sorted eigenvalue vectors of W and its shuffle. These
are weightwatcher's numbers under weightwatcher's names; alphawatch's own measures, from the
bulk edge of W's entry variance (:mod:`moments`, :mod:`traps`), carry names of their own
(docs/SPECTRAL.md, "Two MP fits").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KDE_BANDWIDTH = 0.1
"""weightwatcher's kernel bandwidth (``bw``), on the ESD rescaled to mean 1."""

KDE_POINTS = 1000
"""The density is compared on this many points of [0, max + 0.5]."""

DENSITY_FLOOR = 0.01
"""Grid points whose smoothed density is not above this are left out of the residual."""

KDE_PAIRS = 1 << 22
"""(grid point, eigenvalue) pairs summed at a time by :func:`linear_kde` (32 MiB of float64)."""


@dataclass(frozen=True)
class MPFit:
    """weightwatcher's MP fit of one ESD.

    ``sigma`` is the fitted MP scale of the ESD rescaled to mean 1 (weightwatcher's
    ``sigma_mp``); ``bulk_max`` the bulk edge λ+ = (σ(1 + 1/√Q))² back in W's units
    (``bulk_max``); ``num_spikes`` the eigenvalues beyond λ+ plus the square root of
    weightwatcher's Tracy–Widom term; ``softrank`` = λ+/λmax (``mp_softrank``).
    """

    sigma: float
    bulk_max: float
    num_spikes: int
    softrank: float


def linear_kde(values: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density of ``values`` at ``grid`` with the linear (triangular) kernel of half-width h:
    Σ max(0, 1 − |x − v|/h) / (n·h), scikit-learn's ``KernelDensity(kernel="linear")``.

    Only the values within h of each grid point are summed (found by bisection in the sorted
    values), each term as scikit-learn computes it: ~1e-15 relative to its sums, at a few
    percent of the cost of all n × grid terms.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    lo = np.searchsorted(v, grid - bandwidth, side="right")
    hi = np.searchsorted(v, grid + bandwidth, side="left")
    counts = hi - lo
    total = np.zeros(grid.size)
    first = 0
    while first < grid.size:
        # as many grid points as keep the pairs under KDE_PAIRS (one at least)
        cum = np.cumsum(counts[first:])
        last = first + max(1, int(np.searchsorted(cum, KDE_PAIRS, side="right")))
        block = counts[first:last]
        owner = np.repeat(np.arange(first, last), block)
        starts = np.repeat(lo[first:last] - (np.cumsum(block) - block), block)
        index = np.arange(owner.size) + starts
        terms = np.maximum(0.0, 1.0 - np.abs(grid[owner] - v[index]) / bandwidth)
        total[first:last] = np.bincount(owner - first, weights=terms, minlength=last - first)
        first = last
    return total / (v.size * bandwidth)


def _mp_density(
    x: np.ndarray, q: float, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weightwatcher's ``marchenko_pastur_fun`` for each σ (a column): density (0 off its
    support), a and b, term by term in its order of operations."""
    y = 1 / q
    b = np.power(sigma * (1 + np.sqrt(1 / q)), 2)
    a = np.power(sigma * (1 - np.sqrt(1 / q)), 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * x * y)) * np.sqrt((b - x) * (x - a)))
    return val, a, b


def _quarter_circle(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """weightwatcher's ``quarter_circle_fun`` (its support does not scale with σ)."""
    with np.errstate(invalid="ignore"):
        density: np.ndarray = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - x**2))
    return density


class _Residual:
    """weightwatcher's ``resid_mp(..., allresid=False)`` as a function of σ alone, for one σ
    (:meth:`__call__`, what the simplex polish calls) or a column of them at once (:meth:`many`,
    the grid). The kernel density is computed once here, where weightwatcher recomputes it for
    every σ; each σ's sum is over the same terms in the same order as weightwatcher's."""

    def __init__(self, to_fit: np.ndarray, q: float) -> None:
        xde = np.linspace(0, np.max(to_fit) + 0.5, KDE_POINTS)
        yde = linear_kde(to_fit, xde, KDE_BANDWIDTH)
        good = yde > DENSITY_FLOOR
        self.bad = int(np.count_nonzero(yde < DENSITY_FLOOR))
        self.q = q
        self.xde, self.yde = xde[good], yde[good]
        if self.yde.size:
            self.peak = float(self.xde[np.flatnonzero(self.yde == self.yde.max())[0]])
            self.top = float(self.xde.max())

    def many(self, sigmas: np.ndarray) -> np.ndarray:
        sigma = sigmas.reshape(-1, 1)
        if self.q == 1:
            resid = _quarter_circle(self.xde, sigma) - self.yde
        else:
            if not self.yde.size:
                raise ValueError("no density above the floor to fit")  # max() of nothing
            ymp, a, b = _mp_density(self.xde, self.q, sigma)
            resid = ymp - self.yde
            wrong = (b[:, 0] < self.peak) | (b[:, 0] > self.top) | (a[:, 0] > self.peak)
            resid[wrong] = 1000.0
        squares = np.concatenate((resid**2, np.zeros((sigma.shape[0], self.bad))), axis=1)
        sums: np.ndarray = squares.sum(axis=1)
        return sums

    def __call__(self, sigma: np.ndarray) -> float:
        return float(self.many(np.asarray(sigma, dtype=np.float64).ravel()[:1])[0])


def mp_fit(evals: np.ndarray, n: int, m: int) -> MPFit | None:
    """weightwatcher 0.7.7's ``mp_fit`` of an ESD (``analyze(mp_fit=True)``).

    Parameters
    ----------
    evals : numpy.ndarray
        Eigenvalues λ = σ(W)² (any order; a Conv2d's slices pooled; the shuffled ESD for
        weightwatcher's ``num_traps``).
    n, m : int
        W's larger and smaller side (of one slice): Q = n/m.

    Returns
    -------
    MPFit or None
        None when the ESD is empty, all zero or not finite, or the search fails (where
        weightwatcher reports −1). The ESD is rescaled to mean 1
        (λ·k/Σλ for k eigenvalues); σ minimises Σ(ρ_MP(x; σ, Q) − ρ̂(x))² over the grid points
        x of [0, max + 0.5] where the linear-kernel density ρ̂ (bandwidth 0.1) exceeds 0.01,
        first on the grid σ = c·(0.05, 0.06, …, 1.99) with c = √λmax/(1 + 1/√Q), then by
        Nelder–Mead from the best grid point (``scipy.optimize.brute``, as weightwatcher).
        A σ whose bulk edge lies left of the density's peak or beyond the grid costs 1000 per
        point. For Q = 1 the quarter-circle law of the singular values is fitted instead. The
        spike threshold is λ+ + √(λ+^(2/3)·m^(−2/3)/√Q) in the rescaled units, weightwatcher's
        Tracy–Widom term under its square root.

    References
    ----------
    Martin & Mahoney (2021), "Implicit self-regularization in deep neural networks", JMLR 22.
    """
    from scipy import optimize  # the one optimiser weightwatcher uses, for the same steps

    evals = np.asarray(evals, dtype=np.float64)
    total = float(np.sum(evals))
    if evals.size == 0 or not total > 0 or not np.isfinite(total):
        return None
    q = n / m
    scale = np.sqrt(evals.shape[0]) / np.sqrt(total)
    to_plot = (scale * scale) * evals
    lambda_max = float(np.max(to_plot))
    to_fit = np.sqrt(to_plot) if q == 1 else to_plot
    c = np.sqrt(np.max(to_plot) / np.square(1 + 1.0 / np.sqrt(q)))
    sigma_range = (slice(0.05 * c, 2.0 * c, 0.01 * c),)
    try:
        # weightwatcher's ``optimize.brute(resid_mp, sigma_range)``: the grid's first minimum,
        # polished by scipy's Nelder–Mead ``fmin`` from there; the grid in one pass
        residual = _Residual(to_fit, q)
        grid = np.mgrid[sigma_range[0]]
        start = grid[int(np.argmin(residual.many(grid)))]
        found = optimize.fmin(residual, start, full_output=1, disp=False)
    except (ValueError, RuntimeError, FloatingPointError):
        return None  # weightwatcher logs it and reports −1
    sigma = float(np.ravel(found[0])[0])
    if not (np.isfinite(sigma) and sigma > 0):
        return None
    bulk_max = (sigma * (1 + 1 / np.sqrt(q))) ** 2
    tw = 1 / np.sqrt(q) * np.power(bulk_max, 2 / 3) * np.power(m, -2 / 3)
    return MPFit(
        sigma=sigma,
        bulk_max=float(bulk_max / (scale * scale)),
        num_spikes=int(np.count_nonzero(to_plot > bulk_max + np.sqrt(tw))),
        softrank=float(bulk_max / lambda_max),
    )


def rand_distance(evals: np.ndarray, rand_evals: np.ndarray) -> float:
    """weightwatcher 0.7.7's ``rand_distance``: the Jensen–Shannon distance (natural log)
    between the sorted eigenvalues of W and of its shuffle, each vector read as a probability
    vector (``scipy.stats.entropy`` normalises p, q and m = (p + q)/2 to sum 1).

    Both are sorted ascending and must have one length (a shuffle keeps W's shape). A shuffle
    keeps Σλ = ‖W‖²_F, so this weighs each eigenvalue by its share of the norm: it reads the
    top of the spectrum and is blind to the bulk's shape (alphawatch's ``shuffle_distance``
    compares the log-histograms).
    """
    p = np.sort(np.asarray(evals, dtype=np.float64))
    q = np.sort(np.asarray(rand_evals, dtype=np.float64))
    if p.size != q.size or p.size == 0:
        raise ValueError(f"eigenvalue vectors of {p.size} and {q.size} values")
    m = (p + q) / 2
    divergence = (_entropy(p, m) + _entropy(q, m)) / 2
    return float(np.sqrt(divergence))


def _entropy(p: np.ndarray, q: np.ndarray) -> float:
    """``scipy.stats.entropy(p, q)``: Σ p·ln(p/q) of both normalised, 0·ln 0 = 0."""
    p = p / np.sum(p)
    q = q / np.sum(q)
    nz = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))
