"""Trap localisation: which neurons carry a correlation trap.

A rank-one spike planted on a few known rows and columns of a random matrix makes a trap (its
large entries survive the shuffle); the report must name those neurons, with participation
ratios near their counts, and follow any permutation of the neurons.
"""

from __future__ import annotations

import numpy as np
import pytest

from alphawatch.workers.spectral import analyze_matrix
from alphawatch.workers.spectral.localise import (
    MAX_VECTORS,
    TOP_NEURONS,
    localise,
    neuron_weights,
    top_singular,
)

ROWS, COLS = 300, 200
PLANTED_ROWS = (7, 42, 123)
PLANTED_COLS = (5, 77, 150, 199)


def planted(seed: int = 0, strength: float = 3.0) -> np.ndarray:
    """iid N(0, 0.05²) plus s·u·vᵀ on the planted rows and columns (entries of about ±3)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.05, (ROWS, COLS))
    u = np.zeros(ROWS)
    v = np.zeros(COLS)
    u[list(PLANTED_ROWS)] = [1.0, -0.9, 0.8]
    v[list(PLANTED_COLS)] = [1.0, 0.9, -1.1, 0.8]
    return w + strength * np.outer(u, v)


def test_a_planted_trap_is_found_on_its_neurons() -> None:
    result = analyze_matrix(planted())
    assert result.correlation_trap and result.shuffle_traps
    loc = result.trap_localisation
    assert loc is not None and loc["shape"] == [ROWS, COLS]
    top = loc["vectors"][0]
    assert set(top["rows"]["neurons"][: len(PLANTED_ROWS)]) == set(PLANTED_ROWS)
    assert set(top["cols"]["neurons"][: len(PLANTED_COLS)]) == set(PLANTED_COLS)
    # the planted neurons carry nearly all of each vector; its participation ratio is about
    # their count (the unequal weights make it a little less), far from a spread vector's ~N/3
    assert sum(top["rows"]["weights"][: len(PLANTED_ROWS)]) > 0.95
    assert sum(top["cols"]["weights"][: len(PLANTED_COLS)]) > 0.95
    assert 2.0 < top["rows"]["participation"] < len(PLANTED_ROWS) + 0.5
    assert 3.0 < top["cols"]["participation"] < len(PLANTED_COLS) + 0.5
    assert len(top["rows"]["neurons"]) == TOP_NEURONS
    assert 1 <= len(loc["vectors"]) <= MAX_VECTORS
    assert top["sigma"] == pytest.approx(np.linalg.svd(planted(), compute_uv=False)[0], rel=1e-9)


def test_an_iid_matrix_has_no_trap_and_no_localisation() -> None:
    result = analyze_matrix(np.random.default_rng(1).normal(0.0, 0.05, (ROWS, COLS)))
    assert not result.correlation_trap and result.trap_localisation is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_localisation_follows_a_permutation_of_the_neurons(seed: int) -> None:
    w = planted(seed)
    rng = np.random.default_rng(100 + seed)
    rows, cols = rng.permutation(ROWS), rng.permutation(COLS)
    permuted = w[rows][:, cols]  # permuted[i, j] = w[rows[i], cols[j]]
    where_row = np.argsort(rows)  # w's row r is permuted's row where_row[r]
    where_col = np.argsort(cols)
    ours, theirs = analyze_matrix(w), analyze_matrix(permuted)
    assert ours.trap_localisation is not None and theirs.trap_localisation is not None
    assert len(ours.trap_localisation["vectors"]) == len(theirs.trap_localisation["vectors"])
    for a, b in zip(
        ours.trap_localisation["vectors"], theirs.trap_localisation["vectors"], strict=True
    ):
        assert b["sigma"] == pytest.approx(a["sigma"], rel=1e-9)
        for side, where in (("rows", where_row), ("cols", where_col)):
            assert b[side]["participation"] == pytest.approx(a[side]["participation"], rel=1e-6)
            assert b[side]["neurons"] == [int(where[n]) for n in a[side]["neurons"]]
            assert b[side]["weights"] == pytest.approx(a[side]["weights"], rel=1e-6, abs=1e-12)


def test_participation_ratio_reads_as_a_neuron_count() -> None:
    one = neuron_weights(np.eye(50)[3])
    assert one.participation == pytest.approx(1.0) and one.neurons[0] == 3
    assert one.weights[0] == pytest.approx(1.0)
    even = neuron_weights(np.ones(50))
    assert even.participation == pytest.approx(50.0)
    # equal weights: the smaller index first, whatever the order they came in
    assert even.neurons == tuple(range(TOP_NEURONS))
    assert neuron_weights(np.zeros(5)).neurons == ()


def test_lanczos_matches_the_dense_decomposition() -> None:
    w = planted(3)
    u, s, v = top_singular(w, 3)
    du, ds, dvt = np.linalg.svd(w, full_matrices=False)
    assert s == pytest.approx(ds[:3], rel=1e-10)
    for i in range(3):
        assert abs(float(u[:, i] @ du[:, i])) == pytest.approx(1.0, abs=1e-8)
        assert abs(float(v[:, i] @ dvt[i])) == pytest.approx(1.0, abs=1e-8)
    wide = top_singular(w.T, 2)
    assert wide[1] == pytest.approx(ds[:2], rel=1e-10)


def test_conv_kernels_and_vectors_have_no_neuron_reading() -> None:
    assert localise(np.ones((4, 3, 3, 3)), 1) is None
    assert localise(np.ones((1, 30)), 1) is None
