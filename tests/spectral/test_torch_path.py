"""The accelerator (CUDA) path of the engine, run on torch CPU tensors against the host path.

No GPU has been available to the project: forcing the accelerator path onto a torch CPU device
(``Device(kind="torch", torch_device="cpu")``) is how its code runs in CI. Only the TF32 switch
stays CUDA-only, and is checked by itself.

Tolerances, from the precision each path computes in:

- W's own spectrum is float64 on both paths (Gram matrix and eigvalsh; numpy's OpenBLAS/LAPACK
  against torch's), summed in another order: eigenvalues, alpha, D, xmin and every metric
  derived from them agree to 1e-9 relative (seen: ~1e-13), counts exactly.
- The alternative-distribution tests (``tpl_*``, ``pl_vs_*``) are Nelder–Mead searches that
  stop at ~1e-7 relative: a 1e-13 change of their input moves them by up to ~1e-6. To 1e-5.
- The shuffle is float32 on both paths, as in production: its top eigenvalue agrees to 1e-5
  relative and ``rand_distance`` to 1e-3 (the bound ``test_fast_paths`` sets on float32 noise);
  the trap count and the flags exactly.
- ``entropy`` of a rank-deficient W is not compared: its normalisation counts the null space's
  eigenvalues that rounding left positive (the others are clamped to 0), and no two LAPACKs
  round them alike (0.4645 against 0.4674 for the rank-8 matrix here).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from alphawatch.workers.spectral import LayerResult, analyze_matrix, analyze_stream
from alphawatch.workers.spectral.analysis import analyze_many
from alphawatch.workers.spectral.device import HOST, Device, exact_float32, resolve_device

torch = pytest.importorskip("torch")

TORCH_CPU = Device(kind="torch", torch_device="cpu")
RTOL = 1e-9
SHUFFLE_FIELDS = {"rand_distance": 1e-3, "shuffle_distance": 1e-3, "max_rand_eval": 1e-5}
SEARCHED_FIELDS = (
    "tpl_alpha",
    "tpl_lambda",
    "pl_vs_tpl_R",
    "pl_vs_tpl_p",
    "pl_vs_lognormal_R",
    "pl_vs_lognormal_p",
)
SEARCH_RTOL = 1e-5
R_ATOL = 1e-6
# counts, statuses and flags: equal, not close
EXACT_FIELDS = (
    "fit_status",
    "trusted",
    "error",
    "num_evals",
    "num_pl_spikes",
    "matrix_rank",
    "rank_loss",
    "num_spikes",
    "edge_spikes",
    "num_traps",
    "shuffle_traps",
    "num_fingers",
    "correlation_trap",
    "rank_collapse",
    "near_random",
    "mean_spike",
    "over_trained",
    "under_trained",
    "warning",
    "rows",
    "cols",
    "method",
)


def _low_rank(rng: np.random.Generator, rank: int = 8) -> np.ndarray:
    return (rng.standard_normal((300, rank)) @ rng.standard_normal((rank, 150))).astype(np.float32)


def _planted_trap(rng: np.random.Generator) -> np.ndarray:
    """A few huge entries: a shuffle carries them anywhere, and they stand out of the bulk."""
    w = rng.standard_normal((300, 150)).astype(np.float32)
    w[rng.integers(0, 300, 6), rng.integers(0, 150, 6)] = 40.0
    return w


def _power_law_spectrum(rng: np.random.Generator) -> np.ndarray:
    """Random singular vectors, σ² drawn from a Pareto law of α = 3: a fit to trust."""
    u, _ = np.linalg.qr(rng.standard_normal((300, 150)))
    v, _ = np.linalg.qr(rng.standard_normal((150, 150)))
    w: np.ndarray = ((u * np.sqrt(rng.pareto(2.0, 150) + 1.0)) @ v.T).astype(np.float32)
    return w


def _non_finite(rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((100, 80)).astype(np.float32)
    w[3, 7], w[50, 2] = np.nan, np.inf
    return w


MATRICES: dict[str, tuple[Callable[[np.random.Generator], object], object]] = {
    "gaussian": (lambda rng: rng.standard_normal((300, 150)).astype(np.float32), None),
    "student_t": (lambda rng: rng.standard_t(3, (300, 150)).astype(np.float32), None),
    "power_law_spectrum": (_power_law_spectrum, None),
    "low_rank_float32": (_low_rank, "float32"),
    "low_rank_bfloat16": (
        lambda rng: torch.from_numpy(_low_rank(rng)).to(torch.bfloat16),
        "bfloat16",
    ),
    "planted_trap": (_planted_trap, None),
    "conv2d": (lambda rng: rng.standard_normal((64, 32, 3, 3)).astype(np.float32), None),
    "non_finite": (_non_finite, None),
    "constant": (lambda rng: np.full((100, 80), 0.5, dtype=np.float32), None),
}


def assert_same_result(host: LayerResult, accel: LayerResult) -> None:
    """Every stored field of the two results equal within the precision of its path."""
    ours, theirs = host.metrics(), accel.metrics()
    assert ours.keys() == theirs.keys()
    for field, value in ours.items():
        other = theirs[field]
        if field == "elapsed_ms" or (field == "entropy" and host.rank_loss):
            continue
        if field in EXACT_FIELDS or not isinstance(value, float):
            assert value == other, field
        elif math.isnan(value):
            assert isinstance(other, float) and math.isnan(other), field
        elif field in SHUFFLE_FIELDS:
            tol = SHUFFLE_FIELDS[field]
            assert other == pytest.approx(
                value, rel=tol, abs=tol if field.endswith("distance") else 0.0
            ), field
        elif field in SEARCHED_FIELDS:
            # A log-likelihood ratio R crosses zero as the evidence turns: near zero the 1e-5
            # agreement of the searched parameters it comes from is an absolute one (9.3e-8 on
            # an R of -0.0074 between the two paths, with OpenBLAS's SkylakeX kernels).
            tiny = R_ATOL if field.endswith("_R") else 1e-300
            assert other == pytest.approx(value, rel=SEARCH_RTOL, abs=tiny), field
        else:
            assert other == pytest.approx(value, rel=RTOL, abs=1e-300), field
    for a, b in ((host.evals, accel.evals), (host.rand_evals, accel.rand_evals)):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert np.allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(a)))


@pytest.mark.parametrize("name", list(MATRICES))
def test_the_accelerator_path_on_cpu_tensors_equals_the_host_path(name: str) -> None:
    build, stored_dtype = MATRICES[name]
    weight = build(np.random.default_rng(sorted(MATRICES).index(name)))
    host = analyze_matrix(weight, stored_dtype=stored_dtype)  # type: ignore[arg-type]
    accel = analyze_matrix(
        weight,
        stored_dtype=stored_dtype,  # type: ignore[arg-type]
        device=TORCH_CPU,
    )
    assert_same_result(host, accel)


def test_the_cases_cover_what_they_are_named_for() -> None:
    """Each matrix takes the branch it stands for, so equality above is not vacuous."""

    def on_host(name: str) -> LayerResult:
        build, stored_dtype = MATRICES[name]
        weight = build(np.random.default_rng(sorted(MATRICES).index(name)))
        return analyze_matrix(weight, stored_dtype=stored_dtype)  # type: ignore[arg-type]

    assert on_host("student_t").num_pl_spikes
    assert on_host("power_law_spectrum").trusted
    assert on_host("planted_trap").correlation_trap
    for name in ("low_rank_float32", "low_rank_bfloat16"):
        low = on_host(name)
        assert low.matrix_rank == 8 and low.rank_collapse
    assert on_host("conv2d").num_evals == 32 * 9
    assert on_host("non_finite").fit_status.value == "non_finite"
    assert on_host("constant").fit_status.value == "degenerate"


def test_many_and_stream_take_the_accelerator_path_on_cpu_tensors() -> None:
    rng = np.random.default_rng(20)
    items = [
        (f"m{i}", rng.standard_t(4, (120 + 10 * i, 90)).astype(np.float32), None) for i in range(3)
    ]
    host = dict(analyze_many(items))
    for got in (
        dict(analyze_many(items, device=TORCH_CPU)),
        dict(analyze_stream(items, workers=2, device=TORCH_CPU)),
    ):
        assert got.keys() == host.keys()
        for name, result in host.items():
            assert_same_result(result, got[name])


def test_the_device_flag_picks_the_path_and_names_the_hardware() -> None:
    assert resolve_device("cpu") is HOST and not HOST.accelerated
    assert resolve_device(TORCH_CPU) is TORCH_CPU and TORCH_CPU.accelerated
    assert (TORCH_CPU.type, str(TORCH_CPU)) == ("cpu", "cpu")
    assert resolve_device(torch.device("cpu")) is HOST
    cuda = Device(kind="torch", torch_device="cuda:1")
    assert (cuda.type, str(cuda)) == ("cuda", "cuda:1")
    with pytest.raises(ValueError, match="torch_device must be 'cpu'"):
        Device(kind="host", torch_device="cuda")


def test_tf32_is_switched_off_on_cuda_only() -> None:
    """The one CUDA-only switch: off inside on a CUDA device, restored after, untouched on a
    CPU (the flag is readable and settable without a GPU)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        with exact_float32(TORCH_CPU):
            assert matmul.allow_tf32
        with exact_float32(Device(kind="torch", torch_device="cuda")):
            assert not matmul.allow_tf32
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = previous
