"""One checkpoint's analysis, from files to analysed layers: no database.

The worker runs it in a child process held to a budget (``workers.budget``); it takes the path
of the run's first checkpoint instead of asking the database for it, so the child never opens a
database connection. ``alphawatch analyze`` runs the same loop in its own process. Settings are
read once, by :meth:`AnalysisOptions.from_settings`; everything below receives the options.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

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
from alphawatch.workers.spectral.analysis import Device, host_array, resolve_device

if TYPE_CHECKING:
    import torch

    from alphawatch.settings import Settings


@dataclass(frozen=True, slots=True)
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

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        confine: Confinement,
        progress: bool = False,
        method: str | None = None,
    ) -> AnalysisOptions:
        """The options ``settings`` ask for: the one place analysis reads the settings.

        Args:
            confine: the folders the analysis may read (the worker's allowed roots and run
                folders; anywhere for ``alphawatch analyze``).
            progress: a live line per layer on stderr.
            method: a fit method other than ``settings.fit_method`` (``analyze --method``).

        Raises:
            ValueError: the settings ask for a CUDA device this machine does not have.
        """
        return cls(
            method=method or settings.fit_method,
            thresholds=settings.trust,
            device=resolve_device(settings.device),
            confine=confine,
            progress=progress,
            optimizer_state=settings.optimizer_state,
            nested_widths=tuple(settings.nested_widths),
            crosscheck_share=settings.crosscheck.share,
            workers=settings.analysis_workers,
            check_traps=settings.check_traps,
        )


@dataclass(frozen=True, slots=True)
class AnalysedLayer:
    """One analysed matrix: where it sits in the model, and what the engine found in it.

    A row that names no matrix (optimizer state that could not be read) has no ``shape`` and a
    failed ``result`` saying why.
    """

    name: str
    kind: str
    block: int | None
    dtype: str | None  # as stored in the checkpoint ("bfloat16"), before any upcast
    shape: tuple[int, ...] | None
    distance_from_init: float | None  # ‖W − W_0‖_F / ‖W_0‖_F; None without a first checkpoint
    result: LayerResult  # without its eigenvalue arrays: they travel as ``evals`` below
    evals: bytes | None = None  # float32, as the spectrum table keeps them
    rand_evals: bytes | None = None


@dataclass(frozen=True, slots=True)
class Analysis:
    """Every analysed layer of one checkpoint, in reading order."""

    layers: tuple[AnalysedLayer, ...]


def analyze_checkpoint(path: Path, first: Path | None, options: AnalysisOptions) -> Analysis:
    """Read and analyse one checkpoint, tensor by tensor (the worker's analysis).

    ``first`` is the run's first checkpoint, against which distance from init is measured.

    Raises:
        ValueError: the checkpoint holds no weight matrix.
    """
    layers = analysed_layers(path, first, options)
    if not layers:
        raise ValueError(f"{path}: no weight matrices found")
    return Analysis(tuple(layers))


def analysed_layers(
    path: Path, first: Path | None, options: AnalysisOptions
) -> list[AnalysedLayer]:
    """Every layer of one checkpoint the options ask for, analysed, in reading order."""
    confine = options.confine
    first_key = _first_key(first, confine)
    share = options.crosscheck_share
    if share > 0 and (reason := crosscheck.unavailable(options.method)) is not None:
        logging.getLogger(__name__).warning("cross-check skipped: %s", reason)
        share = 0.0
    # Refused optimizer state joins this list while the engine still works on earlier matrices
    # (see analysed_matrices): the order the worker stores and ``analyze`` prints.
    layers: list[AnalysedLayer] = []
    for matrix, result in analyze_stream(
        _stream_items(analysed_matrices(path, options, layers)),
        workers=options.workers,
        method=options.method,
        thresholds=options.thresholds,
        device=options.device,
        check_traps=options.check_traps,
    ):
        if crosscheck.chosen(f"{path.name}/{matrix.name}", share):
            result = replace(
                result, crosscheck_diff=_crosscheck(matrix.weight, result.alpha, options.method)
            )
        layers.append(
            AnalysedLayer(
                name=matrix.name,
                kind=matrix.kind,
                block=matrix.block,
                dtype=str(matrix.stored_dtype).removeprefix("torch."),
                shape=tuple(matrix.weight.shape),
                distance_from_init=_distance(first_key, matrix.name, matrix.weight, confine),
                result=replace(result, evals=None, rand_evals=None),
                evals=_as_bytes(result.evals),
                rand_evals=_as_bytes(result.rand_evals),
            )
        )
        if options.progress:
            sys.stderr.write(
                f"\r  {printable(path.name)}: {len(layers)} layers, "
                f"{matrix.name[-48:]} alpha={result.alpha or float('nan'):.2f}\x1b[K"
            )
            sys.stderr.flush()
        # Dropped before the stream reads the next matrix: while it reads, the previous one's
        # float32 values are held nowhere (bench/bench_scale.py measures the peak).
        del matrix, result
    if options.progress:
        sys.stderr.write("\n")
    return layers


def _stream_items(
    matrices: Iterator[LayerMatrix],
) -> Iterator[tuple[LayerMatrix, torch.Tensor | np.ndarray, object]]:
    """``analyze_stream``'s items, each released here before the next is read."""
    for matrix in matrices:
        yield matrix, matrix.weight, matrix.stored_dtype
        del matrix


def analysed_matrices(
    path: Path, options: AnalysisOptions, refused: list[AnalysedLayer]
) -> Iterator[LayerMatrix]:
    """Every matrix the options ask for: weights, their nested slices, then their exp_avg.

    Optimizer state that cannot be read or named exactly adds one failed layer to ``refused``
    (named ``optimizer_state@exp_avg``, its error saying why) instead of failing the checkpoint.
    """
    confine = options.confine
    widths = nested_widths(path, options.nested_widths, confine)
    for matrix in iter_layers(path, confine=confine):
        yield matrix
        yield from nested_matrices(matrix, widths)
        del matrix  # not held while the next is read
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
            refused.append(refused_layer(f"optimizer_state@{EXP_AVG}", str(exc), options.method))


def refused_layer(name: str, error: str, method: str) -> AnalysedLayer:
    """A failed layer recording what could not be analysed, and why."""
    result = LayerResult(method=method, fit_status=FitStatus.FAILED, trusted=False, error=error)
    return AnalysedLayer(
        name=name,
        kind="other",
        block=None,
        dtype=None,
        shape=None,
        distance_from_init=None,
        result=result,
    )


def _crosscheck(
    weight: torch.Tensor | np.ndarray, alpha: float | None, method: str
) -> float | None:
    """Relative alpha difference from weightwatcher's; a failure of weightwatcher is logged,
    never the layer's or the checkpoint's failure."""
    try:
        return crosscheck.difference(alpha, crosscheck.weightwatcher_row(weight, method))
    except Exception as exc:
        logging.getLogger(__name__).warning("cross-check failed: %s: %s", type(exc).__name__, exc)
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
        return None  # checkpoint in hand is analysed without a distance from init


def _distance(
    first: tuple[Path, str] | None,
    name: str,
    weight: torch.Tensor | np.ndarray,
    confine: Confinement,
) -> float | None:
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


def _first_weight(
    key: tuple[Path, str], name: str, confine: Confinement
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
    return sum(entry.stat(follow_symlinks=False).st_size for _, entry in walk(str(path)).files)


# Distance from init keeps the first checkpoint's matrices in memory; past this size it would
# break the "a few times the largest matrix" memory promise, so it is not computed.
_DISTANCE_MAX_BYTES = 256 * 1024 * 1024
_FIRST_CACHE: dict[tuple[Path, str], dict[str, torch.Tensor | np.ndarray]] = {}
