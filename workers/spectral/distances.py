"""How far one layer moved between two checkpoints: relative changes and subspace rotation.

Pure numpy on two matrices of one shape; no files, no database. The worker measures each weight
matrix against the same matrix of the checkpoint before it (by step) and stores the three
numbers beside the layer's alpha (docs/SPECTRAL.md, "Layer distances").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alphawatch.workers.spectral.device import Matrix, host_array

OVERLAP_K = 10
"""Singular directions compared by :func:`layer_distance`: the top 10, or fewer in a matrix of
lower rank."""


@dataclass(frozen=True, slots=True)
class LayerDistance:
    """How a matrix W differs from the same layer's W_ref of an earlier checkpoint.

    ``change_fro`` = ‖W − W_ref‖_F / ‖W‖_F and ``change_spectral`` = ‖W − W_ref‖₂ / ‖W‖₂ (0 for
    identical matrices; 1 when the update is as large as the matrix). ``subspace_overlap`` =
    ‖U_refᵀ U‖_F² / k over the top-k singular vectors of the matrices' smaller side: 1 when
    the k leading directions are the same (whatever their signs or order within the subspace),
    k/M for unrelated random directions, 0 for orthogonal ones. ``overlap_k`` is that k. A
    zero W leaves its ratios None; a zero matrix on either side leaves the overlap None.
    """

    change_fro: float | None
    change_spectral: float | None
    subspace_overlap: float | None
    overlap_k: int | None


def layer_distance(weight: Matrix, reference: Matrix, *, k: int = OVERLAP_K) -> LayerDistance:
    """Relative Frobenius and spectral change of ``weight`` from ``reference``, and the overlap
    of their top-``k`` singular subspaces.

    Parameters
    ----------
    weight, reference : array or tensor, shape (out, in), same shape
        The layer now and at the earlier checkpoint; any float dtype (upcast to float64).
    k : int
        Singular directions compared; ``min(k, rank)`` where a matrix has lower rank, with the
        rank of the two matrices' smaller one.

    Returns
    -------
    LayerDistance
        The changes relative to ``weight``'s norms, and the subspace overlap in [0, 1].

    Notes
    -----
    Singular values and vectors come from the float64 Gram matrix of the smaller side (the
    M×M matrix whose eigenvalues are weightwatcher's ESD; numpy's ``eigh``, O(M³) like the
    ESD itself, for W and W_ref, and ``eigvalsh`` for ΔW): its top-k eigenvectors span the
    top-k right (or, for a wide matrix, left) singular subspace. An eigenvector's sign, and
    the basis chosen within a repeated singular value, leave ‖U_refᵀ U‖_F² unchanged.

    Raises
    ------
    ValueError
        The two matrices differ in shape, or are not 2-D.
    """
    now = host_array(weight)
    then = host_array(reference)
    if now.ndim != 2 or now.shape != then.shape:
        raise ValueError(f"cannot compare a {now.shape} matrix with a {then.shape} one")
    now64 = np.asarray(now, dtype=np.float64)
    then64 = np.asarray(then, dtype=np.float64)
    if now64.shape[0] < now64.shape[1]:  # the smaller side's Gram: M×M with M = min(out, in)
        now64, then64 = now64.T, then64.T
    delta = now64 - then64
    gram_now = now64.T @ now64
    gram_then = then64.T @ then64
    norm_fro = float(np.sqrt(max(np.trace(gram_now), 0.0)))
    top_now, vectors_now = _top(gram_now, k)
    top_then, vectors_then = _top(gram_then, k)
    delta_top = np.linalg.eigvalsh(delta.T @ delta)[-1:]
    change_fro = change_spectral = None
    if norm_fro > 0.0:
        change_fro = float(np.linalg.norm(delta)) / norm_fro
        change_spectral = float(np.sqrt(max(delta_top[-1], 0.0) / top_now[-1]))
    rank = min(_rank(top_now), _rank(top_then))
    if rank == 0:
        return LayerDistance(change_fro, change_spectral, None, None)
    kk = min(k, rank)
    # eigh returns ascending eigenvalues: the last kk columns are the top-kk directions.
    cross = vectors_then[:, -kk:].T @ vectors_now[:, -kk:]
    overlap = float(np.sum(cross * cross)) / kk
    return LayerDistance(change_fro, change_spectral, min(max(overlap, 0.0), 1.0), kk)


def _top(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (ascending) of a symmetric matrix and their eigenvectors."""
    # numpy's LAPACK (dsyevd), the engine's own: scipy's would load a second BLAS into the
    # analysis process, whose thread pools the engine's float32 shuffle would then share.
    values, vectors = np.linalg.eigh(gram)
    kk = min(k, gram.shape[0])
    return values[-kk:], vectors[:, -kk:]


def _rank(top: np.ndarray) -> int:
    """How many of the top eigenvalues stand above rounding (float64 Gram: ~1e-12·λmax)."""
    if top.size == 0 or top[-1] <= 0.0:
        return 0
    return int(np.count_nonzero(top > top[-1] * 1e-10))
