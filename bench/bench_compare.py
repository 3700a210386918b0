"""Cost of the power-law fit and the distribution tests per layer, against powerlaw itself.

For tails of several lengths: alphawatch's two likelihood-ratio tests (truncated power law and
lognormal, workers/spectral/compare.py) against powerlaw 2.0.0's ``distribution_compare`` for
the same two tests on the same tail and xmin (the same numbers, see tests/spectral/
test_compare.py); the xmin_peak / clip_xmax fits beside the plain ww fit on whole spectra; and
one 1024-wide Llama-shaped layer (bench/bench_spectral.py's weights, eigenvalues computed once):
the ww fit with its bootstrap and the tests, as the engine runs them on every matrix, beside
the same code at an earlier revision (``--baseline REV``), alternating, in this process.

Times are CPU seconds of this process (every thread), the median of the repeats: the machine
is shared, and CPU time is what a busy machine distorts least.

    .venv/bin/python bench/bench_compare.py [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import scipy

from alphawatch.workers.spectral import compare
from alphawatch.workers.spectral.compare import RANGES, compare_tail
from alphawatch.workers.spectral.plfit import fit_power_law

REPEATS = 5
ROOT = Path(__file__).resolve().parents[1]


def _cpu(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _spectrum(n: int, seed: int) -> np.ndarray:
    """Eigenvalues of an n×2n Student-t matrix: a bulk and a heavy tail, like trained layers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(2.5, size=(2 * n, n)) / np.sqrt(n)
    return np.sort(np.linalg.eigvalsh(w.T @ w))


def _layer_spectra() -> dict[str, np.ndarray]:
    """The 7 matrices of bench_spectral's 1024-wide layer: eigenvalues of W^T W, float64."""
    import torch
    from bench_spectral import layer_weights

    torch.manual_seed(0)
    out = {}
    for name, weight in layer_weights(1024, 2752).items():
        w = weight.double().numpy()
        w = w if w.shape[0] >= w.shape[1] else w.T
        out[name] = np.linalg.eigvalsh(w.T @ w)
    return out


def _powerlaw(data: np.ndarray, xmin: float) -> None:
    import powerlaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(data, xmin=xmin, parameter_ranges=RANGES, verbose=0)
        fit.distribution_compare("power_law", "truncated_power_law", normalized_ratio=True)
        fit.distribution_compare("power_law", "lognormal", normalized_ratio=True)


def _module_at(rev: str, path: str, name: str, folder: Path) -> ModuleType:
    """``path`` as it was at git revision ``rev``, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _layer(
    fit_module: ModuleType, compare_module: ModuleType, spectra: dict[str, np.ndarray]
) -> tuple[Callable[[], object], Callable[[], object]]:
    fits = {k: fit_module.fit_power_law(v, "ww", bootstrap_samples=32) for k, v in spectra.items()}

    def fit() -> object:
        return [fit_module.fit_power_law(v, "ww", bootstrap_samples=32) for v in spectra.values()]

    def tests() -> object:
        return [
            compare_module.result_fields(fits[k], compare_module.compare_fit(fits[k], v))
            for k, v in spectra.items()
        ]

    tests()  # first use: lazy imports
    return fit, tests


def main() -> int:
    import powerlaw

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare the 1024-wide layer with")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"powerlaw {powerlaw.__version__}; load average {os.getloadavg()[0]:.1f}"
    )

    spectra = _layer_spectra()
    fit, tests = _layer(sys.modules[fit_power_law.__module__], compare, spectra)
    rows = [("this code", fit, tests)]
    with tempfile.TemporaryDirectory() as folder:
        if args.baseline:
            old_fit = _module_at(
                args.baseline, "workers/spectral/plfit.py", "baseline_plfit", Path(folder)
            )
            old_compare = _module_at(
                args.baseline, "workers/spectral/compare.py", "baseline_compare", Path(folder)
            )
            rows.insert(0, (args.baseline, *_layer(old_fit, old_compare, spectra)))
        cells: dict[str, list[list[float]]] = {row[0]: [[], []] for row in rows}
        for _ in range(REPEATS):  # alternating, so that both see the same load
            for label, f, t in rows:
                cells[label][0].append(_cpu(f, 1))
                cells[label][1].append(_cpu(t, 1))
    print("\n1024-wide layer (7 matrices), CPU ms per layer:\n")
    print("| code | ww fit, 32 bootstrap resamples | distribution tests | both |")
    print("|---|---:|---:|---:|")
    for label, (f_times, t_times) in cells.items():
        f_ms, t_ms = 1e3 * statistics.median(f_times), 1e3 * statistics.median(t_times)
        print(f"| {label} | {f_ms:.1f} | {t_ms:.1f} | {f_ms + t_ms:.1f} |")

    print("\n| tail n | alphawatch tests (CPU ms) | powerlaw 2.0.0 (CPU ms) | ratio |")
    print("|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n in (50, 200, 1000, 4000):
        tail = np.sort((1 - rng.random(n)) ** (-1 / 2.0))  # α = 3: above powerlaw's closed form
        ours = _cpu(lambda t=tail: compare_tail(t, 1.0))
        theirs = _cpu(lambda t=tail: _powerlaw(t, 1.0), repeats=1 if n > 1000 else 3)
        print(f"| {n} | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {theirs / ours:.1f}x |")

    print("\n| evals | ww fit (CPU ms) | xmin_peak | clip_xmax | tests on ww tail |")
    print("|---:|---:|---:|---:|---:|")
    for n in (256, 1024, 4096):
        evals = _spectrum(n, n)
        plain = fit_power_law(evals, "ww")
        assert plain is not None
        row = [
            _cpu(lambda m=m, e=evals: fit_power_law(e, m)) for m in ("ww", "xmin_peak", "clip_xmax")
        ]
        tail = evals[evals >= plain.xmin]
        row.append(_cpu(lambda t=tail, x=plain.xmin: compare_tail(t, x)))
        print(f"| {n} (tail {tail.size}) | " + " | ".join(f"{1e3 * c:.1f}" for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
