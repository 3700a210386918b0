"""Per-layer spectral analysis: eigenvalues, power-law fit, MP bulk, traps, rank, verdict."""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from alphawatch.workers.spectral import compare, lapack
from alphawatch.workers.spectral.plfit import fit_power_law
from alphawatch.workers.spectral.types import FitStatus, LayerResult, PowerLawFit, Thresholds

if TYPE_CHECKING:
    import torch

# Trap edge: Tracy–Widom scale (Johnstone 2001) times this many, beyond the MP bulk edge.
TW_PAD = 5.0


@dataclass(frozen=True)
class HostDevice:
    """The CPU, named without importing torch: the CPU engine computes with numpy alone.

    Read like a ``torch.device("cpu")`` where the engine reads one: ``.type`` and ``str()``.
    """

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


HOST = HostDevice()

Device: TypeAlias = "HostDevice | torch.device"
"""Where the engine computes: the host (numpy), or a torch device (CUDA)."""


def _gpu_nodes() -> bool:
    """Whether this machine may have a GPU torch can use: always, except on a Linux machine
    without the device files the NVIDIA (``/dev/nvidia0``...) and ROCm (``/dev/kfd``) drivers
    create, where ``torch.cuda.is_available()`` is False and importing torch to ask costs
    more than a second."""
    if not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return (dev / "kfd").exists() or any(dev.glob("nvidia[0-9]*"))


def resolve_device(requested: str | Device) -> Device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an error.

    ``"cpu"`` is :data:`HOST` and imports nothing, and so is ``"auto"`` on a Linux machine
    without a GPU's device files; any other request imports torch to ask it.
    """
    if not isinstance(requested, str):
        return requested
    if requested == "cpu" or (requested == "auto" and not _gpu_nodes()):
        return HOST
    import torch

    if requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else HOST
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    device = torch.device(requested)
    return HOST if device.type == "cpu" else device


Matrix: TypeAlias = "np.ndarray | torch.Tensor"
"""A weight matrix as the engine takes it: a numpy array or a torch tensor (any device)."""


def as_matrices(weight: Matrix) -> list[Matrix]:
    """The 2-D matrices whose spectra are pooled: W itself, or each (kh, kw) slice of a Conv2d.

    Raises ValueError for shapes that have no unambiguous matrix reading (1-D, 3-D, 5-D+).
    """
    if weight.ndim == 2:
        return [weight]
    if weight.ndim == 4:
        kh, kw = weight.shape[2], weight.shape[3]
        return [weight[:, :, i, j] for i in range(kh) for j in range(kw)]
    raise ValueError(f"cannot read a {weight.ndim}-D tensor of shape {tuple(weight.shape)} as a "
                     "matrix; reshape it explicitly (Conv1d: (out, in*k))")


def host_array(matrix: Matrix) -> np.ndarray:
    """``matrix`` as a numpy array in host memory, without a copy where its dtype allows.

    float16/32/64 CPU tensors share their memory (``Tensor.numpy()``); bfloat16, float8 and
    integer tensors, which numpy has no dtype for, become float32 copies.
    """
    if isinstance(matrix, np.ndarray):
        return matrix
    import torch

    tensor = matrix.detach().cpu()
    if tensor.dtype not in (torch.float64, torch.float32, torch.float16):
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def _is_complex(matrix: Matrix) -> bool:
    if isinstance(matrix, np.ndarray):
        return bool(np.iscomplexobj(matrix))
    return bool(matrix.is_complex())


def _device_tensor(matrix: Matrix, device: Device) -> torch.Tensor:
    import torch

    # torch shares a numpy array's memory and warns on read-only ones (decoded file bytes)
    tensor = (torch.from_numpy(np.require(matrix, requirements="W"))
              if isinstance(matrix, np.ndarray) else matrix.detach())
    return tensor.to(device=str(device), non_blocking=True)


def _numel(matrix: Matrix) -> int:
    return int(np.prod(matrix.shape))


def gram(matrix: np.ndarray) -> np.ndarray:
    """The Gram matrix of the smaller side (WᵀW or WWᵀ), M×M, in ``matrix``'s dtype.

    numpy computes a product of a matrix with its own transpose with BLAS ``syrk`` (one
    triangle, mirrored): half the multiplications of a general product, and it releases the
    GIL, so the worker threads of ``analyze_stream`` run their products at once.
    """
    product: np.ndarray = (matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1]
                           else matrix @ matrix.T)
    return product


def singular_values(matrix: Matrix, device: Device) -> np.ndarray:
    """Singular values, descending, float64.

    On CPU: float64 Gram matrix (BLAS ``syrk``) and LAPACK ``syevd`` through numpy, accurate to
    ~1e-8·σmax (rank metrics need that). On CUDA: float32 Gram matrix with TF32 off, then
    eigvalsh — the tail is exact, the smallest values are not (documented in docs/SPECTRAL.md).
    """
    if device.type == "cuda":
        import torch

        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            w = _device_tensor(matrix, device).to(torch.float32)
            g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            if not _float32_gram_usable(g.diagonal().cpu().numpy()):
                # squares beyond float32's range (weights of ~1e18 or ~1e-20): in float64
                w = _device_tensor(matrix, device).to(torch.float64)
                g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
                _check_squares(g.diagonal().cpu().numpy(), w.cpu().numpy())
            evals = torch.linalg.eigvalsh(g.double()).clamp_min(0).flip(0)
            return np.asarray(np.sqrt(evals.cpu().numpy()), dtype=np.float64)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    # float64 Gram + eigvalsh is several times faster than an SVD; its absolute error on λ is
    # ~eps64·λmax, i.e. ~1e-8·σmax on σ: below the float32 rank tolerance (1.2e-7·σmax).
    # numpy's OpenBLAS rather than torch's MKL on a CPU: about twice as fast on the Gram matrix
    # and 1.5x on the eigenvalues (BENCHMARKS.md); its LAPACK is called through ctypes
    # (lapack.py: a faster reduction from 1536), which releases the GIL where scipy.linalg's
    # wrappers hold it and would serialise the worker threads.
    host = host_array(matrix)
    tall = host if host.shape[0] >= host.shape[1] else host.T
    product = lapack.gram_upper(lambda i, j: tall[i:j], tall.shape[0], tall.shape[1],
                                np.float64)
    if product is None:
        product = gram(host.astype(np.float64, copy=False))
    _check_squares(np.diagonal(product), host)
    evals = lapack.eigvalsh(product, overwrite=True)
    svals: np.ndarray = np.sqrt(np.clip(evals[::-1], 0.0, None))
    return svals


def shuffled_eigenvalues(matrix: Matrix, perm: np.ndarray, device: Device) -> np.ndarray:
    """Eigenvalues λ = σ² of ``matrix`` with its entries permuted by ``perm``, ascending.

    Float32 throughout (TF32 off on CUDA; on a CPU :func:`lapack.eigvalsh` in single
    precision): the shuffle feeds only the trap count, ``max_rand_eval``, ``rand_distance``
    and ``near_random``, which look at the top of the spectrum and at log-histograms, not at
    the rank. Float32 leaves an absolute error of ~1e-5·λmax that moves with the BLAS thread
    count: the top is exact to ~1e-6 relative, eigenvalues below ~1e-4·λmax are noise
    (clamped at 0; ``rand_distance`` pools everything below ``RAND_FLOOR``·λmax).
    """
    if device.type == "cuda":
        import torch

        t = _device_tensor(matrix, device)
        index = torch.from_numpy(perm).to(device=str(device), dtype=torch.int64)

        def shuffled_gram_cuda(dtype: torch.dtype) -> torch.Tensor:
            mixed = t.to(dtype).reshape(-1).index_select(0, index).reshape(t.shape)
            return mixed.T @ mixed if t.shape[0] >= t.shape[1] else mixed @ mixed.T

        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            g = shuffled_gram_cuda(torch.float32)
            if not _float32_gram_usable(g.diagonal().cpu().numpy()):
                # from W's own values: float64 weights beyond float32's range are inf in float32
                g = shuffled_gram_cuda(torch.float64)
                if not bool(torch.isfinite(g.diagonal()).all()):
                    raise ValueError("the shuffled matrix is not finite")
            evals = torch.linalg.eigvalsh(g).clamp_min(0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        return np.asarray(evals.cpu().numpy(), dtype=np.float64)
    w = host_array(matrix)
    # The shuffle is laid out tall (rows ≥ columns) whatever W's orientation, and its Gram
    # matrix summed over blocks of rows gathered one at a time (no shuffled copy of W).
    # perm is in range by construction: "clip" skips numpy's per-index bounds check.
    tall, small = max(w.shape), min(w.shape)

    def shuffled_gram(dtype: type[np.floating]) -> np.ndarray:
        # Gathered from float32 values, each block widened by gram_upper (no float64 copy of
        # W), except a float64 W's float64 Gram: its weights beyond float32's range are inf in
        # float32, which made the float32 Gram matrix unusable in the first place
        source = np.float64 if dtype is np.float64 and w.dtype == np.float64 else np.float32
        with np.errstate(over="ignore"):
            flat = np.ascontiguousarray(w, dtype=source).reshape(-1)

        def rows(start: int, stop: int) -> np.ndarray:
            return flat.take(perm[start * small:stop * small], mode="clip").reshape(-1, small)

        product = lapack.gram_upper(rows, tall, small, dtype)
        return gram(rows(0, tall).astype(dtype, copy=False)) if product is None else product

    product = shuffled_gram(np.float32)
    if not _float32_gram_usable(np.diagonal(product)):
        product = shuffled_gram(np.float64)
        # every entry is in one diagonal sum of squares: a NaN or Inf weight shows there
        if not np.isfinite(np.diagonal(product)).all():
            raise ValueError("the shuffled matrix is not finite")
    # In float32 (1.5x faster at 2048²): its noise lies a decade under RAND_FLOOR, where
    # rand_distance pools it, and moved rand_distance by <1e-3 (docs/SPECTRAL.md)
    evals = lapack.eigvalsh(product, overwrite=True, single=True)
    np.clip(evals, 0.0, None, out=evals)
    return evals


def _check_squares(diagonal: np.ndarray, weights: np.ndarray) -> None:
    """Refuse finite float64 weights whose squares (the Gram diagonal) leave float64's range:
    eigenvalues λ = σ² of weights of ~1e160 or ~1e-160 have no float64 value. (NaN or Inf
    weights never get here: the moments catch them.)"""
    if np.isfinite(diagonal).all() and (diagonal.max() >= np.finfo(np.float64).tiny
                                        or not np.any(weights)):
        return
    largest = float(np.max(np.abs(weights)))
    side = "overflow" if not np.isfinite(diagonal).all() else "underflow"
    raise ValueError(f"weights of magnitude up to {largest:.1e}: their squares {side} float64, "
                     "so the eigenvalues λ = σ² have no float64 value; rescale the matrix")


FLOAT32_GRAM_FLOOR = 1e-30
"""Below this largest diagonal entry the shuffle's float32 Gram matrix has lost its squares to
underflow (subnormal or 0)."""


def _float32_gram_usable(diagonal: np.ndarray) -> bool:
    """Whether the shuffle's float32 Gram matrix holds its spectrum: every diagonal sum of
    squares finite and not underflowed. Finite weights of 1e18 or 1e-25 have squares beyond
    float32's range (inf, or 0): that rare shuffle is computed again in float64, and only a
    NaN or Inf weight fails it."""
    return bool(np.isfinite(diagonal).all()) and float(diagonal.max()) >= FLOAT32_GRAM_FLOOR


# Machine epsilon of each stored dtype, by name: torch's dtypes print as ``torch.<name>``,
# numpy's as ``<name>``; numpy has no bfloat16 or float8, so their values are written out
# (torch.finfo gives the same, but for float8_e5m2fnuz: 2⁻³, where its values next to 1 are
# 1.25 and 0.875). Integer and unknown dtypes get float32's.
_EPS = {
    "float64": float(np.finfo(np.float64).eps), "float32": float(np.finfo(np.float32).eps),
    "float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0**-7,
    "float8_e4m3fn": 2.0**-3, "float8_e5m2": 2.0**-2,
    "float8_e4m3fnuz": 2.0**-3, "float8_e5m2fnuz": 2.0**-2,  # AMD's, same mantissas
}


RANK_EPS_FLOOR = _EPS["float32"]
"""No rank tolerance finer than this fraction of σmax, whatever the stored dtype: the float64
Gram matrix resolves σ to ~2e-8·σmax (the noise singular values of an exactly low-rank float64
matrix), and checkpoints are read as float32. Without it a rank-8 float64 matrix had rank 67."""


def _dtype_eps(dtype: object) -> float:
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    return _EPS.get(name, _EPS["float32"])


RAND_FLOOR = 1e-4
"""``rand_distance`` pools eigenvalues below this fraction of the larger λmax of the two spectra
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


def _mp_edge(variance: float, n: int, m: int) -> tuple[float, float]:
    """MP bulk edge of an n×m iid matrix with entry variance, and the Tracy–Widom scale."""
    sn, sm = np.sqrt(max(n - 1, 1)), np.sqrt(m)
    edge = variance * (sn + sm) ** 2
    scale = variance * (sn + sm) * (1.0 / sn + 1.0 / sm) ** (1.0 / 3.0)
    return float(edge), float(scale)


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues λ = σ² pooled over the matrices, ascending; singular values per matrix."""

    evals: np.ndarray
    svals: list[np.ndarray]

    @property
    def lambda_max(self) -> float:
        return float(self.evals[-1])

    @property
    def norm(self) -> float:
        return float(self.evals.sum())


@dataclass(frozen=True)
class Rank:
    """Numerical rank with a tolerance matched to the stored dtype, and the spectral entropy."""

    matrix_rank: int
    rank_loss: int
    rank_collapse: bool
    entropy: float | None


@dataclass(frozen=True)
class Bulk:
    """Marchenko–Pastur bulk of an iid matrix with W's entry variance: edge λ+, TW scale."""

    variance: float
    mean: float
    edge: float
    tw_scale: float
    num_spikes: int


@dataclass(frozen=True)
class Traps:
    """Eigenvalues of the shuffled W beyond the bulk edge (+ Tracy–Widom pad): traps."""

    rand_evals: np.ndarray
    num_traps: int
    rand_distance: float
    max_rand_eval: float
    mean_spike: bool
    near_random: bool


@dataclass(frozen=True)
class Verdict:
    """Whether to believe the alpha, and weightwatcher's training labels."""

    status: FitStatus
    trusted: bool
    over_trained: bool
    under_trained: bool


def spectrum_of(mats: list[Matrix], dev: Device) -> Spectrum:
    """Pooled eigenvalues of ``mats`` (one matrix, or the slices of a Conv2d kernel)."""
    svals = [singular_values(w, dev) for w in mats]
    return Spectrum(evals=np.sort(np.concatenate([s**2 for s in svals])), svals=svals)


def rank_of(spec: Spectrum, stored_dtype: object, n: int,
            rank_loss_fraction: float) -> Rank:
    """Rank at tolerance σmax · eps(stored dtype); collapse when the loss passes the fraction."""
    num_evals = int(spec.evals.size)
    tol_eps = max(_dtype_eps(stored_dtype), RANK_EPS_FLOOR)
    rank = int(sum(int(np.count_nonzero(s > s.max() * tol_eps)) for s in spec.svals))
    sv = np.sqrt(spec.evals)
    ent_rank = int(np.count_nonzero(sv > sv.max() * n * np.finfo(np.float64).eps))
    p = spec.evals / spec.norm + 1e-10
    entropy = float(-np.sum(p * np.log(p)) / np.log(ent_rank + 1e-10)) if ent_rank > 1 else None
    return Rank(matrix_rank=rank, rank_loss=num_evals - rank,
                rank_collapse=num_evals - rank > rank_loss_fraction * num_evals,
                entropy=entropy)


@dataclass(frozen=True)
class Moments:
    """Entry statistics of W (float64 sums): finite or not, constant or not, mean, variance."""

    finite: bool
    constant: bool
    mean: float
    variance: float  # unbiased (n − 1), as torch's and weightwatcher's; NaN until known


def moments_of(weight: Matrix, dev: Device) -> Moments:
    """Whether W is finite and non-constant, and its entries' mean (and on CUDA, variance).

    On a CPU the variance is left to :func:`with_variance`, which takes Σw² from W's spectrum
    instead of two more passes over W with a float64 temporary, and NaN/Inf are found by the
    sum: a sum of finite float32 values cannot overflow float64, so it is finite exactly when
    every entry is (a float64 W whose sum overflows is checked entry by entry).
    """
    if dev.type == "cuda":
        import torch

        flat = _device_tensor(weight, dev).to(torch.float64)
        finite = bool(torch.isfinite(flat).all())
        return Moments(finite=finite, constant=finite and bool(flat.min() == flat.max()),
                       mean=float(flat.mean()), variance=float(flat.var()))
    w = host_array(weight)
    with np.errstate(over="ignore", invalid="ignore"):  # Inf − Inf, or a float64 overflow
        total = float(w.sum(dtype=np.float64))
    if not np.isfinite(total) and not (w.dtype == np.float64 and np.isfinite(w).all()):
        return Moments(finite=False, constant=False, mean=float("nan"), variance=float("nan"))
    return Moments(finite=True, constant=bool(w.min() == w.max()), mean=total / w.size,
                   variance=float("nan"))


def with_variance(moments: Moments, spec: Spectrum, weight: Matrix) -> Moments:
    """``moments`` with the variance of W's entries, from Σw² = Σλ (the trace of the Gram
    matrices, to ~1e-13 relative) when the mean does not cancel most of it, else in two passes."""
    if not np.isnan(moments.variance):
        return moments
    count = _numel(weight)
    centred = spec.norm - count * moments.mean * moments.mean
    if centred > 1e-3 * spec.norm:
        variance = centred / (count - 1)
    else:
        variance = float(host_array(weight).var(dtype=np.float64, ddof=1))
    return replace(moments, variance=variance)


def bulk_of(moments: Moments, spec: Spectrum, n: int, m: int) -> Bulk:
    """The MP bulk an iid n×m matrix with W's entry variance would have; spikes beyond it."""
    variance, mean = moments.variance, moments.mean
    edge, tw = _mp_edge(variance, n, m)
    return Bulk(variance=variance, mean=mean, edge=edge, tw_scale=tw,
                num_spikes=int(np.count_nonzero(spec.evals > edge)))


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
        chunk = keys[first:first + PLACE_CHUNK]
        order = np.argsort(chunk, kind="stable")
        counts = np.bincount(chunk, minlength=SHUFFLE_BUCKETS)
        at = 0
        for bucket in np.flatnonzero(counts).tolist():
            count = int(counts[bucket])
            place = int(cursor[bucket])
            out[place:place + count] = order[at:at + count] + first
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
    perms = _permutations(seed, _numel(mats[0]), len(mats))
    return np.sort(np.concatenate([
        shuffled_eigenvalues(w, perm, dev) for w, perm in zip(mats, perms, strict=True)]))


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
    return Traps(rand_evals=rand_evals, num_traps=int(beyond.size),
                 rand_distance=_jensen_shannon(spec.evals, rand_evals),
                 max_rand_eval=float(rand_evals[-1]), mean_spike=mean_spike,
                 near_random=_same_distribution(spec.evals, rand_evals))


def verdict_of(fit: PowerLawFit | None, rank: Rank, traps: Traps | None,
               limits: Thresholds) -> Verdict:
    """The fit status (first failed rule wins), trust, and the over/under-trained labels."""
    status = FitStatus.TAIL_TOO_SHORT
    if fit is not None:
        if fit.n < limits.min_tail:
            status = FitStatus.TAIL_TOO_SHORT
        elif not (limits.alpha_min < fit.alpha <= limits.alpha_max):
            status = FitStatus.ALPHA_OUT_OF_RANGE
        elif limits.max_ks_distance < fit.D:
            status = FitStatus.POOR_FIT
        elif fit.alpha_delta > limits.max_alpha_delta:
            status = FitStatus.UNSTABLE
        else:
            status = FitStatus.OK
    trap = traps is not None and traps.num_traps > 0
    return Verdict(
        status=status,
        trusted=status is FitStatus.OK and not trap and not rank.rank_collapse,
        over_trained=fit is not None and fit.alpha < limits.over_trained_below,
        under_trained=fit is not None and fit.alpha > limits.under_trained_above,
    )


def analyze_matrix(
    weight: Matrix,
    *,
    stored_dtype: object = None,
    method: str = "ww",
    thresholds: Thresholds | None = None,
    device: str | Device = "cpu",
    check_traps: bool = True,
) -> LayerResult:
    """All spectral metrics of one weight matrix and whether its alpha can be trusted.

    Parameters
    ----------
    weight : numpy.ndarray or torch.Tensor
        (out, in) matrix or (out, in, kh, kw) Conv2d kernel (slices pooled into one spectrum),
        any float dtype; orientation does not matter. Eigenvalues are λ = σ², no 1/N scaling
        (weightwatcher convention). On a CPU the engine computes with numpy (a float32/64 CPU
        tensor is read in place); on CUDA with torch.
    stored_dtype : torch.dtype, numpy.dtype or dtype name, optional
        The dtype the weights were saved in (``"bfloat16"`` for a bf16 checkpoint read as
        float32); the rank tolerance is σmax · eps(stored_dtype).
    method : str
        Power-law fit method (``ww`` = weightwatcher 0.7.7 numbers).
    thresholds : Thresholds
        Trust thresholds.
    device : str or torch.device
        ``cpu``, ``cuda`` or ``auto``.
    check_traps : bool
        Whether to look for correlation traps (costs a second spectrum, of the shuffled W).

    Returns
    -------
    LayerResult
        Never raises: bad input gives a status (``non_finite``, ``degenerate``,
        ``too_few_evals``, ``failed``). The fitted alpha is reported whatever the status; the
        status and ``trusted`` say whether to believe it.
    """
    outcome = analyze_spectrum(weight, stored_dtype=stored_dtype, method=method,
                               thresholds=thresholds, device=device)
    if isinstance(outcome, LayerResult):
        return outcome
    if not check_traps:
        return outcome.finish(None)
    try:
        rand_evals = shuffled_spectrum(outcome.mats, outcome.limits.trap_seed, outcome.device)
    except Exception as exc:  # a result per tensor, whatever happens
        return outcome.failed(exc)
    return outcome.finish(rand_evals)


@dataclass(frozen=True)
class Analysed:
    """W's own analysis, done; the trap check's verdict still to come (:meth:`finish`).

    ``analyze_stream`` computes the shuffle's spectrum (:func:`shuffled_spectrum` of
    :attr:`mats`) as a task of its own beside this one, and finishes here when both are done.
    """

    mats: list[Matrix]
    device: Device
    limits: Thresholds
    method: str
    rows: int
    cols: int
    n: int
    m: int
    spec: Spectrum
    rank: Rank
    bulk: Bulk
    fit: PowerLawFit | None
    comparison: compare.Comparison | None
    started: float

    def failed(self, exc: BaseException) -> LayerResult:
        """The "failed" result of this matrix, for an error of its trap check."""
        return LayerResult(method=self.method, fit_status=FitStatus.FAILED, trusted=False,
                           error=f"{type(exc).__name__}: {exc}", rows=self.rows,
                           cols=self.cols,
                           elapsed_ms=1000.0 * (time.perf_counter() - self.started))

    def finish(self, rand_evals: np.ndarray | None) -> LayerResult:
        """The result, with the traps of the shuffle's eigenvalues (None: trap check off)."""
        try:
            traps = (None if rand_evals is None
                     else traps_of(rand_evals, self.spec, self.bulk, self.n, self.m))
            verdict = verdict_of(self.fit, self.rank, traps, self.limits)
            status = compare.apply_rule(verdict.status, self.comparison, self.limits)
            if status is not verdict.status:
                verdict = replace(verdict, status=status, trusted=False)
            return _result(method=self.method, rows=self.rows, cols=self.cols, spec=self.spec,
                           rank=self.rank, bulk=self.bulk, fit=self.fit, traps=traps,
                           verdict=verdict, started=self.started,
                           extra=compare.result_fields(self.fit, self.comparison))
        except Exception as exc:  # a result per tensor, whatever happens
            return self.failed(exc)


def analyze_spectrum(
    weight: Matrix,
    *,
    stored_dtype: object = None,
    method: str = "ww",
    thresholds: Thresholds | None = None,
    device: str | Device = "cpu",
) -> LayerResult | Analysed:
    """:func:`analyze_matrix` up to the trap check: a final result when W cannot be analysed
    (``non_finite``, ``degenerate``, ``too_few_evals``, ``failed``), else :class:`Analysed`."""
    limits = thresholds or Thresholds()
    started = time.perf_counter()
    shape = tuple(weight.shape)
    rows = int(shape[0]) if shape else 0
    cols = int(shape[1]) if len(shape) > 1 else 1

    def done(status: FitStatus, error: str | None = None, **values: object) -> LayerResult:
        elapsed = 1000.0 * (time.perf_counter() - started)
        return LayerResult(method=method, fit_status=status, trusted=False, error=error,
                           rows=rows, cols=cols, elapsed_ms=elapsed, **values)  # type: ignore[arg-type]

    try:
        dev = resolve_device(device)
        if weight.ndim < 2 or min(shape) < 1:
            return done(FitStatus.TOO_FEW_EVALS, f"tensor of shape {shape} has no spectrum")
        if _is_complex(weight):
            return done(FitStatus.FAILED, f"complex weights ({weight.dtype}): alphawatch "
                        "analyses real matrices, and the real part alone is not this one")
        data = host_array(weight) if dev.type == "cpu" else _device_tensor(weight, dev)
        mats = as_matrices(data)
        m = min(mats[0].shape)
        n = max(mats[0].shape)
        if m * len(mats) < limits.min_evals:
            return done(FitStatus.TOO_FEW_EVALS, num_evals=m * len(mats),
                        error=f"{m * len(mats)} eigenvalues, fewer than {limits.min_evals}")
        moments = moments_of(data, dev)
        if not moments.finite:
            return done(FitStatus.NON_FINITE, "weights contain NaN or Inf")
        if moments.constant:
            return done(FitStatus.DEGENERATE, "zero or constant matrix")
        spec = spectrum_of(mats, dev)
        moments = with_variance(moments, spec, data)
        fit = fit_power_law(spec.evals, method, bootstrap_samples=limits.bootstrap_samples,
                            seed=limits.trap_seed, device=str(dev))
        return Analysed(
            mats=mats, device=dev, limits=limits, method=method, rows=rows, cols=cols, n=n,
            m=m, spec=spec, rank=rank_of(spec, stored_dtype, n, limits.rank_loss_fraction),
            bulk=bulk_of(moments, spec, n, m), fit=fit,
            # Is the tail a power law at all? (workers/spectral/compare.py; the rule is optional)
            comparison=compare.compare_fit(fit, spec.evals), started=started)
    except Exception as exc:  # a result per tensor, whatever happens
        return done(FitStatus.FAILED, f"{type(exc).__name__}: {exc}")


def _result(*, method: str, rows: int, cols: int, spec: Spectrum, rank: Rank, bulk: Bulk,
            fit: PowerLawFit | None, traps: Traps | None, verdict: Verdict,
            started: float, extra: dict[str, object] | None = None) -> LayerResult:
    lambda_max, norm = spec.lambda_max, spec.norm
    fitted: dict[str, float | int | None] = dict.fromkeys(
        ("alpha", "D", "xmin", "xmax", "sigma", "alpha_delta", "num_pl_spikes",
         "alpha_weighted", "log_alpha_norm"))
    if fit is not None:
        with np.errstate(over="ignore"):
            log_alpha_norm = float(np.log10(np.sum(spec.evals**fit.alpha)))
        fitted = {"alpha": fit.alpha, "D": fit.D, "xmin": fit.xmin, "xmax": fit.xmax,
                  "sigma": fit.sigma, "alpha_delta": fit.alpha_delta, "num_pl_spikes": fit.n,
                  "alpha_weighted": fit.alpha * float(np.log10(lambda_max)),
                  "log_alpha_norm": log_alpha_norm}
    over, under = verdict.over_trained, verdict.under_trained
    return LayerResult(
        method=method, fit_status=verdict.status, trusted=verdict.trusted, rows=rows, cols=cols,
        num_evals=int(spec.evals.size), lambda_max=lambda_max, log_norm=float(np.log10(norm)),
        log_spectral_norm=float(np.log10(lambda_max)), stable_rank=norm / lambda_max,
        entropy=rank.entropy, matrix_rank=rank.matrix_rank, rank_loss=rank.rank_loss,
        mp_bulk_max=bulk.edge, mp_sigma=float(np.sqrt(bulk.variance)),
        num_spikes=bulk.num_spikes, mp_softrank=bulk.edge / lambda_max,
        num_traps=None if traps is None else traps.num_traps,
        rand_distance=None if traps is None else traps.rand_distance,
        max_rand_eval=None if traps is None else traps.max_rand_eval,
        mean_spike=traps is not None and traps.mean_spike,
        correlation_trap=traps is not None and traps.num_traps > 0,
        rank_collapse=rank.rank_collapse,
        near_random=traps is not None and traps.near_random, over_trained=over,
        under_trained=under,
        warning="over-trained" if over else ("under-trained" if under else None),
        elapsed_ms=1000.0 * (time.perf_counter() - started),
        # stored as float32: an eigenvalue beyond 3.4e38 is kept as inf (the API answers null)
        evals=_float32(spec.evals),
        rand_evals=None if traps is None else _float32(traps.rand_evals),
        **fitted,  # type: ignore[arg-type]
        **(extra or {}),  # type: ignore[arg-type]
    )


def _float32(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def analyze_many(
    items: Iterable[tuple[str, Matrix, object]],
    *,
    method: str = "ww",
    thresholds: Thresholds | None = None,
    device: str | Device = "cpu",
    check_traps: bool = True,
) -> Iterator[tuple[str, LayerResult]]:
    """Analyse many tensors, largest first so the device never idles on a small tail of work.

    Yields one ``(name, result)`` per item, even when an item fails. On CUDA the next tensor is
    copied to pinned memory while the current one is analysed.
    """
    dev = resolve_device(device)
    work = sorted(items, key=lambda item: -_numel(item[1]))
    for name, tensor, dtype in work:
        if dev.type == "cuda":
            tensor = _device_tensor(tensor, HOST).pin_memory().to(
                str(dev), non_blocking=True)
        yield name, analyze_matrix(tensor, stored_dtype=dtype, method=method,
                                   thresholds=thresholds, device=dev, check_traps=check_traps)
