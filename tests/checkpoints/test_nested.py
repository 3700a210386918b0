"""Nested sub-model spectra (MatFormer): MLP matrices cut to their first k neurons.

Properties: permuting the MLP's neurons consistently (gate and up rows, down columns) leaves the
full matrices' spectra unchanged, and changes each nested slice exactly as slicing the permuted
matrix predicts. On a real nested Llama trained by the test, each ``@w<k>`` alpha is
weightwatcher 0.7.7's on the same slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from alphawatch.trust import Thresholds
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import Confinement, iter_layers
from alphawatch.workers.checkpoints.files import make_layer
from alphawatch.workers.checkpoints.nested import nested_matrices, nested_widths
from alphawatch.workers.spectral import analyze_matrix
from tests.checkpoints.training import INTERMEDIATE, nested_run
from tests.spectral.test_parity import ww_row


def _mlp(seed: int, hidden: int, neurons: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed entries, so the fits have a tail to find.
    t = torch.distributions.StudentT(torch.tensor(3.0))
    torch.manual_seed(seed)
    return {
        "gate": t.sample((neurons, hidden)) / hidden**0.5,
        "up": torch.randn(neurons, hidden, generator=g) / hidden**0.5,
        "down": t.sample((hidden, neurons)) / neurons**0.5,
    }


def _layers(weights: dict[str, torch.Tensor]) -> dict[str, object]:
    return {
        kind: make_layer(f"model.layers.3.mlp.{kind}_proj", w, torch.float32, "test")
        for kind, w in weights.items()
    }


def _evals(weight: torch.Tensor) -> np.ndarray:
    """Eigenvalues λ = σ² of W (float64), ascending."""
    return np.sort(torch.linalg.svdvals(weight.double()).numpy() ** 2)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    hidden=st.integers(20, 40),
    neurons=st.integers(24, 72),
    data=st.data(),
)
def test_permuting_neurons_keeps_full_spectra_and_moves_nested_ones_as_slicing_predicts(
    seed: int, hidden: int, neurons: int, data: st.DataObject
) -> None:
    weights = _mlp(seed, hidden, neurons)
    order = torch.tensor(data.draw(st.permutations(range(neurons))))
    widths = data.draw(st.lists(st.integers(1, neurons + 8), min_size=1, max_size=3))
    permuted = {
        "gate": weights["gate"][order],
        "up": weights["up"][order],
        "down": weights["down"][:, order],
    }
    before, after = _layers(weights), _layers(permuted)
    for kind in ("gate", "up", "down"):
        # The full matrix: the same spectrum whatever the order of its neurons.
        np.testing.assert_allclose(
            _evals(permuted[kind]), _evals(weights[kind]), rtol=1e-9, atol=1e-12
        )
        full, moved = (analyze_matrix(w[kind], check_traps=False) for w in (weights, permuted))
        assert (full.alpha, full.fit_status) == (
            pytest.approx(moved.alpha, rel=1e-9),
            moved.fit_status,
        )
        sliced = {m.name: m for m in nested_matrices(after[kind], widths)}  # type: ignore[arg-type]
        expected_widths = sorted({w for w in widths if w < neurons})
        assert list(sliced) == [f"model.layers.3.mlp.{kind}_proj@w{w}" for w in expected_widths]
        for width in expected_widths:
            piece = sliced[f"model.layers.3.mlp.{kind}_proj@w{width}"]
            assert (piece.kind, piece.block) == (kind, 3)
            # The nested slice is the original matrix restricted to the neurons now first.
            kept = order[:width]
            predicted = weights[kind][kept] if kind != "down" else weights[kind][:, kept]
            assert torch.equal(piece.weight, predicted)
            np.testing.assert_allclose(_evals(piece.weight), _evals(predicted), rtol=1e-12)
    # Unpermuted, the slices are the leading neurons themselves.
    first = next(iter(nested_matrices(before["down"], [min(neurons - 1, 5)])))  # type: ignore[arg-type]
    assert torch.equal(first.weight, weights["down"][:, : min(neurons - 1, 5)])


def test_only_mlp_matrices_are_sliced() -> None:
    attention = make_layer(
        "model.layers.0.self_attn.q_proj", torch.randn(64, 64), torch.float32, "test"
    )
    assert list(nested_matrices(attention, [16, 32])) == []


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return nested_run(tmp_path_factory.mktemp("matformer"), [32, 64])


def _options(**extra: object) -> AnalysisOptions:
    return AnalysisOptions(
        method="ww",
        thresholds=Thresholds(),
        device=torch.device("cpu"),
        confine=Confinement(None),
        **extra,
    )  # type: ignore[arg-type]


@pytest.mark.slow
def test_nested_rows_from_the_config_match_weightwatcher_on_the_slices(nested: Path) -> None:
    assert nested_widths(nested) == (32, 64)
    layers = analyze_checkpoint(nested, None, _options()).layers
    rows = {r.name: r for r in layers}
    weights = {m.name: m for m in iter_layers(nested)}
    mlp = [n for n, m in weights.items() if m.kind in ("gate", "up", "down")]
    assert len(mlp) == 6
    assert {n for n in rows if "@" in n} == {f"{n}@w{k}" for n in mlp for k in (32, 64)}
    assert all(r.evals is not None for r in layers)
    for name in mlp:
        weight = torch.as_tensor(weights[name].weight)
        for width in (32, 64):
            piece = weight[:width] if weights[name].kind != "down" else weight[:, :width]
            linear = nn.Linear(piece.shape[1], piece.shape[0], bias=False)
            linear.weight.data = piece.clone()
            expected = ww_row(nn.Sequential(linear))
            row = rows[f"{name}@w{width}"]
            assert row.result.alpha == pytest.approx(expected["alpha"], rel=1e-6), (name, width)
            assert row.result.num_pl_spikes == int(expected["num_pl_spikes"])
            assert (row.kind, row.block) == (weights[name].kind, weights[name].block)


@pytest.mark.slow
def test_explicit_widths_win_over_the_config(nested: Path) -> None:
    layers = analyze_checkpoint(nested, None, _options(nested_widths=(16, INTERMEDIATE))).layers
    variants = {r.name.partition("@")[2] for r in layers if "@" in r.name}
    # The full width is the weight itself, analysed already.
    assert variants == {"w16"}
