"""Layer distances against numpy's SVD computed independently: relative changes, and the overlap
of top-k singular subspaces (invariant to the vectors' signs, 1 for identical matrices)."""

from __future__ import annotations

import numpy as np
import pytest

from alphawatch.workers.spectral.distances import OVERLAP_K, layer_distance


def trained_like(rows: int, cols: int, seed: int) -> np.ndarray:
    """A low-rank signal over noise, as trained layers are: a clear gap after the 10th
    singular value, so the top-10 subspace is well defined."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((rows, 12)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, 12)))[0]
    signal = (u * np.linspace(30.0, 8.0, 12)) @ v.T
    return (signal + rng.standard_normal((rows, cols))).astype(np.float32)


def numpy_reference(now: np.ndarray, then: np.ndarray, k: int) -> tuple[float, float, float]:
    """The three numbers from full SVDs in float64, with the singular vectors' signs flipped at
    random: a sign is no property of a subspace."""
    a, b = now.astype(np.float64), then.astype(np.float64)
    delta = a - b
    fro = np.linalg.norm(delta) / np.linalg.norm(a)
    spectral = np.linalg.svd(delta, compute_uv=False)[0] / np.linalg.svd(a, compute_uv=False)[0]
    smaller_side = 1 if a.shape[0] >= a.shape[1] else 0  # right vectors of a tall matrix
    signs = np.random.default_rng(7).choice([-1.0, 1.0], size=k)

    def top(m: np.ndarray) -> np.ndarray:
        u, _, vt = np.linalg.svd(m, full_matrices=False)
        vectors = vt.T if smaller_side == 1 else u
        return vectors[:, :k] * signs

    cross = top(b).T @ top(a)
    return float(fro), float(spectral), float(np.sum(cross**2) / k)


@pytest.mark.parametrize(("rows", "cols"), [(300, 120), (120, 300), (200, 200)])
def test_distances_equal_numpy(rows: int, cols: int) -> None:
    before = trained_like(rows, cols, 0)
    rng = np.random.default_rng(1)
    # A training step: the signal moves a little, the noise is redrawn in part.
    after = before + 0.3 * rng.standard_normal((rows, cols)).astype(np.float32)
    after[:, :5] += 2.0
    ours = layer_distance(after, before)
    fro, spectral, overlap = numpy_reference(after, before, OVERLAP_K)
    assert ours.overlap_k == OVERLAP_K
    assert ours.change_fro == pytest.approx(fro, rel=1e-6)
    assert ours.change_spectral == pytest.approx(spectral, rel=1e-6)
    assert ours.subspace_overlap == pytest.approx(overlap, rel=1e-6, abs=1e-9)
    assert 0.0 < ours.subspace_overlap < 1.0


def test_identical_checkpoints_overlap_one() -> None:
    weight = trained_like(150, 90, 3)
    same = layer_distance(weight, weight.copy())
    assert same.change_fro == 0.0 and same.change_spectral == pytest.approx(0.0, abs=1e-12)
    assert same.subspace_overlap == pytest.approx(1.0, abs=1e-12)


def test_overlap_ignores_signs_and_rotations_within_the_subspace() -> None:
    weight = trained_like(160, 100, 4)
    # -W has every singular vector of one side negated: same subspaces, change 2.
    flipped = layer_distance(-weight, weight)
    assert flipped.subspace_overlap == pytest.approx(1.0, abs=1e-10)
    assert flipped.change_fro == pytest.approx(2.0, rel=1e-6)
    # A rotation of the output space moves no input direction: the right subspace is kept.
    q = np.linalg.qr(np.random.default_rng(5).standard_normal((160, 160)))[0]
    rotated = layer_distance((q @ weight).astype(np.float32), weight)
    assert rotated.subspace_overlap == pytest.approx(1.0, abs=1e-6)
    # A rotation of the input space does move them, and the overlap says so.
    r = np.linalg.qr(np.random.default_rng(6).standard_normal((100, 100)))[0]
    turned = layer_distance((weight @ r).astype(np.float32), weight)
    assert turned.subspace_overlap < 0.5


def test_unrelated_directions_overlap_near_k_over_m() -> None:
    a, b = trained_like(400, 200, 8), trained_like(400, 200, 9)
    moved = layer_distance(a, b)
    # Two random 10-dimensional subspaces of R^200 overlap by 10/200 on average.
    assert moved.subspace_overlap == pytest.approx(OVERLAP_K / 200, abs=0.04)


def test_low_rank_matrices_use_their_rank() -> None:
    rng = np.random.default_rng(2)
    low = (rng.standard_normal((80, 3)) @ rng.standard_normal((3, 60))).astype(np.float32)
    moved = layer_distance(low * 1.5, low)
    assert moved.overlap_k == 3
    assert moved.subspace_overlap == pytest.approx(1.0, abs=1e-8)
    assert moved.change_fro == pytest.approx(1 / 3, rel=1e-6)


def test_zero_matrix_and_shape_mismatch() -> None:
    zero = np.zeros((20, 10), dtype=np.float32)
    nothing = layer_distance(zero, zero)
    assert nothing.change_fro is None and nothing.subspace_overlap is None
    with pytest.raises(ValueError, match="cannot compare"):
        layer_distance(zero, np.zeros((10, 20), dtype=np.float32))
