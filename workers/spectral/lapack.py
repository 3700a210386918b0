"""Gram matrices and their eigenvalues through the BLAS and LAPACK numpy links (OpenBLAS).

For large matrices a two-stage reduction (``dsytrd_sy2sb``: to a band of ``BAND`` subdiagonals
with BLAS-3; ``dsytrd_sb2st``: to tridiagonal form by bulge chasing; ``dsterf``) avoids the
memory-bound half of the one-stage ``dsyevd`` that ``numpy.linalg.eigvalsh`` calls: 13 % faster
at 2048², 17 % faster than LAPACK's own ``dsyevd_2stage`` (whose band is 32) at 4096², one
core (BENCHMARKS.md). The eigenvalues agree with ``dsyevd``'s to ~1e-15·λmax. Gram matrices
are summed over blocks of rows by ``syrk`` with accumulation (:func:`gram_upper`), so a float32
matrix's float64 Gram needs no float64 copy of it.

Eigenvalues in float64 by default. ``single=True`` decomposes a float32 matrix in float32
(``ssyevd``, the float32 stages): 1.3x faster at 1024², 1.5x at 2048², one core, for an
absolute error of ~1e-5·λmax that moves with the BLAS thread count. The trap check's shuffle
takes it (its statistics pool what lies below 1e-4·λmax); W's own spectrum, whose small
eigenvalues give the rank, does not.

numpy's wheels bundle OpenBLAS with its symbols renamed (``scipy_dsytrd_sy2sb_64_``,
``scipy_LAPACKE_dsyevd64_``, 64-bit integers). The library is found among those the process has
loaded (threadpoolctl), its integer width read from its build configuration, and the binding
checked once on small matrices against ``numpy.linalg.eigvalsh``; when any of that fails (numpy
on MKL or Accelerate, an OpenBLAS without these routines), :func:`eigvalsh` is
``numpy.linalg.eigvalsh`` and only slower. ctypes releases the GIL for the call, so worker
threads decompose matrices at once.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TWO_STAGE_FROM = 1536
"""Order from which the two-stage reduction is used; below, ``dsyevd`` is as fast."""

BAND = 64
"""Subdiagonals of the band of the first stage: 48-64 is fastest at 2048² and 4096² (a wider
band moves work to the bulge chasing, a narrower one to BLAS-2)."""

BLOCK_ROWS = 512
"""Rows converted at a time by :func:`gram_upper`."""

_ROW_MAJOR, _COL_MAJOR, _UPPER, _TRANS = 101, 102, 121, 112
_lock = threading.Lock()


@dataclass(frozen=True)
class _Binding:
    integer: type[ctypes.c_int64] | type[ctypes.c_int32]
    functions: dict[str, Callable[..., Any]]

    def function(self, name: str, dtype: np.dtype[Any]) -> Callable[..., Any]:
        """The float32 (``s``) or float64 (``d``) routine ``name`` for ``dtype``."""
        return self.functions[("s" if dtype == np.float32 else "d") + name]

    def syevd(self, a: np.ndarray) -> np.ndarray | None:
        """Eigenvalues of ``a`` (destroyed) by the one-stage ``syevd``; None on an error."""
        n = a.shape[0]
        values = np.empty(n, dtype=a.dtype)
        # a C-ordered symmetric matrix read column-major is itself: no transposed copy
        syevd = self.function("syevd", a.dtype)
        info = syevd(_COL_MAJOR, b"N", b"L", n, a.ctypes.data, n, values.ctypes.data)
        return values if info == 0 else None

    def two_stage(self, a: np.ndarray) -> np.ndarray | None:
        """Eigenvalues of ``a`` (destroyed) by the two-stage reduction; None on an error."""
        n, it = a.shape[0], self.integer
        band = max(1, min(BAND, n - 1))
        info = it(0)

        def buffer(size: int) -> np.ndarray:
            return np.empty(max(size, 1), dtype=a.dtype)

        def call(name: str, *args: Any) -> bool:
            # Fortran: every argument by reference; each character argument's hidden length
            # goes last (ignored by a build that has none)
            refs = [
                ctypes.c_void_p(arg.ctypes.data)
                if isinstance(arg, np.ndarray)
                else arg
                if isinstance(arg, bytes)
                else ctypes.byref(it(arg))
                for arg in args
            ]
            chars = sum(isinstance(arg, bytes) for arg in args)
            lengths = [ctypes.c_size_t(1)] * chars
            self.function(name, a.dtype)(*refs, ctypes.byref(info), *lengths)
            return info.value == 0

        ab = np.zeros((n, band + 1), dtype=a.dtype)  # the band, column-major (band+1)×n
        tau = buffer(n)
        query = buffer(1)
        if not call("sytrd_sy2sb", b"L", n, band, a, n, ab, band + 1, tau, query, -1):
            return None
        if not call(
            "sytrd_sy2sb",
            b"L",
            n,
            band,
            a,
            n,
            ab,
            band + 1,
            tau,
            buffer(int(query[0])),
            int(query[0]),
        ):
            return None
        d, e = buffer(n), buffer(n)
        hous_query, work_query = buffer(1), buffer(1)
        if not call(
            "sytrd_sb2st",
            b"Y",
            b"N",
            b"L",
            n,
            band,
            ab,
            band + 1,
            d,
            e,
            hous_query,
            -1,
            work_query,
            -1,
        ):
            return None
        hous, work = int(hous_query[0]), int(work_query[0])
        if not call(
            "sytrd_sb2st",
            b"Y",
            b"N",
            b"L",
            n,
            band,
            ab,
            band + 1,
            d,
            e,
            buffer(hous),
            hous,
            buffer(work),
            work,
        ):
            return None
        if not call("sterf", n, d, e):
            return None
        return d


def _openblas_paths() -> list[Path]:
    """The OpenBLAS libraries loaded in this process, numpy's own first."""
    from threadpoolctl import threadpool_info

    numpy_dir = str(Path(np.__file__).resolve().parent.parent)
    found = [
        Path(info["filepath"])
        for info in threadpool_info()
        if info.get("internal_api") == "openblas" and info.get("filepath")
    ]
    return sorted(found, key=lambda path: not str(path.resolve()).startswith(numpy_dir))


def _bind(path: Path) -> _Binding | None:
    """The routines of one OpenBLAS, or None when it lacks them."""
    lib = ctypes.CDLL(str(path))
    for prefix in ("scipy_", ""):
        for suffix in ("64_", ""):
            config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
            if config is None or getattr(lib, f"{prefix}LAPACKE_dsyevd{suffix}", None) is None:
                continue
            config.restype = ctypes.c_char_p
            integer = ctypes.c_int64 if b"USE64BITINT" in (config() or b"") else ctypes.c_int32
            functions: dict[str, Callable[..., Any]] = {}
            for kind, real in (("s", ctypes.c_float), ("d", ctypes.c_double)):
                syevd = getattr(lib, f"{prefix}LAPACKE_{kind}syevd{suffix}", None)
                syrk = getattr(lib, f"{prefix}cblas_{kind}syrk{suffix}", None)
                if syevd is None or syrk is None:
                    return None
                syevd.restype = integer
                syevd.argtypes = [
                    ctypes.c_int,
                    ctypes.c_char,
                    ctypes.c_char,
                    integer,
                    ctypes.c_void_p,
                    integer,
                    ctypes.c_void_p,
                ]
                syrk.restype = None
                syrk.argtypes = [
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    integer,
                    integer,
                    real,
                    ctypes.c_void_p,
                    integer,
                    real,
                    ctypes.c_void_p,
                    integer,
                ]
                functions[kind + "syevd"], functions[kind + "syrk"] = syevd, syrk
                for name in ("sytrd_sy2sb", "sytrd_sb2st", "sterf"):
                    fortran = getattr(lib, f"{prefix}{kind}{name}_{suffix}", None)
                    if fortran is None:
                        return None
                    fortran.restype = None
                    functions[kind + name] = fortran
            return _Binding(integer=integer, functions=functions)
    return None


def _checked(binding: _Binding) -> bool:
    """Whether both reductions give numpy's eigenvalues on small matrices (a wrong integer
    width or calling convention would not)."""
    rng = np.random.default_rng(0)
    for rows, cols in ((40, 24), (130, 100)):
        x = rng.standard_normal((rows, cols))
        for kind, dtype in (("s", np.float32), ("d", np.float64)):
            xk: np.ndarray = x.astype(dtype)
            product = np.zeros((cols, cols), dtype=dtype)
            binding.functions[kind + "syrk"](
                _ROW_MAJOR,
                _UPPER,
                _TRANS,
                cols,
                rows,
                1.0,
                xk.ctypes.data,
                cols,
                0.0,
                product.ctypes.data,
                cols,
            )
            if not np.allclose(np.triu(product), np.triu(xk.T @ xk), rtol=1e-4, atol=1e-3):
                return False
        reference = np.linalg.eigvalsh(x.T @ x)
        for dtype, tolerance in ((np.float64, 1e-10), (np.float32, 1e-4)):
            product = (x.T @ x).astype(dtype)
            for values in (binding.syevd(product.copy()), binding.two_stage(product)):
                if values is None or not np.allclose(
                    np.sort(values), reference, rtol=tolerance, atol=tolerance * reference[-1]
                ):
                    return False
    return True


_binding: _Binding | None = None
_searched = False


def _load() -> _Binding | None:
    global _binding, _searched
    with _lock:
        if not _searched:
            _searched = True
            for path in _openblas_paths():
                try:
                    bound = _bind(path)
                    if bound is not None and _checked(bound):
                        _binding = bound
                        break
                except (OSError, AttributeError, ValueError):
                    continue
        return _binding


def gram_upper(
    rows: Callable[[int, int], np.ndarray], count: int, k: int, dtype: type[np.floating]
) -> np.ndarray | None:
    """Σ BᵀB over the row blocks ``B = rows(i, j)`` (rows i..j of a ``count``×``k`` matrix, in
    ``dtype``), by BLAS ``syrk`` with accumulation: the Gram matrix of a float32 matrix in
    float64 without its float64 copy (20 % faster at 5504×2048, and no 90 MB to fault in), or
    of a shuffle without the shuffled copy. Only the upper triangle (row-major) is filled, the
    one :func:`eigvalsh` reads; None without the binding."""
    binding = _load()
    if binding is None:
        return None
    syrk = binding.function("syrk", np.dtype(dtype))
    product = np.zeros((k, k), dtype=dtype)
    for start in range(0, count, BLOCK_ROWS):
        block = np.ascontiguousarray(rows(start, min(start + BLOCK_ROWS, count)), dtype=dtype)
        syrk(
            _ROW_MAJOR,
            _UPPER,
            _TRANS,
            k,
            block.shape[0],
            1.0,
            block.ctypes.data,
            k,
            1.0,
            product.ctypes.data,
            k,
        )
    return product


def available() -> bool:
    """Whether the direct LAPACK binding is in use (else :func:`eigvalsh` is numpy's)."""
    return _load() is not None


def eigvalsh(a: np.ndarray, *, overwrite: bool = False, single: bool = False) -> np.ndarray:
    """Eigenvalues of the symmetric matrix ``a``, ascending, float64.

    ``a`` must be symmetric, or hold its upper triangle (row-major, as :func:`gram_upper`
    fills it) when the binding is available: only that triangle is read. ``overwrite``: ``a``
    may be destroyed when it is already in the working precision (saves a copy). ``single``: a
    float32 ``a`` is decomposed in float32 (faster, ~1e-5·λmax absolute error); otherwise in
    float64. Without the binding, ``numpy.linalg.eigvalsh`` (float64). Raises
    ``numpy.linalg.LinAlgError`` for a NaN or Inf entry, a non-square matrix, or when LAPACK
    fails, as numpy does.
    """
    binding = _load()
    if (
        binding is None
        or a.ndim != 2
        or a.shape[0] != a.shape[1]
        or a.dtype not in (np.float32, np.float64)
    ):
        return np.asarray(np.linalg.eigvalsh(a), dtype=np.float64)
    if not np.isfinite(a).all():
        raise np.linalg.LinAlgError("the matrix holds NaN or Inf")
    if a.shape[0] == 0:
        return np.empty(0)
    precision = np.float32 if single and a.dtype == np.float32 else np.float64
    if overwrite and a.dtype == precision and a.flags.c_contiguous and a.flags.writeable:
        work = a
    else:
        work = np.array(a, dtype=precision, order="C")
    values = binding.two_stage(work) if a.shape[0] >= TWO_STAGE_FROM else binding.syevd(work)
    if values is None:
        raise np.linalg.LinAlgError("LAPACK: the eigenvalues did not converge")
    values.sort()
    return values.astype(np.float64, copy=False)
