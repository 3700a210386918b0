"""Power-law fit of an eigenvalue spectrum, weightwatcher-compatible by default: one entry point
(:func:`fit_power_law`) and one table of the fit methods it dispatches to.

References: Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review
51 (2009); Martin & Mahoney, "Implicit self-regularization in deep neural networks", JMLR 22
(2021).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from alphawatch.vocabulary import FitMethod
from alphawatch.workers.spectral import compare, fingers
from alphawatch.workers.spectral.device import Device
from alphawatch.workers.spectral.ks import (
    _best_ks,
    bootstrap_delta,
    tail_alphas,
    tail_floor,
)
from alphawatch.workers.spectral.types import FitOptions, Fitter, PowerLawFit

if TYPE_CHECKING:
    import torch

__all__ = ["FITTERS", "FIT_METHODS", "fit_power_law"]

FIT_METHODS: tuple[str, ...] = tuple(m.value for m in FitMethod)
"""Every fit method's name; declared once, as :class:`alphawatch.vocabulary.FitMethod`."""


def _fit_ks(method: str, evals: np.ndarray, options: FitOptions) -> PowerLawFit | None:
    """``ww``, ``ww_relfloor`` and ``ks2``: the xmin of smallest KS distance (:mod:`ks`)."""
    data = tail_floor(evals, method)
    if data.size < 2:
        return None
    logs = np.log(data)
    alphas, n = tail_alphas(logs)
    i, distance = _best_ks(logs, alphas, n, two_sided=method == "ks2", device=options.device)
    alpha, xmin, tail_n = float(alphas[i]), float(data[i]), int(n[i])
    sigma = (alpha - 1.0) / np.sqrt(tail_n)
    neighbours = [alphas[j] for j in (i - 1, i + 1) if 0 <= j < alphas.size]
    delta = max((abs(float(a) - alpha) for a in neighbours if np.isfinite(a)), default=0.0)
    if options.bootstrap_samples > 0 and tail_n >= 2:
        delta = max(
            delta, bootstrap_delta(logs[i:] - logs[i], options.bootstrap_samples, options.seed)
        )
    return PowerLawFit(
        method=method,
        alpha=alpha,
        xmin=xmin,
        xmax=float(data[-1]),
        D=distance,
        n=tail_n,
        sigma=float(sigma),
        alpha_delta=float(delta),
    )


def _fit_tpl(evals: np.ndarray, options: FitOptions) -> PowerLawFit | None:
    """``tpl``: the truncated power law at the ``ww`` fit's xmin (:func:`compare.tpl_fit`)."""
    plain = _fit_ks("ww", evals, options)
    return None if plain is None else compare.tpl_fit(plain, tail_floor(evals, "ww"))


FITTERS: MappingProxyType[FitMethod, Fitter] = MappingProxyType(
    {
        FitMethod.WW: lambda evals, options: _fit_ks("ww", evals, options),
        FitMethod.WW_RELFLOOR: lambda evals, options: _fit_ks("ww_relfloor", evals, options),
        FitMethod.KS2: lambda evals, options: _fit_ks("ks2", evals, options),
        FitMethod.XMIN_PEAK: lambda evals, options: fingers.fit_xmin_peak(
            evals, bootstrap_samples=options.bootstrap_samples, seed=options.seed
        ),
        FitMethod.CLIP_XMAX: lambda evals, options: fingers.fit_clip_xmax(
            evals, bootstrap_samples=options.bootstrap_samples, seed=options.seed
        ),
        FitMethod.TPL: _fit_tpl,
    }
)
"""Each fit method's fitter: the one place a method name meets its code."""


def fit_power_law(
    evals: np.ndarray,
    method: str = "ww",
    *,
    bootstrap_samples: int = 0,
    seed: int = 0,
    device: str | Device | torch.device = "cpu",
) -> PowerLawFit | None:
    """Fit p(λ) ∝ λ^−α to the tail of a spectrum, choosing xmin by the smallest KS distance.

    Parameters
    ----------
    evals : numpy.ndarray, shape (M,)
        Eigenvalues λ_i = σ_i(W)² (any order, float).
    method : {"ww", "ww_relfloor", "ks2", "xmin_peak", "clip_xmax", "tpl"}
        ``ww``: weightwatcher 0.7.7's fit — eigenvalues above 1e-5, every one but the largest an
        xmin candidate, α = 1 + n / Σ ln(λ_j / xmin), D = max_j |1 − (λ_j/xmin)^(1−α) − j/n|
        (j = 0..n−1), D = 1 when α ≤ 1. ``ww_relfloor``: the same above 1e-6·λmax.
        ``ks2``: two-sided KS distance (max of both CDF gaps), otherwise ``ww``.
        ``xmin_peak``, ``clip_xmax``: weightwatcher's ``fix_fingers`` options (:mod:`fingers`).
        ``tpl``: the truncated power law at the ``ww`` fit's xmin (:mod:`compare`).
    bootstrap_samples : int
        Resamples of the tail (with replacement, xmin fixed) to measure stability.
    seed : int
        Seed of the bootstrap.
    device : str, Device or torch.device
        Where the KS pass runs: numpy on the host, torch on the accelerator path.

    Returns
    -------
    PowerLawFit or None
        None when fewer than two eigenvalues lie above the floor. ``alpha_delta`` is the larger
        of the bootstrap's standard deviation of α and the change of α at the neighbouring xmin
        candidates: a value of 0.1 means α is known to about ±0.1.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"unknown fit method {method!r}; choose one of {', '.join(FIT_METHODS)}")
    options = FitOptions(bootstrap_samples=bootstrap_samples, seed=seed, device=device)
    return FITTERS[FitMethod(method)](evals, options)
