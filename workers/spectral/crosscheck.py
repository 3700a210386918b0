"""weightwatcher itself, at run time: the live cross-check and ``analyze --engine weightwatcher``.

Optional: weightwatcher (and powerlaw) come with the ``crosscheck`` extra. Without them
:func:`unavailable` says why and nothing is cross-checked. Methods weightwatcher has no option
for (``ww_relfloor``, ``ks2``, ``tpl``) are not cross-checked; ``xmin_peak`` and ``clip_xmax``
go through powerlaw inside weightwatcher 0.7.7, which works only with powerlaw 1.x.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np

from alphawatch.trust import Thresholds
from alphawatch.vocabulary import FitStatus

if TYPE_CHECKING:
    import torch

WW_OPTIONS: dict[str, dict[str, Any]] = {
    "ww": {},
    "xmin_peak": {"fix_fingers": "xmin_peak", "pl_package": "powerlaw"},
    "clip_xmax": {"fix_fingers": "clip_xmax", "pl_package": "powerlaw"},
}
"""weightwatcher ``analyze()`` options that give each cross-checkable method's numbers."""
_COLUMNS = {  # weightwatcher's details column -> alphawatch's layer field
    "alpha": "alpha",
    "alpha_weighted": "alpha_weighted",
    "log_norm": "log_norm",
    "log_spectral_norm": "log_spectral_norm",
    "stable_rank": "stable_rank",
    "log_alpha_norm": "log_alpha_norm",
    "D": "D",
    "xmin": "xmin",
    "xmax": "xmax",
    "num_pl_spikes": "num_pl_spikes",
    "sigma": "sigma",
    "entropy": "entropy",
    "num_evals": "num_evals",
    "rank_loss": "rank_loss",
    "mp_softrank": "mp_softrank",
    "num_spikes": "num_spikes",
    "max_rand_eval": "max_rand_eval",
    "num_fingers": "num_fingers",
}
_INTEGERS = {"num_pl_spikes", "num_evals", "rank_loss", "num_spikes", "num_fingers"}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def unavailable(method: str) -> str | None:
    """Why ``method`` cannot be cross-checked here, or None when it can."""
    if method not in WW_OPTIONS:
        return f"weightwatcher has no option equal to fit method {method!r}"
    if _version("weightwatcher") is None:
        return (
            "weightwatcher is not installed; install alphawatch[crosscheck] "
            "(weightwatcher==0.7.7) to cross-check"
        )
    powerlaw = _version("powerlaw") or ""
    if WW_OPTIONS[method] and not powerlaw.startswith("1."):
        return (
            f"weightwatcher 0.7.7's fix_fingers needs powerlaw 1.x (installed: "
            f"{powerlaw or 'none'}); method {method!r} is not cross-checked"
        )
    return None


def chosen(key: str, share: float) -> bool:
    """Whether the layer named by ``key`` is in the cross-checked share: a stable hash, so the
    same layers of the same checkpoint are chosen on every machine and every re-analysis."""
    if share <= 0:
        return False
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


def _module(weight: torch.Tensor | np.ndarray) -> torch.nn.Module:
    import torch  # weightwatcher takes a torch module (and imports torch itself)

    w = (
        torch.from_numpy(np.array(weight, dtype=np.float32))
        if isinstance(weight, np.ndarray)
        else weight.detach().to(torch.float32).cpu()
    )
    if w.dim() == 4:
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], (w.shape[2], w.shape[3]), bias=False)
        conv.weight.data = w.clone()
        return torch.nn.Sequential(conv)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    return torch.nn.Sequential(linear)


def weightwatcher_row(weight: torch.Tensor | np.ndarray, method: str = "ww") -> dict[str, Any]:
    """weightwatcher 0.7.7's numbers for one matrix, under alphawatch's field names.

    Raises RuntimeError when it cannot run here (see :func:`unavailable`).
    """
    reason = unavailable(method)
    if reason is not None:
        raise RuntimeError(reason)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    # weightwatcher prints to stdout on import and while it works: keep it off our output.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import weightwatcher

        frame = weightwatcher.WeightWatcher(model=_module(weight)).analyze(**WW_OPTIONS[method])
    row = frame.iloc[0]
    out: dict[str, Any] = {}
    for theirs, ours in _COLUMNS.items():
        if theirs in row and row[theirs] is not None:
            value = float(row[theirs])
            if np.isfinite(value):
                out[ours] = int(value) if ours in _INTEGERS else value
    if "alpha" in out and out["alpha"] == -1:  # weightwatcher's failed fit
        out = {k: v for k, v in out.items() if k not in ("alpha", "D", "xmin", "sigma")}
    return out


def difference(alpha: float | None, reference: dict[str, Any]) -> float | None:
    """Relative difference of ``alpha`` from weightwatcher's; None when either has none."""
    theirs = reference.get("alpha")
    if alpha is None or theirs is None or theirs == 0:
        return None
    return abs(alpha - float(theirs)) / abs(float(theirs))


def status_of(row: dict[str, Any], limits: Thresholds) -> FitStatus:
    """The fit rules alphawatch applies, on weightwatcher's numbers (no bootstrap, no traps)."""
    alpha, n, D = row.get("alpha"), row.get("num_pl_spikes"), row.get("D")
    if alpha is None or n is None or D is None:
        return FitStatus.FAILED
    if row.get("num_evals", limits.min_evals) < limits.min_evals:
        return FitStatus.TOO_FEW_EVALS
    if n < limits.min_tail:
        return FitStatus.TAIL_TOO_SHORT
    if not limits.alpha_min < alpha <= limits.alpha_max:
        return FitStatus.ALPHA_OUT_OF_RANGE
    if limits.max_ks_distance < D:
        return FitStatus.POOR_FIT
    return FitStatus.OK
