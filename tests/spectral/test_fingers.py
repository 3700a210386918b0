"""The finger-robust methods equal weightwatcher 0.7.7's ``fix_fingers`` on the same matrices.

Reference values: scripts/ww_finger_reference.py, run with weightwatcher 0.7.7 and powerlaw 1.5
(weightwatcher's powerlaw path fails under powerlaw 2.0.0), on seeded matrices and on a Llama
layer it trained and saved in bfloat16. Here the same files go through alphawatch's own reader
and engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alphawatch.workers.checkpoints import iter_layers
from alphawatch.workers.spectral import analyze_matrix, fit_power_law
from alphawatch.workers.spectral.fingers import fit_clip_xmax, fit_xmin_peak, peak_of

DATA = Path(__file__).resolve().parent.parent / "data" / "fingers"
REFERENCE = json.loads((DATA / "reference.json").read_text())
RTOL = 1e-3
METHODS = ("xmin_peak", "clip_xmax")


def _check(ours: dict[str, object], expected: dict[str, float], method: str) -> None:
    assert ours["method"] == method
    assert ours["alpha"] == pytest.approx(expected["alpha"], rel=RTOL)
    assert ours["D"] == pytest.approx(expected["D"], rel=RTOL)
    assert ours["xmin"] == pytest.approx(expected["xmin"], rel=RTOL)
    assert ours["sigma"] == pytest.approx(expected["sigma"], rel=RTOL)
    assert ours["num_pl_spikes"] == int(expected["num_pl_spikes"])
    if method == "clip_xmax":
        assert ours["num_fingers"] == int(expected["num_fingers"])


SEEDED = sorted(REFERENCE["files"]["seeded.safetensors"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SEEDED)
def test_seeded_matrices_match_weightwatcher(name: str, method: str) -> None:
    weight = load_file(str(DATA / "seeded.safetensors"))[name]
    expected = REFERENCE["files"]["seeded.safetensors"][name][method]
    ours = analyze_matrix(weight, method=method, check_traps=False).metrics()
    _check(ours, expected, method)


@pytest.mark.parametrize("method", METHODS)
def test_real_checkpoint_layers_match_weightwatcher(method: str) -> None:
    expected = REFERENCE["files"]["llama_layer.safetensors"]
    seen = 0
    for matrix in iter_layers(DATA / "llama_layer.safetensors"):
        assert matrix.stored_dtype == "bfloat16"  # read without torch
        result = analyze_matrix(
            matrix.weight, stored_dtype=matrix.stored_dtype, method=method, check_traps=False
        ).metrics()
        _check(result, expected[matrix.name + ".weight"][method], method)
        seen += 1
    assert seen == len(expected) == 7


def test_the_references_exercise_both_fixes() -> None:
    # Worth testing only if the fixes changed something: fingers clipped, xmin moved.
    rows = [fits for layers in REFERENCE["files"].values() for fits in layers.values()]
    assert sum(f["clip_xmax"]["num_fingers"] > 0 for f in rows) >= 5
    assert sum(abs(f["xmin_peak"]["alpha"] - f["ww"]["alpha"]) > 0.1 for f in rows) >= 10
    assert REFERENCE["versions"]["weightwatcher"] == "0.7.7"


def _pareto_with_fingers(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tail = (1 - rng.random(600)) ** (-1 / 2.5)  # α = 3.5
    return np.concatenate([tail, tail.max() * np.array([40.0, 60.0, 90.0])])


def _gaussian_spectrum() -> np.ndarray:
    """A Marchenko–Pastur bulk: its top edge, fitted alone, gives a short tail and a large α."""
    weight = load_file(str(DATA / "seeded.safetensors"))["gaussian_0"].double()
    return np.asarray(torch.linalg.svdvals(weight).numpy() ** 2)


def test_clip_xmax_removes_the_top_of_a_short_spurious_tail() -> None:
    data = _gaussian_spectrum()
    plain = fit_power_law(data, "ww")
    clipped = fit_clip_xmax(data)
    assert plain is not None and clipped is not None
    assert clipped.num_fingers >= 1
    assert clipped.alpha < plain.alpha - 1.0
    assert clipped.xmax < data.max()  # the clipped values are not in the fitted tail
    assert clipped.n == int(np.count_nonzero(data >= clipped.xmin))
    assert clipped.sigma == pytest.approx(
        (clipped.alpha - 1)
        / np.sqrt(np.count_nonzero((data >= clipped.xmin) & (data <= clipped.xmax)))
    )


def test_clip_xmax_leaves_a_clean_tail_alone() -> None:
    rng = np.random.default_rng(5)
    data = (1 - rng.random(800)) ** (-1 / 2.0)
    clipped, plain = fit_clip_xmax(data), fit_power_law(data, "ww")
    assert clipped is not None and plain is not None
    assert clipped.num_fingers == 0 and clipped.alpha == plain.alpha


def test_xmin_peak_chooses_xmin_near_the_peak() -> None:
    data = _pareto_with_fingers()
    fit = fit_xmin_peak(data)
    assert fit is not None
    assert fit.xmin <= 1.5 * peak_of(data)


def test_no_fit_without_data() -> None:
    for fitter in (fit_xmin_peak, fit_clip_xmax):
        assert fitter(np.array([1.0])) is None
        assert fitter(np.zeros(10)) is None


def test_bootstrap_widens_alpha_delta() -> None:
    data = _pareto_with_fingers()
    bare = fit_xmin_peak(data)
    boot = fit_xmin_peak(data, bootstrap_samples=64, seed=1)
    assert bare is not None and boot is not None
    assert boot.alpha == bare.alpha and boot.alpha_delta >= bare.alpha_delta > 0
