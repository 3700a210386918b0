"""The engine's shortcuts give what the plain computation gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alphawatch.workers.spectral.analysis import _permutations, gram_lower
from alphawatch.workers.spectral.plfit import _all_alphas, _all_ks, _best_ks, tail_floor


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


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "spikes", "lowrank"])
def test_pruned_ks_search_picks_the_full_search_xmin(kind: str, two_sided: bool) -> None:
    for seed, m in enumerate((256, 300, 512, 700)):
        logs = np.log(tail_floor(spectrum(kind, m, seed), "ww"))
        alphas, n = _all_alphas(logs)
        ds = _all_ks(logs, alphas, n, two_sided=two_sided, device=torch.device("cpu"))
        i, d = _best_ks(logs, alphas, n, two_sided=two_sided, device=torch.device("cpu"))
        assert i == int(np.argmin(ds))
        assert d == pytest.approx(float(ds[i]), rel=1e-12, abs=1e-15)


def test_ties_go_to_the_first_candidate_as_in_argmin() -> None:
    # equally spaced logs: several candidates share the same distance
    logs = np.log(np.geomspace(1.0, 1e3, 400))
    alphas, n = _all_alphas(logs)
    ds = _all_ks(logs, alphas, n, two_sided=False, device=torch.device("cpu"))
    i, _ = _best_ks(logs, alphas, n, two_sided=False, device=torch.device("cpu"))
    assert i == int(np.argmin(ds))


@pytest.mark.parametrize("shape", [(700, 600), (600, 700), (1030, 513), (300, 200)])
def test_gram_lower_is_the_gram_matrix_lower_triangle(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, dtype=torch.float64)
    a = w if shape[0] >= shape[1] else w.T
    full = a.T @ a
    lower = gram_lower(w)
    # the same dot products; BLAS may block them differently (rounding only)
    torch.testing.assert_close(torch.tril(lower), torch.tril(full), rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(torch.linalg.eigvalsh(lower, UPLO="L").numpy(),
                               torch.linalg.eigvalsh(full).numpy(), rtol=0, atol=1e-10)


def test_kept_permutations_are_the_seeded_draws() -> None:
    gen = torch.Generator().manual_seed(5)
    fresh = [torch.randperm(1234, generator=gen) for _ in range(3)]
    kept = _permutations(5, 1234, 3)
    again = _permutations(5, 1234, 3)
    assert again is kept
    for a, b in zip(kept, fresh, strict=True):
        assert torch.equal(a.long(), b)


@pytest.mark.parametrize("kind", ["gauss", "heavy", "spikes", "lowrank"])
def test_finger_fits_pruned_search_picks_the_full_search_xmin(kind: str) -> None:
    from alphawatch.workers.spectral.fingers import _best, _tail_alphas, _tail_ks, _unique_starts

    for seed, m in enumerate((256, 300, 512, 700)):
        data = tail_floor(spectrum(kind, m, seed), "ww")
        for starts in (_unique_starts(data, float(data[0]), float(data[-1])),
                       _unique_starts(data, float(data[m // 4]), float(data[3 * m // 4]))):
            found = _best(data, starts)
            alphas = _tail_alphas(np.log(data))[0][starts]
            valid = np.isfinite(alphas) & (alphas > 1.0)
            ds = np.full(starts.size, np.inf)
            ds[valid] = _tail_ks(np.log(data), starts[valid], alphas[valid])
            i = int(np.argmin(ds))
            assert found is not None and found[0] == int(starts[i])
            assert found[2] == pytest.approx(float(ds[i]), rel=1e-12, abs=1e-15)
