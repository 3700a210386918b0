"""The direct LAPACK binding gives numpy's eigenvalues, faster, and fails as numpy does."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from alphawatch.workers.spectral import lapack


def gram_of(rows: int, cols: int, seed: int, dtype: type[np.floating] = np.float64) -> np.ndarray:
    x = np.random.default_rng(seed).standard_t(3, (rows, cols)).astype(np.float32)
    return (x.T @ x).astype(dtype)


def test_the_binding_is_found_where_numpy_bundles_openblas() -> None:
    if not any(info.get("internal_api") == "openblas" for info in threadpool_info()):
        pytest.skip("numpy is not linked to OpenBLAS here")
    assert lapack.available()


@pytest.mark.parametrize("two_stage_from", [10_000, 0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_eigenvalues_are_numpys(
    monkeypatch: pytest.MonkeyPatch, dtype: type[np.floating], two_stage_from: int
) -> None:
    monkeypatch.setattr(lapack, "TWO_STAGE_FROM", two_stage_from)
    for rows, cols, seed in ((500, 300, 0), (300, 300, 1), (90, 7, 2), (3, 2, 3)):
        g = gram_of(rows, cols, seed, dtype)
        ours = lapack.eigvalsh(g)
        reference = np.linalg.eigvalsh(g.astype(np.float64))
        assert ours.dtype == np.float64 and np.all(np.diff(ours) >= 0)
        # both backward stable: they agree to a small multiple of eps64·λmax
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-13 * reference[-1])


def test_the_input_is_kept_unless_it_may_be_overwritten() -> None:
    g = gram_of(200, 150, 3)
    kept = g.copy()
    values = lapack.eigvalsh(g)
    assert np.array_equal(g, kept)
    assert np.array_equal(lapack.eigvalsh(g, overwrite=True), values)
    if lapack.available():
        assert not np.array_equal(g, kept)  # reduced in place: no copy


def test_the_thread_count_moves_only_the_last_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lapack, "TWO_STAGE_FROM", 0)
    g = gram_of(900, 700, 4)
    with threadpool_limits(1):
        one = lapack.eigvalsh(g)
    with threadpool_limits(2):
        two = lapack.eigvalsh(g)
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-14 * one[-1])


@pytest.mark.parametrize("two_stage_from", [10_000, 0])
def test_single_precision_is_float32s_error_and_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, two_stage_from: int
) -> None:
    monkeypatch.setattr(lapack, "TWO_STAGE_FROM", two_stage_from)
    g = gram_of(600, 400, 8, np.float32)
    reference = np.linalg.eigvalsh(g.astype(np.float64))
    single = lapack.eigvalsh(g, single=True)
    assert single.dtype == np.float64 and np.all(np.diff(single) >= 0)
    error = np.abs(single - reference).max() / reference[-1]
    assert error < 1e-5  # float32's backward error, a small multiple of eps32·λmax
    # the top of the spectrum, which the trap check reads, to float32's relative precision
    np.testing.assert_allclose(single[-20:], reference[-20:], rtol=1e-5)
    if lapack.available():
        assert error > 1e-12  # really decomposed in float32
        # a float64 matrix, or float32 without single=True, is decomposed in float64
        for exact in (lapack.eigvalsh(g), lapack.eigvalsh(g.astype(np.float64), single=True)):
            np.testing.assert_allclose(exact, reference, rtol=0, atol=1e-13 * reference[-1])
        kept = g.copy()
        assert np.array_equal(lapack.eigvalsh(g, single=True), single) and np.array_equal(g, kept)
        lapack.eigvalsh(g, single=True, overwrite=True)
        assert not np.array_equal(g, kept)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_an_error(bad: float) -> None:
    if not lapack.available():
        pytest.skip("numpy's own eigvalsh is used here")
    g = gram_of(100, 80, 5)
    g[3, 7] = g[7, 3] = bad
    with pytest.raises(np.linalg.LinAlgError):
        lapack.eigvalsh(g)


def test_without_the_binding_it_is_numpys(monkeypatch: pytest.MonkeyPatch) -> None:
    g = gram_of(120, 60, 6)
    monkeypatch.setattr(lapack, "_binding", None)
    monkeypatch.setattr(lapack, "_searched", True)
    assert not lapack.available()
    np.testing.assert_array_equal(lapack.eigvalsh(g), np.linalg.eigvalsh(g))
    with pytest.raises(np.linalg.LinAlgError):
        lapack.eigvalsh(np.ones((3, 4)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 700, 1500])
def test_the_gram_matrix_summed_over_blocks_is_the_gram_matrix(
    monkeypatch: pytest.MonkeyPatch, rows: int, dtype: type[np.floating]
) -> None:
    if not lapack.available():
        pytest.skip("numpy's own eigvalsh is used here")
    monkeypatch.setattr(lapack, "BLOCK_ROWS", 256)  # several blocks and a short last one
    w = np.random.default_rng(7).standard_normal((rows, 90)).astype(np.float32)
    product = lapack.gram_upper(lambda i, j: w[i:j], rows, 90, dtype)
    assert product is not None and product.dtype == dtype
    exact = w.astype(np.float64).T @ w.astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(
        np.triu(product), np.triu(exact), rtol=tol, atol=tol * np.abs(exact).max()
    )
    np.testing.assert_allclose(
        lapack.eigvalsh(product),
        np.linalg.eigvalsh(exact),
        rtol=0,
        atol=tol * np.linalg.eigvalsh(exact)[-1],
    )
