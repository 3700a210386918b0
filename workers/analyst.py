"""One checkpoint's analysis, from files to layer and spectrum rows: no database, no settings.

The worker runs it in a child process held to a budget (``workers.budget``); it takes the path
of the run's first checkpoint instead of asking the database for it, so the child never opens a
database connection.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alphawatch.workers.checkpoints import (
    CheckpointError,
    CheckpointVanished,
    Confinement,
    LayerMatrix,
    iter_layers,
)
from alphawatch.workers.checkpoints.errors import printable
from alphawatch.workers.checkpoints.fingerprints import fingerprint
from alphawatch.workers.checkpoints.nested import nested_matrices, nested_widths
from alphawatch.workers.checkpoints.tree import walk
from alphawatch.workers.spectral import (
    FitStatus,
    LayerResult,
    Thresholds,
    analyze_stream,
    crosscheck,
)
from alphawatch.workers.spectral.analysis import Device, host_array

if TYPE_CHECKING:
    import torch

Rows = tuple[list[dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class AnalysisOptions:
    """How to analyse: fit method, thresholds, device, the roots it may read, progress or not,
    how many matrices at once on a CPU (0: one per core, see ``analysis_workers``), traps or
    not."""

    method: str
    thresholds: Thresholds
    device: Device
    confine: Confinement
    progress: bool = False
    optimizer_state: bool = False  # also analyse Adam's exp_avg of each matrix (@exp_avg rows)
    nested_widths: tuple[int, ...] = ()  # first-k-neuron MLP slices (@w<k>); () = the config's
    crosscheck_share: float = 0.0  # share of layers re-analysed with weightwatcher itself
    workers: int = 0  # matrices analysed at once on a CPU (0: one per core, at most 4)
    check_traps: bool = True  # look for correlation traps in the shuffled spectrum


def analyze_checkpoint(path: Path, first: Path | None, options: AnalysisOptions) -> Rows:
    """Read and analyse one checkpoint, tensor by tensor; returns layer and spectrum rows.

    ``first`` is the run's first checkpoint, against which distance from init is measured.
    """
    confine = options.confine
    first_key = _first_key(first, confine)
    share = options.crosscheck_share
    if share > 0 and (reason := crosscheck.unavailable(options.method)) is not None:
        logging.getLogger(__name__).warning("cross-check skipped: %s", reason)
        share = 0.0
    layers: list[dict[str, Any]] = []
    spectra: list[dict[str, Any]] = []
    matrices = ((m, m.weight, m.stored_dtype)
                for m in analysed_matrices(path, options, layers))
    for matrix, result in analyze_stream(
        matrices, workers=options.workers, method=options.method,
        thresholds=options.thresholds, device=options.device, check_traps=options.check_traps,
    ):
        row = result.metrics()
        row.update(
            name=matrix.name, kind=matrix.kind, block=matrix.block,
            dtype=str(matrix.stored_dtype).removeprefix("torch."),
            distance_from_init=_distance(first_key, matrix.name, matrix.weight, confine),
        )
        if crosscheck.chosen(f"{path.name}/{matrix.name}", share):
            row["crosscheck_diff"] = _crosscheck(matrix.weight, result.alpha, options.method)
        layers.append(row)
        spectra.append({
            "name": matrix.name, "method": result.method,
            "evals": _as_bytes(result.evals), "rand_evals": _as_bytes(result.rand_evals),
        })
        if options.progress:
            sys.stderr.write(f"\r  {printable(path.name)}: {len(layers)} layers, "
                             f"{matrix.name[-48:]} alpha={result.alpha or float('nan'):.2f}\x1b[K")
            sys.stderr.flush()
    if options.progress:
        sys.stderr.write("\n")
    if not layers:
        raise ValueError(f"{path}: no weight matrices found")
    return layers, spectra


def analysed_matrices(path: Path, options: AnalysisOptions, rows: list[dict[str, Any]]
                      ) -> Iterator[LayerMatrix]:
    """Every matrix the options ask for: weights, their nested slices, then their exp_avg.

    Optimizer state that cannot be read or named exactly adds one failed row to ``rows``
    (named ``optimizer_state@exp_avg``, its error saying why) instead of failing the checkpoint.
    """
    confine = options.confine
    widths = nested_widths(path, options.nested_widths, confine)
    for matrix in iter_layers(path, confine=confine):
        yield matrix
        yield from nested_matrices(matrix, widths)
    if options.optimizer_state:
        # Imported here: optimizer state is a torch pickle (or DCP); safetensors weights alone
        # are read and analysed without importing torch.
        from alphawatch.workers.checkpoints.optimizer import (
            EXP_AVG,
            iter_exp_avg,
            unit_mean_eigenvalue,
        )

        try:
            for moment in iter_exp_avg(path, confine):
                yield unit_mean_eigenvalue(moment)  # scale-free: see workers.checkpoints.optimizer
        except CheckpointVanished:
            raise
        except CheckpointError as exc:
            rows.append(refused_row(f"optimizer_state@{EXP_AVG}", str(exc), options.method))


def refused_row(name: str, error: str, method: str) -> dict[str, Any]:
    """A failed row recording what could not be analysed, and why."""
    row = LayerResult(method=method, fit_status=FitStatus.FAILED, trusted=False,
                      error=error).metrics()
    row.update(name=name, kind="other", block=None, dtype=None, distance_from_init=None)
    return row


def _crosscheck(weight: torch.Tensor | np.ndarray, alpha: float | None, method: str
                ) -> float | None:
    """Relative alpha difference from weightwatcher's; a failure of weightwatcher is logged,
    never the layer's or the checkpoint's failure."""
    try:
        return crosscheck.difference(alpha, crosscheck.weightwatcher_row(weight, method))
    except Exception as exc:
        logging.getLogger(__name__).warning("cross-check failed: %s: %s",
                                            type(exc).__name__, exc)
        return None


def _as_bytes(values: np.ndarray | None) -> bytes | None:
    if values is None:
        return None
    return np.ascontiguousarray(values, dtype=np.float32).tobytes()


def _first_key(first: Path | None, confine: Confinement) -> tuple[Path, str] | None:
    """The run's first checkpoint and its fingerprint, once per analysis; None when unusable.

    The fingerprint keys the cache of its matrices: a first checkpoint rewritten in place is
    read again rather than compared from memory.
    """
    if first is None or not first.exists() or not confine.allows(first):
        return None
    try:
        return first, fingerprint(first, confine)
    except Exception:  # the first checkpoint is only a reference: whatever it holds, the
        return None    # checkpoint in hand is analysed without a distance from init


def _distance(first: tuple[Path, str] | None, name: str, weight: torch.Tensor | np.ndarray,
              confine: Confinement) -> float | None:
    """‖W_t − W_0‖_F / ‖W_0‖_F against the run's first checkpoint, read one tensor at a time."""
    if first is None:
        return None
    try:
        w0 = _first_weight(first, name, confine)
    except Exception:  # as in _first_key: a broken first checkpoint fails no later one
        return None
    if w0 is None or w0.shape != weight.shape:
        return None
    # numpy on both (a tensor's memory is shared, not copied): no torch needed for safetensors.
    now, then = host_array(weight), host_array(w0)
    norm0 = float(np.linalg.norm(then))
    if norm0 == 0.0:
        return None
    return float(np.linalg.norm(now - then)) / norm0


def _first_weight(key: tuple[Path, str], name: str, confine: Confinement
                  ) -> torch.Tensor | np.ndarray | None:
    first = key[0]
    cache = _FIRST_CACHE.get(key)
    if cache is None:
        if _size(first) > _DISTANCE_MAX_BYTES:
            return None
        # Only matrices are kept, as float32: bounded by the model's size for a small run, and
        # the cache holds one run's first checkpoint at a time.
        cache = {m.name: m.weight for m in iter_layers(first, confine=confine)}
        _FIRST_CACHE.clear()
        _FIRST_CACHE[key] = cache
    return cache.get(name)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(entry.stat(follow_symlinks=False).st_size
               for _, entry in walk(str(path)).files)


# Distance from init keeps the first checkpoint's matrices in memory; past this size it would
# break the "a few times the largest matrix" memory promise, so it is not computed.
_DISTANCE_MAX_BYTES = 256 * 1024 * 1024
_FIRST_CACHE: dict[tuple[Path, str], dict[str, torch.Tensor | np.ndarray]] = {}
