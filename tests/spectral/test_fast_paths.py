"""The engine's shortcuts give what the plain computation gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from alphawatch.workers.spectral import analyze_matrix
from alphawatch.workers.spectral.device import HOST
from alphawatch.workers.spectral.eigenvalues import gram, singular_values
from alphawatch.workers.spectral.ks import _all_ks, _best_ks, tail_alphas, tail_floor
from alphawatch.workers.spectral.traps import _permutations, random_permutation


def spectrum(kind: str, m: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2 * m, m, generator=g, dtype=torch.float64) / np.sqrt(m)
    if kind == "heavy":
        torch.manual_seed(seed)
        w = w + 0.5 * torch.distributions.StudentT(torch.tensor(2.5)).sample(w.shape).double()
    elif kind == "spikes":
        u, v = torch.randn(2 * m, 3, generator=g), torch.randn(3, m, generator=g)
        w = w + ((u * torch.tensor([8.0, 5.0, 3.0])) @ v / np.sqrt(2 * m * m)).double()
    elif kind == "lowrank":
        w = (torch.randn(2 * m, 8, generator=g) @ torch.randn(8, m, generator=g)).double()
        w = w + 0.01 * torch.randn(2 * m, m, generator=g, dtype=torch.float64)
    return torch.linalg.eigvalsh(w.T @ w).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "spikes", "lowrank"])
def test_pruned_ks_search_picks_the_full_search_xmin(kind: str, two_sided: bool) -> None:
    for seed, m in enumerate((256, 300, 512, 700)):
        logs = np.log(tail_floor(spectrum(kind, m, seed), "ww"))
        alphas, n = tail_alphas(logs)
        ds = _all_ks(logs, alphas, n, two_sided=two_sided, device=torch.device("cpu"))
        i, d = _best_ks(logs, alphas, n, two_sided=two_sided, device=torch.device("cpu"))
        assert i == int(np.argmin(ds))
        assert d == pytest.approx(float(ds[i]), rel=1e-12, abs=1e-15)


def test_ties_go_to_the_first_candidate_as_in_argmin() -> None:
    # equally spaced logs: several candidates share the same distance
    logs = np.log(np.geomspace(1.0, 1e3, 400))
    alphas, n = tail_alphas(logs)
    ds = _all_ks(logs, alphas, n, two_sided=False, device=torch.device("cpu"))
    i, _ = _best_ks(logs, alphas, n, two_sided=False, device=torch.device("cpu"))
    assert i == int(np.argmin(ds))


@pytest.mark.parametrize("shape", [(700, 600), (600, 700), (1030, 513), (300, 200)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_is_the_gram_matrix_of_the_smaller_side(
    shape: tuple[int, int], dtype: type[np.floating]
) -> None:
    w = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    a = w if shape[0] >= shape[1] else w.T
    full = np.einsum("ki,kj->ij", a.astype(np.float64), a.astype(np.float64))
    g = gram(w)
    assert g.shape == (min(shape), min(shape)) and g.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(g, full, rtol=tol, atol=tol * np.abs(full).max())


@pytest.mark.slow
def test_cpu_eigenvalues_match_torch_float64() -> None:
    """numpy's Gram + syevd against torch's float64 eigvalsh: ~eps64·λmax absolute."""
    w = torch.from_numpy(np.random.default_rng(4).standard_normal((900, 400)))
    exact = torch.linalg.eigvalsh(w.T @ w).flip(0).clamp_min(0).sqrt().numpy()
    for matrix in (w, w.numpy(), w.float(), w.T.contiguous().numpy()):
        ours = singular_values(matrix, HOST)
        assert np.all(np.diff(ours) <= 0)
        tol = 1e-12 if matrix.dtype in (torch.float64, np.float64) else 1e-6
        np.testing.assert_allclose(ours**2, exact**2, rtol=0, atol=tol * exact[0] ** 2)


def test_kept_permutations_are_the_seeded_draws() -> None:
    rng = np.random.Generator(np.random.PCG64(5))
    fresh = [random_permutation(rng, 1234) for _ in range(3)]
    kept = _permutations(5, 1234, 3)
    again = _permutations(5, 1234, 3)
    assert again is kept
    for perm, draw in zip(kept, fresh, strict=True):
        assert perm.dtype == np.int32
        np.testing.assert_array_equal(perm, draw)
    assert not np.array_equal(kept[0], kept[1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gauss", "heavy", "spikes", "lowrank"])
def test_finger_fits_pruned_search_picks_the_full_search_xmin(kind: str) -> None:
    from alphawatch.workers.spectral.fingers import _best, _tail_ks, _unique_starts

    for seed, m in enumerate((256, 300, 512, 700)):
        data = tail_floor(spectrum(kind, m, seed), "ww")
        for starts in (
            _unique_starts(data, float(data[0]), float(data[-1])),
            _unique_starts(data, float(data[m // 4]), float(data[3 * m // 4])),
        ):
            found = _best(data, starts)
            alphas = tail_alphas(np.log(data))[0][starts]
            valid = np.isfinite(alphas) & (alphas > 1.0)
            ds = np.full(starts.size, np.inf)
            ds[valid] = _tail_ks(np.log(data), starts[valid], alphas[valid])
            i = int(np.argmin(ds))
            assert found is not None and found[0] == int(starts[i])
            assert found[2] == pytest.approx(float(ds[i]), rel=1e-12, abs=1e-15)


def test_threads_asking_at_once_share_one_draw() -> None:
    with ThreadPoolExecutor(4) as pool:
        drawn = list(pool.map(lambda _: _permutations(11, 300_007, 1), range(8)))
    assert all(d is drawn[0] for d in drawn)


@pytest.mark.parametrize("numel", [0, 1, 255, 256, 1000, 70_000])
def test_random_permutation_is_a_permutation(numel: int) -> None:
    perm = random_permutation(np.random.default_rng(numel), numel)
    np.testing.assert_array_equal(np.sort(perm), np.arange(numel))


@pytest.mark.parametrize("numel", [0, 1, 2, 1000, 4096 * 3 + 17])
def test_random_permutation_draws_the_plain_two_stage_shuffle(
    monkeypatch: pytest.MonkeyPatch, numel: int
) -> None:
    """Placed a chunk at a time, the same permutation as one sort of all the keys."""
    from alphawatch.workers.spectral import traps

    monkeypatch.setattr(traps, "PLACE_CHUNK", 4096)  # several chunks and a short last one

    def plain(rng: np.random.Generator) -> np.ndarray:
        keys = rng.integers(0, traps.SHUFFLE_BUCKETS, numel, dtype=np.uint8)
        order = np.argsort(keys, kind="stable")
        start = 0
        for end in np.cumsum(np.bincount(keys, minlength=traps.SHUFFLE_BUCKETS)).tolist():
            rng.shuffle(order[start:end])
            start = end
        return order

    ours = random_permutation(np.random.Generator(np.random.PCG64(numel)), numel)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, plain(np.random.Generator(np.random.PCG64(numel))))


@pytest.mark.slow
def test_random_permutation_is_uniform() -> None:
    """Each of the 24 orders of 4 entries about equally often (binomial sd ≈ 4.5 %)."""
    draws = 12_000
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(draws):
        order = tuple(random_permutation(np.random.Generator(np.random.PCG64(seed)), 4))
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 24
    expected = draws / 24
    assert all(abs(c - expected) < 0.2 * expected for c in counts.values()), counts
    # and on a larger array, every entry equally likely at each position
    first = [int(random_permutation(np.random.default_rng(s), 600)[0]) for s in range(3000)]
    histogram = np.bincount(np.asarray(first) // 100, minlength=6)
    assert np.all(np.abs(histogram - 500) < 100), histogram


def test_numpy_arrays_and_torch_tensors_give_the_same_result() -> None:
    """A read-only float32 array (as decoded from a file), its tensor, a bfloat16 tensor."""
    w = torch.randn(400, 160, generator=torch.Generator().manual_seed(9))
    frozen = w.numpy().copy()
    frozen.flags.writeable = False
    from_array = analyze_matrix(frozen, stored_dtype="float32").metrics()
    from_tensor = analyze_matrix(w, stored_dtype=torch.float32).metrics()
    from_array.pop("elapsed_ms")
    from_tensor.pop("elapsed_ms")
    assert from_array == from_tensor
    assert from_array["shuffle_traps"] is not None
    bf16 = analyze_matrix(w.bfloat16(), stored_dtype=torch.bfloat16)
    named = analyze_matrix(w.bfloat16().float().numpy(), stored_dtype="bfloat16")
    assert bf16.alpha == named.alpha and bf16.matrix_rank == named.matrix_rank


@pytest.mark.parametrize("case", ["gauss", "offset", "conv", "float64", "tiny-spread"])
def test_variance_from_the_spectrum_is_the_two_pass_variance(case: str) -> None:
    from alphawatch.workers.spectral.device import HOST, as_matrices
    from alphawatch.workers.spectral.eigenvalues import spectrum_of
    from alphawatch.workers.spectral.moments import moments_of, with_variance

    rng = np.random.default_rng(8)
    w = {
        "gauss": rng.standard_normal((300, 200)).astype(np.float32),
        # the mean is most of Σw²: computed in two passes instead
        "offset": (3.0 + 1e-4 * rng.standard_normal((300, 200))).astype(np.float32),
        "conv": rng.standard_t(3, (32, 16, 3, 3)).astype(np.float32),
        "float64": rng.standard_normal((250, 250)),
        "tiny-spread": (1e-20 * rng.standard_normal((120, 90))).astype(np.float32),
    }[case]
    moments = moments_of(w, HOST)
    assert moments.finite and not moments.constant
    assert moments.mean == pytest.approx(float(w.mean(dtype=np.float64)), rel=1e-12, abs=1e-30)
    variance = with_variance(moments, spectrum_of(as_matrices(w), HOST), w).variance
    assert variance == pytest.approx(float(w.var(dtype=np.float64, ddof=1)), rel=1e-11)


@pytest.mark.parametrize("bad", [[np.nan], [np.inf], [-np.inf], [np.inf, -np.inf]])
def test_one_non_finite_entry_is_found(bad: list[float]) -> None:
    from alphawatch.workers.spectral.device import HOST
    from alphawatch.workers.spectral.moments import moments_of

    for dtype in (np.float32, np.float64):
        w = np.random.default_rng(9).standard_normal((64, 48)).astype(dtype)
        w.reshape(-1)[[1000 + 37 * i for i in range(len(bad))]] = bad
        assert not moments_of(w, HOST).finite
    # finite float64 entries whose sum overflows are still finite
    huge = np.full((40, 30), 1e307)
    huge[0, 0] = 1.5e308
    assert moments_of(huge, HOST).finite


def test_shuffle_distance_pools_what_lies_below_the_floor() -> None:
    from alphawatch.workers.spectral.traps import _jensen_shannon

    x = np.random.default_rng(10).standard_normal((600, 600))
    evals = np.linalg.eigvalsh(x.T @ x)  # square: eigenvalues down to ~1e-7·λmax
    noisy = evals.copy()
    noisy[:4] = [1e-15 * evals[-1], 0.0, 3e-9 * evals[-1], 1e-12 * evals[-1]]
    assert _jensen_shannon(evals, evals) == 0.0
    # four values of 600 moved below the floor: a small distance, not a new range of bins
    assert _jensen_shannon(evals, noisy) < 0.05
    # and it still tells spectra apart
    assert _jensen_shannon(evals, evals * 3.0) > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(900, 700), (700, 700), (400, 1100)])
def test_the_float32_shuffle_moves_no_flag_and_shuffle_distance_by_little(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int]
) -> None:
    from threadpoolctl import threadpool_limits

    from alphawatch.workers.spectral import lapack

    rng = np.random.default_rng(11)
    rows, cols = shape
    w = (rng.standard_normal(shape) + 0.5 * rng.standard_t(3, shape)) / np.sqrt(cols)
    w[:, :4] += 0.2 * rng.standard_normal((rows, 1))  # a few correlated columns: traps
    w = w.astype(np.float32)
    runs = {}
    for threads in (1, 2):
        with threadpool_limits(threads):
            runs[threads] = analyze_matrix(w)
    exact = lapack.eigvalsh
    monkeypatch.setattr(
        lapack, "eigvalsh", lambda a, overwrite=False, single=False: exact(a, overwrite=overwrite)
    )
    reference = analyze_matrix(w)  # the shuffle's eigenvalues in float64
    assert reference.shuffle_traps is not None and reference.shuffle_distance is not None
    for ours in runs.values():
        assert ours.alpha == pytest.approx(reference.alpha, rel=1e-12)  # W: float64 either way
        assert (
            ours.shuffle_traps == reference.shuffle_traps
            and ours.near_random == reference.near_random
        )
        assert ours.trusted == reference.trusted and ours.fit_status == reference.fit_status
        assert ours.shuffle_distance == pytest.approx(reference.shuffle_distance, abs=1e-3)
        assert ours.max_rand_eval == pytest.approx(reference.max_rand_eval, rel=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the stored float32 ESD
@pytest.mark.parametrize("scale", [1e18, 1e-25, 1e-30])
def test_weights_whose_squares_leave_float32_still_get_their_traps(scale: float) -> None:
    """Finite weights of 1e18 overflow the shuffle's float32 Gram matrix, of 1e-25 underflow
    it: that shuffle is computed in float64, and the trap check is scale-free."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((300, 200)) + 0.5 * rng.standard_t(3, (300, 200))
    w[:, :3] += 0.3 * rng.standard_normal((300, 1))
    reference = analyze_matrix(w.astype(np.float32))
    scaled = analyze_matrix((w * scale).astype(np.float32))
    assert scaled.error is None and scaled.shuffle_traps == reference.shuffle_traps
    assert reference.shuffle_traps is not None and reference.shuffle_distance is not None
    assert scaled.shuffle_distance == pytest.approx(reference.shuffle_distance, abs=1e-3)
    assert scaled.near_random == reference.near_random
    assert scaled.max_rand_eval == pytest.approx(reference.max_rand_eval * scale**2, rel=1e-4)
