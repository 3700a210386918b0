"""Per-layer spectral analysis: the pipeline from a weight matrix to its :class:`LayerResult`.

Each step returns a frozen value: the device and the matrices (:mod:`device`), the spectrum
(:mod:`eigenvalues`), the moments, bulk and rank (:mod:`moments`), the power-law fit
(:mod:`plfit`), the traps of the shuffle (:mod:`traps`), then the verdict here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from alphawatch.workers.spectral import compare
from alphawatch.workers.spectral.device import (
    HOST,
    Device,
    Matrix,
    as_matrices,
    device_tensor,
    entry_count,
    host_array,
    is_complex,
    resolve_device,
)
from alphawatch.workers.spectral.eigenvalues import (
    Spectrum,
    gram,
    shuffled_eigenvalues,
    singular_values,
    spectrum_of,
)
from alphawatch.workers.spectral.localise import localise
from alphawatch.workers.spectral.moments import (
    Bulk,
    Moments,
    Rank,
    bulk_of,
    moments_of,
    rank_of,
    with_variance,
)
from alphawatch.workers.spectral.mpfit import MPFit, mp_fit
from alphawatch.workers.spectral.plfit import fit_power_law
from alphawatch.workers.spectral.traps import (
    SHUFFLE_BUCKETS,
    TW_PAD,
    Traps,
    _permutations,
    random_permutation,
    shuffled_spectrum,
    traps_of,
)
from alphawatch.workers.spectral.types import FitStatus, LayerResult, PowerLawFit, Thresholds

# The pipeline's steps, importable from here as before the engine was split into its modules
# (the worker, the stream and the benchmarks name them so).
__all__ = [
    "HOST",
    "SHUFFLE_BUCKETS",
    "TW_PAD",
    "Analysed",
    "Bulk",
    "Device",
    "Matrix",
    "Moments",
    "Rank",
    "Spectrum",
    "Traps",
    "Verdict",
    "_permutations",
    "analyze_many",
    "analyze_matrix",
    "analyze_spectrum",
    "as_matrices",
    "bulk_of",
    "gram",
    "host_array",
    "moments_of",
    "random_permutation",
    "rank_of",
    "resolve_device",
    "shuffled_eigenvalues",
    "shuffled_spectrum",
    "singular_values",
    "spectrum_of",
    "traps_of",
    "verdict_of",
    "with_variance",
]


@dataclass(frozen=True)
class Verdict:
    """Whether to believe the alpha, and weightwatcher's training labels."""

    status: FitStatus
    trusted: bool
    over_trained: bool
    under_trained: bool


def verdict_of(
    fit: PowerLawFit | None, rank: Rank, traps: Traps | None, limits: Thresholds
) -> Verdict:
    """The fit status (first failed rule wins), trust, and the over/under-trained labels."""
    status = FitStatus.TAIL_TOO_SHORT
    if fit is not None:
        if fit.n < limits.min_tail:
            status = FitStatus.TAIL_TOO_SHORT
        elif not (limits.alpha_min < fit.alpha <= limits.alpha_max):
            status = FitStatus.ALPHA_OUT_OF_RANGE
        elif limits.max_ks_distance < fit.D:
            status = FitStatus.POOR_FIT
        elif fit.alpha_delta > limits.max_alpha_delta:
            status = FitStatus.UNSTABLE
        else:
            status = FitStatus.OK
    trap = traps is not None and traps.shuffle_traps > 0
    return Verdict(
        status=status,
        trusted=status is FitStatus.OK and not trap and not rank.rank_collapse,
        over_trained=fit is not None and fit.alpha < limits.over_trained_below,
        under_trained=fit is not None and fit.alpha > limits.under_trained_above,
    )


def analyze_matrix(
    weight: Matrix,
    *,
    stored_dtype: object = None,
    method: str = "ww",
    thresholds: Thresholds | None = None,
    device: str | Device = "cpu",
    check_traps: bool = True,
) -> LayerResult:
    """All spectral metrics of one weight matrix and whether its alpha can be trusted.

    Parameters
    ----------
    weight : numpy.ndarray or torch.Tensor
        (out, in) matrix or (out, in, kh, kw) Conv2d kernel (slices pooled into one spectrum),
        any float dtype; orientation does not matter. Eigenvalues are λ = σ², no 1/N scaling
        (weightwatcher convention). On a CPU the engine computes with numpy (a float32/64 CPU
        tensor is read in place); on CUDA with torch.
    stored_dtype : torch.dtype, numpy.dtype or dtype name, optional
        The dtype the weights were saved in (``"bfloat16"`` for a bf16 checkpoint read as
        float32); the rank tolerance is σmax · eps(stored_dtype).
    method : str
        Power-law fit method (``ww`` = weightwatcher 0.7.7 numbers).
    thresholds : Thresholds
        Trust thresholds.
    device : str, Device or torch.device
        ``cpu``, ``cuda`` or ``auto``; ``Device(kind="torch", torch_device="cpu")`` runs the
        accelerator (CUDA) path's code on torch CPU tensors, as CI checks it.
    check_traps : bool
        Whether to look for correlation traps (costs a second spectrum, of the shuffled W).

    Returns
    -------
    LayerResult
        Never raises: bad input gives a status (``non_finite``, ``degenerate``,
        ``too_few_evals``, ``failed``). The fitted alpha is reported whatever the status; the
        status and ``trusted`` say whether to believe it.
    """
    outcome = analyze_spectrum(
        weight, stored_dtype=stored_dtype, method=method, thresholds=thresholds, device=device
    )
    if isinstance(outcome, LayerResult):
        return outcome
    if not check_traps:
        return outcome.finish(None)
    try:
        rand_evals = shuffled_spectrum(outcome.mats, outcome.limits.trap_seed, outcome.device)
    except Exception as exc:  # a result per tensor, whatever happens
        return outcome.failed(exc)
    return outcome.finish(rand_evals)


@dataclass(frozen=True)
class Analysed:
    """W's own analysis, done; the trap check's verdict still to come (:meth:`finish`).

    ``analyze_stream`` computes the shuffle's spectrum (:func:`shuffled_spectrum` of
    :attr:`mats`) as a task of its own beside this one, and finishes here when both are done.
    """

    mats: list[Matrix]
    device: Device
    limits: Thresholds
    method: str
    rows: int
    cols: int
    n: int
    m: int
    spec: Spectrum
    rank: Rank
    bulk: Bulk
    mp: MPFit | None
    fit: PowerLawFit | None
    comparison: compare.Comparison | None
    started: float

    def failed(self, exc: BaseException) -> LayerResult:
        """The "failed" result of this matrix, for an error of its trap check."""
        return LayerResult(
            method=self.method,
            fit_status=FitStatus.FAILED,
            trusted=False,
            error=f"{type(exc).__name__}: {exc}",
            rows=self.rows,
            cols=self.cols,
            elapsed_ms=1000.0 * (time.perf_counter() - self.started),
        )

    def finish(self, rand_evals: np.ndarray | None) -> LayerResult:
        """The result, with the traps of the shuffle's eigenvalues (None: trap check off)."""
        try:
            traps = (
                None
                if rand_evals is None
                else traps_of(rand_evals, self.spec, self.bulk, self.n, self.m)
            )
            verdict = verdict_of(self.fit, self.rank, traps, self.limits)
            status = compare.apply_rule(verdict.status, self.comparison, self.limits)
            if status is not verdict.status:
                verdict = replace(verdict, status=status, trusted=False)
            extra = compare.result_fields(self.fit, self.comparison)
            if traps is not None and traps.shuffle_traps > 0 and len(self.mats) == 1:
                # W's spikes beyond the trap edge: the singular pairs worth localising
                limit = self.bulk.edge + TW_PAD * self.bulk.tw_scale
                spikes = int(np.count_nonzero(self.spec.evals > limit))
                extra["trap_localisation"] = _localised(self.mats[0], spikes)
            return _result(
                method=self.method,
                rows=self.rows,
                cols=self.cols,
                spec=self.spec,
                rank=self.rank,
                bulk=self.bulk,
                mp=self.mp,
                fit=self.fit,
                traps=traps,
                verdict=verdict,
                started=self.started,
                extra=extra,
            )
        except Exception as exc:  # a result per tensor, whatever happens
            return self.failed(exc)


def analyze_spectrum(
    weight: Matrix,
    *,
    stored_dtype: object = None,
    method: str = "ww",
    thresholds: Thresholds | None = None,
    device: str | Device = "cpu",
) -> LayerResult | Analysed:
    """:func:`analyze_matrix` up to the trap check: a final result when W cannot be analysed
    (``non_finite``, ``degenerate``, ``too_few_evals``, ``failed``), else :class:`Analysed`."""
    limits = thresholds or Thresholds()
    started = time.perf_counter()
    shape = tuple(weight.shape)
    rows = int(shape[0]) if shape else 0
    cols = int(shape[1]) if len(shape) > 1 else 1

    def done(status: FitStatus, error: str | None = None, **values: object) -> LayerResult:
        elapsed = 1000.0 * (time.perf_counter() - started)
        return LayerResult(
            method=method,
            fit_status=status,
            trusted=False,
            error=error,
            rows=rows,
            cols=cols,
            elapsed_ms=elapsed,
            **values,  # type: ignore[arg-type]
        )

    try:
        dev = resolve_device(device)
        if weight.ndim < 2 or min(shape) < 1:
            return done(FitStatus.TOO_FEW_EVALS, f"tensor of shape {shape} has no spectrum")
        if is_complex(weight):
            return done(
                FitStatus.FAILED,
                f"complex weights ({weight.dtype}): alphawatch "
                "analyses real matrices, and the real part alone is not this one",
            )
        data = device_tensor(weight, dev) if dev.accelerated else host_array(weight)
        mats = as_matrices(data)
        m = min(mats[0].shape)
        n = max(mats[0].shape)
        if m * len(mats) < limits.min_evals:
            return done(
                FitStatus.TOO_FEW_EVALS,
                num_evals=m * len(mats),
                error=f"{m * len(mats)} eigenvalues, fewer than {limits.min_evals}",
            )
        moments = moments_of(data, dev)
        if not moments.finite:
            return done(FitStatus.NON_FINITE, "weights contain NaN or Inf")
        if moments.constant:
            return done(FitStatus.DEGENERATE, "zero or constant matrix")
        spec = spectrum_of(mats, dev)
        moments = with_variance(moments, spec, data)
        fit = fit_power_law(
            spec.evals,
            method,
            bootstrap_samples=limits.bootstrap_samples,
            seed=limits.trap_seed,
            device=dev,
        )
        return Analysed(
            mats=mats,
            device=dev,
            limits=limits,
            method=method,
            rows=rows,
            cols=cols,
            n=n,
            m=m,
            spec=spec,
            rank=rank_of(spec, stored_dtype, n, limits.rank_loss_fraction),
            bulk=bulk_of(moments, spec, n, m),
            mp=mp_fit(spec.evals, n, m),
            fit=fit,
            # Is the tail a power law at all? (workers/spectral/compare.py; the rule is optional)
            comparison=compare.compare_fit(fit, spec.evals),
            started=started,
        )
    except Exception as exc:  # a result per tensor, whatever happens
        return done(FitStatus.FAILED, f"{type(exc).__name__}: {exc}")


def _result(
    *,
    method: str,
    rows: int,
    cols: int,
    spec: Spectrum,
    rank: Rank,
    bulk: Bulk,
    mp: MPFit | None,
    fit: PowerLawFit | None,
    traps: Traps | None,
    verdict: Verdict,
    started: float,
    extra: dict[str, object] | None = None,
) -> LayerResult:
    lambda_max, norm = spec.lambda_max, spec.norm
    fitted: dict[str, float | int | None] = dict.fromkeys(
        (
            "alpha",
            "D",
            "xmin",
            "xmax",
            "sigma",
            "alpha_delta",
            "num_pl_spikes",
            "alpha_weighted",
            "log_alpha_norm",
        )
    )
    if fit is not None:
        with np.errstate(over="ignore"):
            log_alpha_norm = float(np.log10(np.sum(spec.evals**fit.alpha)))
        fitted = {
            "alpha": fit.alpha,
            "D": fit.D,
            "xmin": fit.xmin,
            "xmax": fit.xmax,
            "sigma": fit.sigma,
            "alpha_delta": fit.alpha_delta,
            "num_pl_spikes": fit.n,
            "alpha_weighted": fit.alpha * float(np.log10(lambda_max)),
            "log_alpha_norm": log_alpha_norm,
        }
    over, under = verdict.over_trained, verdict.under_trained
    return LayerResult(
        method=method,
        fit_status=verdict.status,
        trusted=verdict.trusted,
        rows=rows,
        cols=cols,
        num_evals=int(spec.evals.size),
        lambda_max=lambda_max,
        log_norm=float(np.log10(norm)),
        log_spectral_norm=float(np.log10(lambda_max)),
        stable_rank=norm / lambda_max,
        entropy=rank.entropy,
        matrix_rank=rank.matrix_rank,
        rank_loss=rank.rank_loss,
        mp_bulk_max=bulk.edge,
        mp_sigma=float(np.sqrt(bulk.variance)),
        num_spikes=None if mp is None else mp.num_spikes,
        mp_softrank=None if mp is None else mp.softrank,
        edge_spikes=bulk.edge_spikes,
        edge_softrank=bulk.edge / lambda_max,
        num_traps=None if traps is None else traps.num_traps,
        rand_distance=None if traps is None else traps.rand_distance,
        shuffle_traps=None if traps is None else traps.shuffle_traps,
        shuffle_distance=None if traps is None else traps.shuffle_distance,
        max_rand_eval=None if traps is None else traps.max_rand_eval,
        mean_spike=traps is not None and traps.mean_spike,
        correlation_trap=traps is not None and traps.shuffle_traps > 0,
        rank_collapse=rank.rank_collapse,
        near_random=traps is not None and traps.near_random,
        over_trained=over,
        under_trained=under,
        warning="over-trained" if over else ("under-trained" if under else None),
        elapsed_ms=1000.0 * (time.perf_counter() - started),
        # stored as float32: an eigenvalue beyond 3.4e38 is kept as inf (the API answers null)
        evals=_float32(spec.evals),
        rand_evals=None if traps is None else _float32(traps.rand_evals),
        **fitted,  # type: ignore[arg-type]
        **(extra or {}),  # type: ignore[arg-type]
    )


def _localised(weight: Matrix, spikes: int) -> dict[str, object] | None:
    """The trap's localisation as JSON, or None where it cannot be had: it explains a flag
    already raised, and a failure to explain it must not fail the layer's analysis."""
    try:
        found = localise(weight, spikes)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError):
        return None
    return None if found is None else found.as_json()


def _float32(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def analyze_many(
    items: Iterable[tuple[str, Matrix, object]],
    *,
    method: str = "ww",
    thresholds: Thresholds | None = None,
    device: str | Device = "cpu",
    check_traps: bool = True,
) -> Iterator[tuple[str, LayerResult]]:
    """Analyse many tensors, largest first so the device never idles on a small tail of work.

    Yields one ``(name, result)`` per item, even when an item fails. On the accelerator path
    each tensor is moved to the device first (through pinned memory on CUDA).
    """
    dev = resolve_device(device)
    work = sorted(items, key=lambda item: -entry_count(item[1]))
    for name, tensor, dtype in work:
        if dev.accelerated:
            tensor = _staged(tensor, dev)
        yield (
            name,
            analyze_matrix(
                tensor,
                stored_dtype=dtype,
                method=method,
                thresholds=thresholds,
                device=dev,
                check_traps=check_traps,
            ),
        )


def _staged(tensor: Matrix, dev: Device) -> Matrix:
    """``tensor`` on the accelerator's device, through page-locked host memory on CUDA: the copy
    then runs asynchronously while the previous tensor is analysed. Page-locked memory needs a
    CUDA driver, so the accelerator path on a CPU copies plainly."""
    host = device_tensor(tensor, HOST)
    if dev.type == "cuda":
        host = host.pin_memory()
    return host.to(dev.torch_device, non_blocking=True)
