"""Where a correlation trap sits: the neurons that W's top singular vectors live on.

A correlation trap is a few unusually large, correlated entries of W; they make W's top
singular vectors *localised* on the rows (output neurons) and columns (input neurons) that hold
them, where a healthy layer's top vectors spread over many neurons. For each of W's top singular
pairs this reports the participation ratio of the left and right vector and the neurons with
the largest weight in them. Computed only for trapped layers, from a few Lanczos iterations
(ARPACK), not from a full decomposition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from alphawatch.workers.spectral.device import Matrix, host_array

TOP_NEURONS = 8
"""Neurons reported per singular vector, the largest |weight| first."""

MAX_VECTORS = 3
"""Singular pairs reported at most: the spikes beyond the bulk, at least the top one."""


@dataclass(frozen=True)
class NeuronWeights:
    """One singular vector's localisation: its participation ratio and its heaviest neurons.

    ``participation`` = (Σx²)²/Σx⁴: 1 when one neuron carries the whole vector, the vector's
    length when it is spread evenly (≈ length/3 for a random direction). ``neurons`` are
    indices into W's rows (left vectors) or columns (right vectors), the largest |x| first;
    ``weights`` their shares x²/Σx² of the vector (together at most 1).
    """

    participation: float
    neurons: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class TrapVector:
    """One of W's top singular pairs: σ, and where its left (rows) and right (columns) live."""

    sigma: float
    rows: NeuronWeights
    cols: NeuronWeights


@dataclass(frozen=True)
class Localisation:
    """The localisation of W's top singular pairs, largest σ first (W as stored: out × in)."""

    shape: tuple[int, int]
    vectors: tuple[TrapVector, ...]

    def as_json(self) -> dict[str, Any]:
        """Plain lists and numbers, JSON ready (stored with the layer, served by the API)."""
        return {
            "shape": list(self.shape),
            "vectors": [
                {
                    "sigma": v.sigma,
                    "rows": {**asdict(v.rows), "neurons": list(v.rows.neurons)},
                    "cols": {**asdict(v.cols), "neurons": list(v.cols.neurons)},
                }
                for v in self.vectors
            ],
        }


def neuron_weights(vector: np.ndarray, top: int = TOP_NEURONS) -> NeuronWeights:
    """Participation ratio and the ``top`` heaviest entries of one vector (any norm).

    Permuting the vector permutes the reported neurons and leaves the ratio and the weights
    unchanged (ties are broken by the smaller index, the only order a permutation can move).
    """
    x2 = np.square(np.asarray(vector, dtype=np.float64))
    total = float(x2.sum())
    if not total > 0:
        return NeuronWeights(participation=0.0, neurons=(), weights=())
    share = x2 / total
    order = np.lexsort((np.arange(share.size), -share))[: min(top, share.size)]
    return NeuronWeights(
        participation=float(1.0 / np.sum(share * share)),
        neurons=tuple(int(i) for i in order),
        weights=tuple(float(share[i]) for i in order),
    )


def top_singular(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` largest singular triplets of ``w`` (u: rows × k, σ: k, v: cols × k), σ
    descending, by ARPACK's Lanczos iteration; a dense SVD where ``w`` is too small for it.

    The start vector is W's column norms (plus one), which permutes with W's columns: the
    iteration on a permuted W is the permuted iteration, so the result is equivariant to
    neuron permutations up to rounding, not only up to the convergence tolerance.
    """
    w = np.asarray(w, dtype=np.float64)
    small = min(w.shape)
    if k >= small - 1 or small <= 32:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return u[:, :k], s[:k], vt[:k].T
    from scipy.sparse.linalg import svds

    tall = w.shape[0] >= w.shape[1]
    # svds starts from a vector of length min(shape): the smaller side's norms
    start = 1.0 + (np.einsum("ij,ij->j", w, w) if tall else np.einsum("ij,ij->i", w, w))
    u, s, vt = svds(w, k=k, v0=start / np.linalg.norm(start), solver="arpack")
    order = np.argsort(-s)
    return u[:, order], s[order], vt[order].T


def localise(weight: Matrix, spikes: int) -> Localisation | None:
    """Which neurons carry W's top singular pairs (for a layer with a correlation trap).

    Parameters
    ----------
    weight : numpy.ndarray or torch.Tensor
        The 2-D matrix as stored, (out, in): rows are output neurons, columns input neurons.
        A Conv2d kernel has no single neuron reading and gets None.
    spikes : int
        How many of W's eigenvalues lie beyond the bulk: that many pairs are reported, at least
        one and at most ``MAX_VECTORS``.

    Returns
    -------
    Localisation or None
        Per pair σ, and for its left (rows) and right (columns) vector the participation ratio
        and the ``TOP_NEURONS`` neurons of largest |weight| with their shares. A trap planted on
        a few neurons shows as a participation ratio near their count and those neurons on top;
        a ratio near a third of the side says the direction is spread out (no neuron to blame).
    """
    if weight.ndim != 2 or min(weight.shape) < 2:
        return None
    w = np.asarray(host_array(weight), dtype=np.float64)
    # The vectors do not depend on W's scale; at 1e100 (finite, analysed in float64) W·Wᵀv
    # would overflow. σ is scaled back.
    scale = float(np.max(np.abs(w)))
    if not (np.isfinite(scale) and scale > 0):
        return None
    k = max(1, min(MAX_VECTORS, spikes, min(w.shape) - 1))
    u, s, v = top_singular(w / scale, k)
    s = s * scale
    return Localisation(
        shape=(int(w.shape[0]), int(w.shape[1])),
        vectors=tuple(
            TrapVector(
                sigma=float(s[i]), rows=neuron_weights(u[:, i]), cols=neuron_weights(v[:, i])
            )
            for i in range(k)
        ),
    )
