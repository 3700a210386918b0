"""Result types of the spectral engine: frozen, typed, failure as a status value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from alphawatch.trust import Thresholds
from alphawatch.vocabulary import FitStatus
from alphawatch.workers.spectral.device import Device

if TYPE_CHECKING:
    import torch

__all__ = ["FitOptions", "FitStatus", "Fitter", "LayerResult", "PowerLawFit", "Thresholds"]


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit of the tail of a spectrum (Clauset, Shalizi & Newman 2009).

    ``alpha`` is the exponent of p(λ) ∝ λ^−α for λ ≥ ``xmin``; ``D`` the Kolmogorov–Smirnov
    distance between the tail and the fitted law (smaller is better); ``n`` the tail size.
    """

    method: str
    alpha: float
    xmin: float
    xmax: float
    D: float
    n: int
    sigma: float
    alpha_delta: float
    num_fingers: int = 0  # clip_xmax: outlying top eigenvalues left out of the fit
    tpl_lambda: float | None = None  # tpl: the truncation rate Λ of x^-α·e^(-Λx)


@dataclass(frozen=True)
class FitOptions:
    """What every fit method takes besides the spectrum: the bootstrap and where the KS pass runs.

    ``device`` is read only by the KS-searching methods (``ww``, ``ww_relfloor``, ``ks2`` and
    ``tpl``'s first step): numpy for ``"cpu"`` and the host, torch on an accelerator device.
    """

    bootstrap_samples: int = 0
    seed: int = 0
    device: str | Device | torch.device = "cpu"


Fitter: TypeAlias = Callable[[np.ndarray, FitOptions], "PowerLawFit | None"]
"""One fit method: eigenvalues (any order) and options in, a fit (or None: too few values) out."""


@dataclass(frozen=True)
class LayerResult:
    """Every spectral metric of one weight matrix; see docs/ARCHITECTURE.md for each field."""

    method: str
    fit_status: FitStatus
    trusted: bool
    error: str | None = None
    rows: int = 0
    cols: int = 0
    num_evals: int = 0
    lambda_max: float | None = None
    alpha: float | None = None
    alpha_weighted: float | None = None
    log_norm: float | None = None
    log_spectral_norm: float | None = None
    stable_rank: float | None = None
    log_alpha_norm: float | None = None
    D: float | None = None
    xmin: float | None = None
    xmax: float | None = None
    num_pl_spikes: int | None = None
    sigma: float | None = None
    entropy: float | None = None
    matrix_rank: int | None = None
    rank_loss: int | None = None
    mp_bulk_max: float | None = None
    mp_sigma: float | None = None
    num_spikes: int | None = None
    mp_softrank: float | None = None
    edge_spikes: int | None = None
    edge_softrank: float | None = None
    num_traps: int | None = None
    rand_distance: float | None = None
    shuffle_traps: int | None = None
    shuffle_distance: float | None = None
    max_rand_eval: float | None = None
    mean_spike: bool = False
    alpha_delta: float | None = None
    correlation_trap: bool = False
    rank_collapse: bool = False
    near_random: bool = False
    over_trained: bool = False
    under_trained: bool = False
    warning: str | None = None
    num_fingers: int | None = None
    tpl_alpha: float | None = None
    tpl_lambda: float | None = None
    pl_vs_tpl_R: float | None = None
    pl_vs_tpl_p: float | None = None
    pl_vs_lognormal_R: float | None = None
    pl_vs_lognormal_p: float | None = None
    crosscheck_diff: float | None = None
    # Which neurons carry a correlation trap (localise.Localisation.as_json); trapped layers only
    trap_localisation: dict[str, Any] | None = field(default=None, compare=False)
    elapsed_ms: float = 0.0
    evals: np.ndarray | None = field(default=None, repr=False, compare=False)
    rand_evals: np.ndarray | None = field(default=None, repr=False, compare=False)

    def metrics(self) -> dict[str, Any]:
        """Every field but the eigenvalue arrays, JSON/DB ready (status as its string)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("evals", "rand_evals")}
        out["fit_status"] = str(self.fit_status.value)
        return out
