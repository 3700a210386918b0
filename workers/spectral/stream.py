"""Several matrices analysed at once on the CPU's cores, results in the order they were read.

Eigendecompositions scale poorly over threads (half of the tridiagonal reduction is
memory-bound BLAS-2), and a multi-threaded BLAS slows down badly when another process holds a
core. So on a CPU the engine runs one task per worker thread, each with ``cores // workers``
BLAS threads (one on a small machine): never more threads than cores, nothing nested. A matrix
is two tasks, its own spectrum (``analyze_spectrum``) and its shuffle's (the trap check), joined
in the reading thread: the last matrix of a checkpoint still keeps two cores busy. The
limit is set on every BLAS/OpenMP pool the process has loaded (threadpoolctl: numpy's and
scipy's OpenBLAS, torch's), for the time of the stream; the CPU engine computes with numpy,
whose BLAS and LAPACK calls (and ``lapack``'s, through ctypes) release the GIL, so the worker
threads really run at once. The next
tensor is read while the workers compute, so reading overlaps the analysis.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from types import ModuleType
from typing import TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from alphawatch.workers.spectral.analysis import (
    Analysed,
    Device,
    Matrix,
    analyze_matrix,
    analyze_spectrum,
    as_matrices,
    host_array,
    resolve_device,
    shuffled_spectrum,
)
from alphawatch.workers.spectral.types import LayerResult, Thresholds

T = TypeVar("T")

MAX_AUTO_WORKERS = 4
"""``workers=0`` uses one worker per core up to this many: memory grows with each worker."""

ALONE_BYTES = 128 * 2**20
"""A matrix of at least this many bytes, and as large as any read before it, is analysed with
no further matrix read until it is done. Two of the largest at once (a checkpoint's ``lm_head``
and ``embed_tokens`` sit side by side in a safetensors file, sorted by name) each hold their
float32 values and their shuffle's permutation, as large again: 4x the largest tensor, 20 GB at
a 128k vocabulary of width 8192 (bench/bench_scale.py). Below this size the overlap is kept."""


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def analysis_workers(requested: int = 0) -> int:
    """Matrices analysed at once: ``requested``, or (0) one per core, at most four."""
    if requested > 0:
        return requested
    return min(cpu_cores(), MAX_AUTO_WORKERS)


def _torch() -> ModuleType | None:
    """torch when something has imported it (a pickle's reader, CUDA), else None.

    The CPU engine computes with numpy: a stream of safetensors matrices never imports torch,
    and its thread pools need no limit then.
    """
    return sys.modules.get("torch")


def _set_torch_threads(threads: int) -> None:
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)


@contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    """At most ``threads`` threads in each BLAS and OpenMP pool, and in torch's, then back."""
    torch = _torch()
    previous = torch.get_num_threads() if torch is not None else None
    _set_torch_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        if previous is not None:
            _set_torch_threads(previous)


def analyze_stream(
    items: Iterable[tuple[T, Matrix, object]],
    *,
    workers: int = 0,
    method: str = "ww",
    thresholds: Thresholds | None = None,
    device: str | Device = "cpu",
    check_traps: bool = True,
) -> Iterator[tuple[T, LayerResult]]:
    """``analyze_matrix`` over ``(payload, weight, stored_dtype)`` items, ``workers`` at a time.

    Yields ``(payload, result)`` in the order of ``items``, one per item even when it fails.
    At most ``workers + 1`` items are held at once (those being analysed and the one being
    read), so ``items`` may be a lazy reader. On the accelerator path (CUDA), or with one
    worker, items are analysed one after the other. Results do not depend on the number of
    workers beyond rounding (BLAS sums in another order: ~1e-14 relative).
    """
    dev = resolve_device(device)
    count = 1 if dev.accelerated else analysis_workers(workers)
    limits = thresholds or Thresholds()
    if count == 1:
        for payload, weight, dtype in items:
            yield (
                payload,
                analyze_matrix(
                    weight,
                    stored_dtype=dtype,
                    method=method,
                    thresholds=limits,
                    device=dev,
                    check_traps=check_traps,
                ),
            )
            del payload, weight  # not held while the next is read
        return
    threads = max(1, cpu_cores() // count)
    pending: deque[tuple[T, Future[LayerResult | Analysed], Future[np.ndarray] | None]] = deque()
    held: deque[int] = deque()  # bytes of each pending matrix
    largest = 0
    # torch's thread count is also a per-thread OpenMP setting: each worker thread sets its own.
    with (
        _intra_op_threads(threads),
        ThreadPoolExecutor(
            count, "alphawatch-spectral", initializer=_set_torch_threads, initargs=(threads,)
        ) as pool,
    ):
        for payload, weight, dtype in items:
            size = _nbytes(weight)
            largest = max(largest, size)
            own = pool.submit(
                analyze_spectrum,
                weight,
                stored_dtype=dtype,
                method=method,
                thresholds=limits,
                device=dev,
            )
            # The shuffle's spectrum is a task of its own: a matrix keeps two cores busy when
            # it is the last one, and no worker waits on another's task.
            shuffle = (
                pool.submit(_shuffled_spectrum, weight, limits.trap_seed, dev)
                if check_traps
                else None
            )
            pending.append((payload, own, shuffle))
            held.append(size)
            # Before the next matrix is read (the loop's next item): at most ``count`` pending,
            # and no other beside one of the largest (ALONE_BYTES).
            while len(pending) > count or (pending and sum(held) >= max(largest, ALONE_BYTES)):
                held.popleft()
                yield _finished(*pending.popleft())
            # Held by ``pending`` until handed back, then not here while the next is read (an
            # Analysed result holds its matrix)
            del payload, weight, own, shuffle
        while pending:
            yield _finished(*pending.popleft())


def _nbytes(weight: Matrix) -> int:
    """Bytes of a matrix as the engine holds it: float32 at least (the shuffle's values)."""
    if isinstance(weight, np.ndarray):
        return max(int(weight.nbytes), 4 * int(weight.size))
    return int(weight.numel()) * max(4, int(weight.element_size()))


def _finished(
    payload: T, own: Future[LayerResult | Analysed], shuffle: Future[np.ndarray] | None
) -> tuple[T, LayerResult]:
    """The matrix's result once both its tasks are done (a matrix stopped early, NaN or
    constant, drops its shuffle: cancelled if not started, else its result or error unread)."""
    outcome = own.result()
    if isinstance(outcome, LayerResult):
        if shuffle is not None:
            shuffle.cancel()
        return payload, outcome
    if shuffle is None:
        return payload, outcome.finish(None)
    try:
        rand_evals = shuffle.result()
    except Exception as exc:  # a result per tensor, whatever happens
        return payload, outcome.failed(exc)
    return payload, outcome.finish(rand_evals)


def _shuffled_spectrum(weight: Matrix, seed: int, dev: Device) -> np.ndarray:
    return shuffled_spectrum(as_matrices(host_array(weight)), seed, dev)
