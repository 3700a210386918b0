"""Correlation traps: W with its entries shuffled (seeded), its spectrum against the MP bulk.

A shuffle keeps W's entries and destroys their correlations, so its eigenvalues should stay
inside the Marchenko–Pastur bulk of W's entry variance; those beyond it are traps, and a shuffle
whose spectrum looks like W's own says W is near random (Martin & Mahoney 2021).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from alphawatch.workers.spectral.device import Device, Matrix, entry_count
from alphawatch.workers.spectral.eigenvalues import Spectrum, shuffled_eigenvalues
from alphawatch.workers.spectral.moments import Bulk
from alphawatch.workers.spectral.mpfit import mp_fit, rand_distance

# Trap edge: Tracy–Widom scale (Johnstone 2001) times this many, beyond the MP bulk edge.
TW_PAD = 5.0


RAND_FLOOR = 1e-4
"""``shuffle_distance`` pools eigenvalues below this fraction of the larger λmax of the two spectra
in its lowest bin: the shuffle's float32 Gram matrix leaves noise of ~1e-6·λmax, and a few
noise values or W's zero eigenvalues (rank loss) spread over ten more decades would otherwise
set the range of the 100 bins (docs/SPECTRAL.md)."""


def _jensen_shannon(a: np.ndarray, b: np.ndarray, bins: int = 100) -> float:
    """Jensen–Shannon distance (base 2) between the log10-histograms of two spectra."""
    if a.size == 0 or b.size == 0 or a.max() <= 0 or b.max() <= 0:
        return 1.0
    floor = max(float(a.max()), float(b.max())) * RAND_FLOOR
    la, lb = np.log10(np.maximum(a, floor)), np.log10(np.maximum(b, floor))
    lo, hi = min(la.min(), lb.min()), max(la.max(), lb.max())
    if hi <= lo:
        return 0.0
    pa, _ = np.histogram(la, bins=bins, range=(lo, hi))
    pb, _ = np.histogram(lb, bins=bins, range=(lo, hi))
    pa, pb = pa / pa.sum(), pb / pb.sum()
    m = 0.5 * (pa + pb)

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        nz = p > 0
        return float(np.sum(p[nz] * np.log2(p[nz] / q[nz])))

    return float(np.sqrt(max(0.0, 0.5 * kl(pa, m) + 0.5 * kl(pb, m))))


def _same_distribution(a: np.ndarray, b: np.ndarray) -> bool:
    """Two-sample KS test at the 5% level: is the ESD indistinguishable from its shuffle?"""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / a.size
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / b.size
    statistic = float(np.max(np.abs(cdf_a - cdf_b)))
    critical = 1.36 * np.sqrt((a.size + b.size) / (a.size * b.size))
    return bool(statistic < critical)


@dataclass(frozen=True)
class Traps:
    """Eigenvalues of the shuffled W beyond the bulk edge (+ Tracy–Widom pad): traps.

    alphawatch's own measures: ``shuffle_traps`` (the shuffle's eigenvalues beyond the MP edge
    of W's entry variance + ``TW_PAD`` Tracy–Widom scales, the mean spike left out: the
    ``correlation_trap`` flag), ``shuffle_distance`` (Jensen–Shannon distance of the two
    log-histograms) and ``near_random`` (a two-sample KS test). weightwatcher 0.7.7's, under its
    names: ``num_traps`` (the shuffled ESD's spikes beyond its own MP fit, :func:`mp_fit`; None
    when that fit has nothing to fit) and ``rand_distance`` (:func:`mpfit.rand_distance`), and
    ``max_rand_eval``, the same in both.
    """

    rand_evals: np.ndarray
    shuffle_traps: int
    shuffle_distance: float
    num_traps: int | None
    rand_distance: float
    max_rand_eval: float
    mean_spike: bool
    near_random: bool


SHUFFLE_BUCKETS = 256
"""Buckets of the two-stage shuffle (``random_permutation``): 256 keeps each in the L2 cache."""


PLACE_CHUNK = 1 << 20
"""Keys placed at a time by ``random_permutation``'s first stage (its int64 sort buffer)."""


def random_permutation(rng: np.random.Generator, numel: int) -> np.ndarray:
    """A uniformly random permutation of ``range(numel)``, int32 where it fits.

    Rao–Sandelius two-stage shuffle: every index goes to one of ``SHUFFLE_BUCKETS`` buckets
    drawn uniformly (the buckets concatenated in order, each in increasing index order), then
    each bucket is shuffled by Fisher–Yates. Given any outcome, the probability of drawing it
    is Σ_sizes B⁻ⁿ·Π 1/size_b!, the same for every permutation, so the result is uniform (Rao
    1961; Sandelius 1962). The buckets fit in the cache, which makes it about twice as fast as
    ``Generator.permutation``'s one Fisher–Yates pass over the whole array on large matrices.
    """
    keys = rng.integers(0, SHUFFLE_BUCKETS, numel, dtype=np.uint8)
    sizes = np.bincount(keys, minlength=SHUFFLE_BUCKETS)
    ends = np.cumsum(sizes)
    out = np.empty(numel, dtype=np.int32 if numel < 2**31 else np.int64)
    # First stage, written straight into the output a chunk of keys at a time (a stable sort of
    # each chunk, its runs appended to their buckets): no int64 array of numel, whose pages cost
    # more than the sort on a fresh process (0.3 of 0.5 s at 5504×2048).
    cursor = ends - sizes
    for first in range(0, numel, PLACE_CHUNK):
        chunk = keys[first : first + PLACE_CHUNK]
        order = np.argsort(chunk, kind="stable")
        counts = np.bincount(chunk, minlength=SHUFFLE_BUCKETS)
        at = 0
        for bucket in np.flatnonzero(counts).tolist():
            count = int(counts[bucket])
            place = int(cursor[bucket])
            out[place : place + count] = order[at : at + count] + first
            cursor[bucket] = place + count
            at += count
    # Second stage, each bucket shuffled as int64: numpy shuffles 8-byte items faster than
    # 4-byte ones (10 vs 15 ns each), and the draws depend only on the lengths
    start = 0
    for end in ends.tolist():
        if end - start > 1:
            bucket_items = out[start:end].astype(np.int64)
            rng.shuffle(bucket_items)
            out[start:end] = bucket_items
        start = end
    return out


_PERMS: OrderedDict[tuple[int, int, int], list[np.ndarray]] = OrderedDict()
_PERMS_LOCK = threading.Lock()
_PERMS_MAX_BYTES = 256 * 2**20


def _permutations(seed: int, numel: int, count: int) -> list[np.ndarray]:
    """The ``count`` permutations of ``numel`` entries a generator seeded with ``seed`` draws.

    numpy's PCG64 generator and ``random_permutation``, on every device: a CUDA worker and a
    CPU one shuffle a matrix alike. The shuffle is seeded per matrix, so every matrix of a
    size gets the same permutations: they are drawn once and kept (the few most recent, at
    most ``_PERMS_MAX_BYTES``), which saves a draw per q/k/v/o/... matrix, as exactly the same
    draw.
    """
    key = (seed, numel, count)
    # Drawn under the lock: two worker threads starting on matrices of one size at once (q and
    # k, gate and up) would otherwise both draw it (0.5 CPU s for 5504×2048); one waits instead.
    with _PERMS_LOCK:
        if key in _PERMS:
            _PERMS.move_to_end(key)
            return _PERMS[key]
        rng = np.random.Generator(np.random.PCG64(seed))
        perms = [random_permutation(rng, numel) for _ in range(count)]
        _PERMS[key] = perms
        while _PERMS and sum(p.nbytes for ps in _PERMS.values() for p in ps) > _PERMS_MAX_BYTES:
            _PERMS.popitem(last=False)
    return perms


def shuffled_spectrum(mats: list[Matrix], seed: int, dev: Device) -> np.ndarray:
    """Eigenvalues of ``mats`` with their entries shuffled (seeded per matrix), pooled, ascending.

    The costly half of the trap check, and independent of W's own spectrum: ``analyze_stream``
    runs it as a task of its own beside the rest of the analysis. Raises ValueError when the
    shuffle has a non-finite Gram diagonal (a NaN or Inf weight; W's own analysis says so).
    """
    perms = _permutations(seed, entry_count(mats[0]), len(mats))
    return np.sort(
        np.concatenate(
            [shuffled_eigenvalues(w, perm, dev) for w, perm in zip(mats, perms, strict=True)]
        )
    )


def traps_of(rand_evals: np.ndarray, spec: Spectrum, bulk: Bulk, n: int, m: int) -> Traps:
    """Correlation traps: the spectrum of W with its entries shuffled, against the bulk.

    A shuffle destroys correlations, so its eigenvalues (``rand_evals``, from
    :func:`shuffled_spectrum`) should stay inside the MP bulk; those beyond edge + ``TW_PAD``
    Tracy–Widom scales are traps (Martin & Mahoney 2021).
    """
    limit = bulk.edge + TW_PAD * bulk.tw_scale
    beyond = rand_evals[rand_evals > limit]
    # A non-zero mean μ makes a rank-one spike of about μ²·n·m in any shuffle of W: it is a
    # property of the mean, not a trap.
    mean_eval = bulk.mean * bulk.mean * n * m
    mean_spike = False
    if beyond.size and mean_eval > limit:
        mean_spike = True
        beyond = np.delete(beyond, int(np.argmin(np.abs(beyond - mean_eval))))
    ww_fit = mp_fit(rand_evals, n, m)
    return Traps(
        rand_evals=rand_evals,
        shuffle_traps=int(beyond.size),
        shuffle_distance=_jensen_shannon(spec.evals, rand_evals),
        num_traps=None if ww_fit is None else ww_fit.num_spikes,
        rand_distance=rand_distance(spec.evals, rand_evals),
        max_rand_eval=float(rand_evals[-1]),
        mean_spike=mean_spike,
        near_random=_same_distribution(spec.evals, rand_evals),
    )
