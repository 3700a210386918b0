"""What each part of a matrix's analysis costs on one core, and what a trap check without the
shuffle's full spectrum would save: the measurement behind issue 14's remaining decision.

    python bench/bench_trap_check.py [--width 2048]

Inputs are made here: a 1024-wide 8-layer checkpoint of the demo training run (the worker
benchmark's model, after one step) and the ``--width`` Llama-shaped bench layer of
``bench_engine`` (seeded Gaussian + Student-t(3) weights). For every matrix, with one BLAS thread
and CPU seconds of this process:

- W's own spectrum, which the parity with weightwatcher keeps in float64: the Gram matrix
  (``dsyrk`` over row blocks) and its eigenvalues, as the engine computes them;
- the trap check as the engine runs it today: the seeded shuffle's float32 Gram matrix and all
  its eigenvalues (``rand_evals``, which ``rand_distance``, ``near_random`` and the
  dashboard's shuffled ESD read);
- the cheapest exact alternative for the trap count and ``max_rand_eval`` alone: a Cholesky
  factorisation of ``limit·I − G`` (``spotrf``; it succeeds exactly when no eigenvalue lies
  above the trap limit), else the inertia of ``G − limit·I`` (Bunch-Kaufman ``ssytrf``: the
  exact count above the limit), then the top eigenvalues by ARPACK. Its count is checked
  against the full spectrum's.

Nothing here changes the engine. The saving is reported as CPU seconds per checkpoint / layer
and, since the engine keeps two cores busy, as the wall clock it would take off. Prints markdown
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# one BLAS thread: per-matrix CPU seconds, as each of the engine's pool threads runs them
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.linalg import lapack as scipy_lapack  # noqa: E402
from scipy.sparse.linalg import eigsh  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

T = TypeVar("T")


def cpu(f: Callable[[], T]) -> tuple[float, T]:
    t0 = time.process_time()
    result = f()
    return time.process_time() - t0, result


def positive_count(ldl: np.ndarray, ipiv: np.ndarray) -> int:
    """Eigenvalues > 0 of the matrix ``ssytrf`` factored (Sylvester's inertia of D): a 1×1
    block counts by its sign, a 2×2 block (negative determinant) holds one of each."""
    d, k, count = np.diag(ldl), 0, 0
    while k < d.size:
        if ipiv[k] > 0:
            count += int(d[k] > 0)
            k += 1
        else:
            count += 1
            k += 2
    return count


def measure_matrix(weight: np.ndarray) -> dict[str, float] | None:
    """One matrix's CPU seconds by part, and whether the cheap count equals the full one."""
    from alphawatch.workers.spectral import lapack
    from alphawatch.workers.spectral.analysis import (
        TW_PAD,
        Analysed,
        _permutations,
        analyze_spectrum,
    )

    analysed = analyze_spectrum(weight, stored_dtype="float32")
    if not isinstance(analysed, Analysed):
        return None
    tall = weight if weight.shape[0] >= weight.shape[1] else weight.T
    rows, small = tall.shape
    t: dict[str, float] = {}
    t["w_gram"], product = cpu(
        lambda: lapack.gram_upper(lambda i, j: tall[i:j], rows, small, np.float64)
    )
    t["w_eig"], _ = cpu(lambda: lapack.eigvalsh(product, overwrite=True))

    perm = _permutations(analysed.limits.trap_seed, weight.size, 1)[0]
    flat = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
    shuffled = flat.take(perm, mode="clip").reshape(rows, small)
    t["s_gram"], upper = cpu(
        lambda: lapack.gram_upper(lambda i, j: shuffled[i:j], rows, small, np.float32)
    )
    gram = np.triu(upper)
    gram += np.triu(gram, 1).T  # both triangles, for scipy's routines
    t["s_eig"], evals = cpu(lambda: lapack.eigvalsh(gram.copy(), overwrite=True, single=True))
    limit = analysed.bulk.edge + TW_PAD * analysed.bulk.tw_scale
    traps = int((evals > limit).sum())

    shifted = limit * np.eye(small, dtype=np.float32) - gram
    t["cheap"], (_, info) = cpu(lambda: scipy_lapack.spotrf(shifted, lower=1))
    count = 0
    if info != 0:  # not positive definite: some eigenvalue lies above the limit
        seconds, (ldl, ipiv, _) = cpu(lambda: scipy_lapack.ssytrf(-shifted, lower=1))
        t["cheap"] += seconds
        count = positive_count(ldl, ipiv)
    seconds, _ = cpu(
        lambda: eigsh(gram, k=min(max(count, 1), small - 2), which="LA", return_eigenvectors=False)
    )
    t["cheap"] += seconds
    t.update(matrices=1, with_traps=float(traps > 0), counts_agree=float(count == traps))
    return t


def measure(path: Path) -> dict[str, float]:
    from safetensors.numpy import load_file

    totals: dict[str, float] = {}
    for weight in load_file(str(path)).values():
        if weight.ndim != 2 or min(weight.shape) < 512:
            continue  # embeddings of the tiny vocabulary
        for key, value in (measure_matrix(weight) or {}).items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--width",
        type=int,
        default=2048,
        choices=(1024, 2048, 4096),
        help="the bench layer's width (default 2048)",
    )
    args = parser.parse_args()
    from bench_engine import write_layer

    from alphawatch.workers.demo_run import train

    work = Path(tempfile.mkdtemp(prefix="alphawatch-bench-traps-"))
    try:
        train(
            work / "run",
            steps=1,
            save_every=1,
            d_model=1024,
            n_layers=8,
            ffn=2752,
            seq_len=16,
            batch_size=2,
            n_heads=8,
        )
        checkpoint = next((work / "run").glob("checkpoint-*/model.safetensors"))
        layer = work / f"layer{args.width}.safetensors"
        write_layer(args.width, layer)
        rows = [
            ("1024-wide 8-layer checkpoint (demo run)", measure(checkpoint)),
            (f"{args.width}-wide bench layer", measure(layer)),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}; "
        "one BLAS thread, CPU s"
    )
    print(
        "| input | matrices (with traps) | W: float64 Gram + eigenvalues | shuffle: float32 "
        "Gram | shuffle: all eigenvalues | Cholesky / inertia + ARPACK | counts agree | "
        "saving (CPU s, wall s on 2 cores) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, t in rows:
        saving = t["s_eig"] - t["cheap"]
        print(
            f"| {name} | {t['matrices']:.0f} ({t['with_traps']:.0f}) | "
            f"{t['w_gram']:.2f} + {t['w_eig']:.2f} | {t['s_gram']:.2f} | {t['s_eig']:.2f} | "
            f"{t['cheap']:.2f} | {t['counts_agree']:.0f} of {t['matrices']:.0f} | "
            f"{saving:.2f}, {saving / 2:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
