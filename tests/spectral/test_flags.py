"""Flags and statuses, each in both directions; nothing raises on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alphawatch.workers.spectral import (
    FitStatus,
    Thresholds,
    analyze_many,
    analyze_matrix,
    resolve_device,
)


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / np.sqrt(cols)


def test_iid_gaussian_has_no_trap_and_looks_random() -> None:
    result = analyze_matrix(gaussian(400, 200))
    assert result.shuffle_traps == 0 and not result.correlation_trap
    assert not result.mean_spike
    assert result.near_random


def test_planted_large_entries_are_traps() -> None:
    w = gaussian(400, 200)
    w[3, 7] = 40.0
    w[100, 50] = -35.0
    result = analyze_matrix(w)
    assert result.correlation_trap and result.shuffle_traps >= 2
    assert not result.trusted


def test_constant_mean_shift_is_a_mean_spike_not_a_trap() -> None:
    result = analyze_matrix(gaussian(400, 200) + 0.5)
    assert result.mean_spike
    assert result.shuffle_traps == 0 and not result.correlation_trap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_collapse_in_both_directions(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    low = (torch.randn(1000, 50, generator=g) @ torch.randn(50, 500, generator=g)).to(dtype)
    full = torch.randn(1000, 500, generator=g).to(dtype)
    collapsed = analyze_matrix(low.float(), stored_dtype=dtype, check_traps=False)
    healthy = analyze_matrix(full.float(), stored_dtype=dtype, check_traps=False)
    assert collapsed.rank_collapse and collapsed.matrix_rank == 50
    assert collapsed.rank_loss == 450 and not collapsed.trusted
    assert not healthy.rank_collapse and healthy.matrix_rank == 500


def test_float64_weights_get_the_rank_the_engine_resolves() -> None:
    """A rank-50 float64 matrix has rank 50, analysed in float64 (the Python API) or as the
    float32 a checkpoint reader makes of it: σ from the float64 Gram matrix is resolved to
    ~2e-8·σmax, so no tolerance is finer than float32's eps (float64's gave rank ~60+)."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(1000, 50, generator=g, dtype=torch.float64) @ torch.randn(
        50, 500, generator=g, dtype=torch.float64
    )
    full = torch.randn(1000, 500, generator=g, dtype=torch.float64)
    for weights in (low, low.float()):
        collapsed = analyze_matrix(weights, stored_dtype=torch.float64, check_traps=False)
        assert collapsed.matrix_rank == 50 and collapsed.rank_collapse
    healthy = analyze_matrix(full, stored_dtype=torch.float64, check_traps=False)
    assert healthy.matrix_rank == 500 and not healthy.rank_collapse


def test_non_finite_degenerate_and_tiny_inputs() -> None:
    w = gaussian(50, 40)
    w[1, 1] = float("nan")
    assert analyze_matrix(w).fit_status is FitStatus.NON_FINITE
    w[1, 1] = float("inf")
    assert analyze_matrix(w).fit_status is FitStatus.NON_FINITE
    assert analyze_matrix(torch.zeros(50, 40)).fit_status is FitStatus.DEGENERATE
    assert analyze_matrix(torch.full((50, 40), 3.0)).fit_status is FitStatus.DEGENERATE
    assert analyze_matrix(torch.randn(1, 300)).fit_status is FitStatus.TOO_FEW_EVALS
    assert analyze_matrix(torch.randn(3, 3)).fit_status is FitStatus.TOO_FEW_EVALS
    assert analyze_matrix(torch.randn(10)).fit_status is FitStatus.TOO_FEW_EVALS
    failed = analyze_matrix(torch.randn(4, 5, 6))
    assert failed.fit_status is FitStatus.FAILED and "reshape" in (failed.error or "")
    assert not failed.trusted
    # a complex matrix is refused, not analysed as its real part (numpy's and torch's)
    for complex_ in (
        torch.randn(50, 40, dtype=torch.complex64),
        np.asarray(torch.randn(50, 40, dtype=torch.complex128)),
    ):
        failed = analyze_matrix(complex_)
        assert failed.fit_status is FitStatus.FAILED and "complex" in (failed.error or "")
        assert failed.alpha is None and not failed.trusted


@pytest.mark.parametrize(("scale", "side"), [(1e200, "overflow"), (1e-200, "underflow")])
def test_float64_weights_whose_squares_leave_float64_say_so(scale: float, side: str) -> None:
    """λ = σ² of weights of 1e200 or 1e-200 has no float64 value: a clear error, not "NaN or
    Inf" weights or a division by zero; a float32-range scale of the same matrix is analysed."""
    w = gaussian(60, 40).double().numpy()
    result = analyze_matrix(w * scale)
    assert result.fit_status is FitStatus.FAILED and not result.trusted
    assert f"squares {side} float64" in (result.error or "")


def test_float64_weights_beyond_float32_are_analysed_in_float64() -> None:
    """Finite float64 weights of 1e100 (λ ~ 1e200): the same alpha and trap verdict as at
    scale 1, the shuffle gathered from the float64 values rather than their float32 inf."""
    w = gaussian(120, 80).double().numpy()
    w[3, 5] = 40.0  # a planted trap
    reference, scaled = analyze_matrix(w), analyze_matrix(w * 1e100)
    assert scaled.error is None and scaled.fit_status is reference.fit_status
    assert scaled.alpha == pytest.approx(reference.alpha, rel=1e-9)
    assert reference.shuffle_traps and scaled.shuffle_traps == reference.shuffle_traps
    assert scaled.shuffle_distance == pytest.approx(reference.shuffle_distance, abs=1e-3)
    assert scaled.lambda_max == pytest.approx(reference.lambda_max * 1e200, rel=1e-9)


def test_invariances_transpose_permutation_scaling() -> None:
    w = gaussian(300, 120, seed=3) + 0.3 * torch.distributions.StudentT(3.0).sample((300, 120)) / 11
    base = analyze_matrix(w, check_traps=False)
    g = torch.Generator().manual_seed(9)
    variants = [
        w.T,
        w[torch.randperm(300, generator=g)],
        w[:, torch.randperm(120, generator=g)],
        7.5 * w,
    ]
    for variant in variants:
        other = analyze_matrix(variant.contiguous(), check_traps=False)
        assert other.alpha == pytest.approx(base.alpha, rel=1e-6)
        assert other.num_pl_spikes == base.num_pl_spikes


def test_status_thresholds_come_from_the_settings_object() -> None:
    w = gaussian(300, 120, seed=4)
    strict = analyze_matrix(w, thresholds=Thresholds(min_tail=10_000), check_traps=False)
    assert strict.fit_status is FitStatus.TAIL_TOO_SHORT
    assert strict.alpha is not None  # reported whatever the status


def test_metrics_are_plain_values() -> None:
    metrics = analyze_matrix(gaussian(100, 80)).metrics()
    assert metrics["fit_status"] in {s.value for s in FitStatus}
    assert "evals" not in metrics
    assert metrics["alpha_weighted"] == pytest.approx(
        metrics["alpha"] * np.log10(metrics["lambda_max"])
    )


def test_analyze_many_gives_a_result_per_item_even_on_failure() -> None:
    items = [
        ("a", gaussian(100, 80), torch.float32),
        ("bad", torch.randn(2, 3, 4), None),
        ("b", gaussian(200, 90), torch.bfloat16),
    ]
    results = dict(analyze_many(items, check_traps=False))
    assert set(results) == {"a", "bad", "b"}
    assert results["bad"].fit_status is FitStatus.FAILED


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    w = gaussian(1024, 512) + 0.3 * torch.distributions.StudentT(3.0).sample((1024, 512)) / 22
    cpu = analyze_matrix(w, device="cpu")
    gpu = analyze_matrix(w, device="cuda")
    assert gpu.alpha == pytest.approx(cpu.alpha, rel=1e-4)
    assert gpu.num_pl_spikes == cpu.num_pl_spikes
    assert pytest.approx(cpu.D, abs=1e-4) == gpu.D
