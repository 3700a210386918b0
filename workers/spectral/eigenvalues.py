"""Eigenvalues λ = σ² of a weight matrix and of its shuffle: Gram matrix, then eigvalsh.

The host path computes with numpy's OpenBLAS and LAPACK (through :mod:`lapack`); the
accelerator path (:attr:`Device.accelerated`) with torch on its device, in the same precision:
W's spectrum in float64, the shuffle's in float32 (TF32 off on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from alphawatch.workers.spectral import lapack
from alphawatch.workers.spectral.device import (
    Device,
    Matrix,
    device_tensor,
    exact_float32,
    host_array,
)

if TYPE_CHECKING:
    import torch


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


def gram(matrix: np.ndarray) -> np.ndarray:
    """The Gram matrix of the smaller side (WᵀW or WWᵀ), M×M, in ``matrix``'s dtype.

    numpy computes a product of a matrix with its own transpose with BLAS ``syrk`` (one
    triangle, mirrored): half the multiplications of a general product, and it releases the
    GIL, so the worker threads of ``analyze_stream`` run their products at once.
    """
    product: np.ndarray = (
        matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    )
    return product


def _torch_gram(w: torch.Tensor) -> torch.Tensor:
    return w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T


def singular_values(matrix: Matrix, device: Device) -> np.ndarray:
    """Singular values, descending, float64.

    Float64 Gram matrix, then float64 eigvalsh, accurate to ~1e-8·σmax (rank metrics need
    that). Host: BLAS ``syrk`` and LAPACK ``syevd`` through numpy. Accelerator: torch on its
    device, the same precision, so both paths agree to rounding (~1e-13 relative).
    """
    if device.accelerated:
        return _singular_values_torch(matrix, device)
    # float64 Gram + eigvalsh is several times faster than an SVD; its absolute error on λ is
    # ~eps64·λmax, i.e. ~1e-8·σmax on σ: below the float32 rank tolerance (1.2e-7·σmax).
    # numpy's OpenBLAS rather than torch's MKL on a CPU: about twice as fast on the Gram matrix
    # and 1.5x on the eigenvalues (BENCHMARKS.md); its LAPACK is called through ctypes
    # (lapack.py: a faster reduction from 1536), which releases the GIL where scipy.linalg's
    # wrappers hold it and would serialise the worker threads.
    host = host_array(matrix)
    tall = host if host.shape[0] >= host.shape[1] else host.T
    product = lapack.gram_upper(lambda i, j: tall[i:j], tall.shape[0], tall.shape[1], np.float64)
    if product is None:
        product = gram(host.astype(np.float64, copy=False))
    check_squares(np.diagonal(product), host)
    evals = lapack.eigvalsh(product, overwrite=True)
    svals: np.ndarray = np.sqrt(np.clip(evals[::-1], 0.0, None))
    return svals


def _singular_values_torch(matrix: Matrix, device: Device) -> np.ndarray:
    import torch

    # Float64, as on the host: a float32 Gram matrix leaves noise of ~eps32·λmax where a
    # low-rank W has zeros, which counted a rank-8 matrix as rank 78 and, above the fit's 1e-5
    # floor, moved alpha by 4% (tests/spectral/test_torch_path.py)
    w = device_tensor(matrix, device).to(torch.float64)
    g = _torch_gram(w)
    diagonal = g.diagonal().cpu().numpy()
    if not (np.isfinite(diagonal).all() and diagonal.max() >= np.finfo(np.float64).tiny):
        check_squares(diagonal, w.cpu().numpy())
    evals = torch.linalg.eigvalsh(g).clamp_min(0).flip(0)
    return np.asarray(np.sqrt(evals.cpu().numpy()), dtype=np.float64)


def shuffled_eigenvalues(matrix: Matrix, perm: np.ndarray, device: Device) -> np.ndarray:
    """Eigenvalues λ = σ² of ``matrix`` with its entries permuted by ``perm``, ascending.

    Float32 throughout (TF32 off on CUDA; on the host :func:`lapack.eigvalsh` in single
    precision): the shuffle feeds only the trap count, ``max_rand_eval``, ``rand_distance``
    and ``near_random``, which look at the top of the spectrum and at log-histograms, not at
    the rank. Float32 leaves an absolute error of ~1e-5·λmax that moves with the BLAS thread
    count: the top is exact to ~1e-6 relative, eigenvalues below ~1e-4·λmax are noise
    (clamped at 0; ``rand_distance`` pools everything below ``RAND_FLOOR``·λmax).
    """
    if device.accelerated:
        return _shuffled_eigenvalues_torch(matrix, perm, device)
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
            return flat.take(perm[start * small : stop * small], mode="clip").reshape(-1, small)

        product = lapack.gram_upper(rows, tall, small, dtype)
        return gram(rows(0, tall).astype(dtype, copy=False)) if product is None else product

    product = shuffled_gram(np.float32)
    if not float32_gram_usable(np.diagonal(product)):
        product = shuffled_gram(np.float64)
        # every entry is in one diagonal sum of squares: a NaN or Inf weight shows there
        if not np.isfinite(np.diagonal(product)).all():
            raise ValueError("the shuffled matrix is not finite")
    # In float32 (1.5x faster at 2048²): its noise lies a decade under RAND_FLOOR, where
    # rand_distance pools it, and moved rand_distance by <1e-3 (docs/SPECTRAL.md)
    evals = lapack.eigvalsh(product, overwrite=True, single=True)
    np.clip(evals, 0.0, None, out=evals)
    return evals


def _shuffled_eigenvalues_torch(matrix: Matrix, perm: np.ndarray, device: Device) -> np.ndarray:
    import torch

    t = device_tensor(matrix, device)
    index = torch.from_numpy(perm).to(device=device.torch_device, dtype=torch.int64)

    def shuffled_gram(dtype: torch.dtype) -> torch.Tensor:
        return _torch_gram(t.to(dtype).reshape(-1).index_select(0, index).reshape(t.shape))

    with exact_float32(device):
        g = shuffled_gram(torch.float32)
        if not float32_gram_usable(g.diagonal().cpu().numpy()):
            # from W's own values: float64 weights beyond float32's range are inf in float32
            g = shuffled_gram(torch.float64)
            if not bool(torch.isfinite(g.diagonal()).all()):
                raise ValueError("the shuffled matrix is not finite")
        evals = torch.linalg.eigvalsh(g).clamp_min(0)
    return np.asarray(evals.cpu().numpy(), dtype=np.float64)


def check_squares(diagonal: np.ndarray, weights: np.ndarray) -> None:
    """Refuse finite float64 weights whose squares (the Gram diagonal) leave float64's range:
    eigenvalues λ = σ² of weights of ~1e160 or ~1e-160 have no float64 value. (NaN or Inf
    weights never get here: the moments catch them.)"""
    if np.isfinite(diagonal).all() and (
        diagonal.max() >= np.finfo(np.float64).tiny or not np.any(weights)
    ):
        return
    largest = float(np.max(np.abs(weights)))
    side = "overflow" if not np.isfinite(diagonal).all() else "underflow"
    raise ValueError(
        f"weights of magnitude up to {largest:.1e}: their squares {side} float64, "
        "so the eigenvalues λ = σ² have no float64 value; rescale the matrix"
    )


FLOAT32_GRAM_FLOOR = 1e-30
"""Below this largest diagonal entry the shuffle's float32 Gram matrix has lost its squares to
underflow (subnormal or 0)."""


def float32_gram_usable(diagonal: np.ndarray) -> bool:
    """Whether the shuffle's float32 Gram matrix holds its spectrum: every diagonal sum of
    squares finite and not underflowed. Finite weights of 1e18 or 1e-25 have squares beyond
    float32's range (inf, or 0): that rare shuffle is computed again in float64, and only a
    NaN or Inf weight fails it."""
    return bool(np.isfinite(diagonal).all()) and float(diagonal.max()) >= FLOAT32_GRAM_FLOOR


def spectrum_of(mats: list[Matrix], dev: Device) -> Spectrum:
    """Pooled eigenvalues of ``mats`` (one matrix, or the slices of a Conv2d kernel)."""
    svals = [singular_values(w, dev) for w in mats]
    return Spectrum(evals=np.sort(np.concatenate([s**2 for s in svals])), svals=svals)
