"""Cost of the distribution tests and the finger-robust fits per layer, against powerlaw itself.

For tails of several lengths: alphawatch's two likelihood-ratio tests (truncated power law and
lognormal, workers/spectral/compare.py) against powerlaw 2.0.0's ``distribution_compare`` for
the same two tests on the same tail and xmin (the same numbers, see tests/spectral/
test_compare.py); and the xmin_peak / clip_xmax fits beside the plain ww fit on whole spectra.

    .venv/bin/python bench/bench_compare.py
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import scipy
import torch

from alphawatch.workers.spectral.compare import RANGES, compare_tail
from alphawatch.workers.spectral.plfit import fit_power_law

REPEATS = 3


def _best_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _spectrum(n: int, seed: int) -> np.ndarray:
    """Eigenvalues of an n×2n Student-t matrix: a bulk and a heavy tail, like trained layers."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_t(2.5, size=(2 * n, n)) / np.sqrt(n))
    return np.sort(torch.linalg.eigvalsh(w.T @ w).numpy())


def _powerlaw(data: np.ndarray, xmin: float) -> None:
    import powerlaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(data, xmin=xmin, parameter_ranges=RANGES, verbose=0)
        fit.distribution_compare("power_law", "truncated_power_law", normalized_ratio=True)
        fit.distribution_compare("power_law", "lognormal", normalized_ratio=True)


def main() -> None:
    import powerlaw

    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; python {platform.python_version()}, "
          f"numpy {np.__version__}, scipy {scipy.__version__}, powerlaw {powerlaw.__version__}")
    print("\n| tail n | alphawatch tests (ms) | powerlaw 2.0.0 (ms) | ratio |")
    print("|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n in (50, 200, 1000, 4000):
        tail = np.sort((1 - rng.random(n)) ** (-1 / 2.0))  # α = 3: above powerlaw's closed form
        ours = _best_of(lambda t=tail: compare_tail(t, 1.0))
        theirs = _best_of(lambda t=tail: _powerlaw(t, 1.0), repeats=1 if n > 1000 else REPEATS)
        print(f"| {n} | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {theirs / ours:.1f}x |")
    print("\n| evals | ww fit (ms) | xmin_peak (ms) | clip_xmax (ms) | tests on ww tail (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for n in (256, 1024, 4096):
        evals = _spectrum(n, n)
        fit = fit_power_law(evals, "ww")
        assert fit is not None
        cells = [_best_of(lambda m=m, e=evals: fit_power_law(e, m))
                 for m in ("ww", "xmin_peak", "clip_xmax")]
        tail = evals[evals >= fit.xmin]
        cells.append(_best_of(lambda t=tail, x=fit.xmin: compare_tail(t, x)))
        print(f"| {n} (tail {tail.size}) | " + " | ".join(f"{1e3 * c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
