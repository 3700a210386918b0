"""Matrices analysed in parallel: same results as one by one, in reading order, lazily read."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from alphawatch.workers.spectral import (
    FitStatus,
    analysis_workers,
    analyze_matrix,
    analyze_stream,
    stream,
)
from alphawatch.workers.spectral.device import HOST
from alphawatch.workers.spectral.eigenvalues import shuffled_eigenvalues, singular_values


def heavy(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(rows, cols, generator=g) / np.sqrt(cols)
    torch.manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(3.0)).sample((rows, cols))
    return gauss + 0.5 * t / np.sqrt(cols)


def items() -> list[tuple[str, torch.Tensor, torch.dtype | None]]:
    shapes = [(300, 120), (64, 256), (200, 200), (150, 90), (256, 128)]
    out: list[tuple[str, torch.Tensor, torch.dtype | None]] = [
        (f"m{i}", heavy(r, c, i), torch.float32) for i, (r, c) in enumerate(shapes)
    ]
    out.insert(2, ("bad", torch.randn(2, 3, 4), None))
    return out


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_results_equal_sequential_ones_in_reading_order(workers: int) -> None:
    expected = [(name, analyze_matrix(w, stored_dtype=d)) for name, w, d in items()]
    got = list(analyze_stream(items(), workers=workers))
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (_, ours), (_, ref) in zip(got, expected, strict=True):
        assert ours.fit_status == ref.fit_status
        if ref.fit_status is FitStatus.FAILED:
            continue
        # BLAS threads change the order of sums: equal up to rounding, flags identical
        assert ours.alpha == pytest.approx(ref.alpha, rel=1e-9)
        assert pytest.approx(ref.D, rel=1e-9) == ours.D
        assert ours.shuffle_distance == pytest.approx(ref.shuffle_distance, abs=1e-6)
        assert ours.num_pl_spikes == ref.num_pl_spikes and ours.shuffle_traps == ref.shuffle_traps
        assert ours.matrix_rank == ref.matrix_rank and ours.trusted == ref.trusted
        assert ours.near_random == ref.near_random
    assert dict(got)["bad"].fit_status is FitStatus.FAILED


def test_reads_lazily_and_holds_few_tensors() -> None:
    read: list[int] = []
    done: list[int] = []

    def reader() -> Iterator[tuple[int, torch.Tensor, torch.dtype | None]]:
        for i in range(8):
            read.append(i)
            # never more than workers + 1 read ahead of what was handed back
            assert len(read) - len(done) <= 3
            yield i, heavy(120, 60, i), None

    for i, result in analyze_stream(reader(), workers=2, check_traps=False):
        done.append(i)
        assert result.alpha is not None
    assert done == list(range(8))


def test_the_largest_matrices_are_not_read_beside_each_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # lm_head and embed_tokens side by side, as in a safetensors file: the second is read only
    # once the first is handed back (each holds its values and its shuffle's permutation)
    monkeypatch.setattr(stream, "ALONE_BYTES", 200 * 100 * 4)
    shapes = [(60, 40), (200, 100), (200, 100), (60, 40), (60, 40), (120, 100)]
    read: list[int] = []
    done: list[int] = []
    ahead: list[int] = []

    def reader() -> Iterator[tuple[int, np.ndarray, None]]:
        for i, shape in enumerate(shapes):
            read.append(i)
            ahead.append(len(read) - len(done))
            yield i, heavy(*shape, i).numpy(), None

    for i, _ in analyze_stream(reader(), workers=2):
        done.append(i)
    assert done == list(range(len(shapes)))
    # item 2 read only after 0 and 1 were handed back; item 3 after 2; the small ones and the
    # 120×100 (smaller than the largest seen) overlap as before
    assert ahead == [1, 2, 1, 1, 2, 3]


def test_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()
    list(analyze_stream(items()[:3], workers=2, check_traps=False))
    assert torch.get_num_threads() == before


def test_worker_count() -> None:
    assert analysis_workers(3) == 3
    assert 1 <= analysis_workers(0) <= 4


def test_shuffled_spectrum_in_float32_matches_float64_at_the_top() -> None:
    w = heavy(400, 160, 7)
    perm = np.random.default_rng(0).permutation(w.numel())
    exact = singular_values(w.reshape(-1)[perm].reshape(w.shape), HOST) ** 2
    fast = shuffled_eigenvalues(w, perm.astype(np.int32), HOST)
    exact = np.sort(exact)
    assert fast.shape == exact.shape and np.all(np.diff(fast) >= 0)
    # absolute error ~eps32·λmax: the top 20% are exact to 1e-5 relative
    top = exact.size // 5
    np.testing.assert_allclose(fast[-top:], exact[-top:], rtol=1e-5)
    assert np.max(np.abs(fast - exact)) < 1e-5 * exact[-1]


def test_an_error_of_the_shuffle_task_fails_that_matrix_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from alphawatch.workers.spectral import stream

    own = stream._shuffled_spectrum

    def broken(weight: torch.Tensor, seed: int, dev: object) -> np.ndarray:
        if tuple(weight.shape) == (150, 90):
            raise MemoryError("no room for the shuffle")
        return own(weight, seed, dev)  # type: ignore[arg-type]

    monkeypatch.setattr(stream, "_shuffled_spectrum", broken)
    got = dict(analyze_stream(items(), workers=2))
    assert got["m3"].fit_status is FitStatus.FAILED
    assert got["m3"].error == "MemoryError: no room for the shuffle"
    for name, weight, dtype in items():
        if name not in ("m3", "bad"):
            ref = analyze_matrix(weight, stored_dtype=dtype)
            assert (
                got[name].fit_status == ref.fit_status
                and got[name].shuffle_traps == ref.shuffle_traps
            )


def test_a_matrix_stopped_early_does_not_wait_for_its_shuffle() -> None:
    nan = heavy(100, 80, 1)
    nan[5, 7] = float("inf")
    constant = torch.full((100, 80), 0.5)
    got = dict(
        analyze_stream(
            [("inf", nan, None), ("constant", constant, None), ("ok", heavy(100, 80, 2), None)],
            workers=2,
        )
    )
    assert got["inf"].fit_status is FitStatus.NON_FINITE
    assert got["constant"].fit_status is FitStatus.DEGENERATE
    assert got["ok"].shuffle_distance is not None and got["ok"].error is None
