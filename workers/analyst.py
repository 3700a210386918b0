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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alphawatch.locations import ObjectURL
from alphawatch.vocabulary import VARIANT_SEPARATOR, Source
from alphawatch.workers.checkpoints import (
    CheckpointError,
    CheckpointVanished,
    Confinement,
    LayerMatrix,
    iter_layers,
)
from alphawatch.workers.checkpoints.bases import BaseMatrices
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
from alphawatch.workers.spectral.distances import LayerDistance, layer_distance

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
    # Object-store URL prefixes a run may be read from (None: anywhere, as confine's roots).
    url_roots: tuple[str, ...] | None = None
    spool_max_bytes: int = 64 * 1024**3  # pickles/DCP downloaded per object-store analysis
    # Update spectra and distances against other checkpoints: "init" (@delta_init rows),
    # "prev" (@delta_prev rows and layer distances), "distances" (layer distances alone).
    deltas: tuple[str, ...] = ()
    # The worker's folder of local copies of base checkpoints in object storage, and of the
    # checkpoint in hand with "prev" (None: each is read by ranges or spooled at each
    # analysis), and the most bytes they hold.
    base_copies: Path | None = None
    base_copies_bytes: int = 16 * 1024**3

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        confine: Confinement,
        progress: bool = False,
        method: str | None = None,
        url_roots: tuple[str, ...] | None = None,
        base_copies: Path | None = None,
    ) -> AnalysisOptions:
        """The options ``settings`` ask for: the one place analysis reads the settings.

        Args:
            confine: the folders the analysis may read (the worker's allowed roots and run
                folders; anywhere for ``alphawatch analyze``).
            progress: a live line per layer on stderr.
            method: a fit method other than ``settings.fit_method`` (``analyze --method``).
            url_roots: the object-store prefixes runs may be read from (None: anywhere).
            base_copies: where the base checkpoints of a run in object storage are kept whole
                for ``deltas`` "init" (the first checkpoint) and "prev" / "distances" (the
                checkpoint in hand, the next one's base) (the worker's; None: read by ranges
                each time).

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
            url_roots=url_roots,
            spool_max_bytes=int(settings.spool_max_mb * 1024 * 1024),
            deltas=tuple(settings.deltas),
            base_copies=base_copies,
            base_copies_bytes=int(settings.base_cache_mb * 1024 * 1024),
        )

    @property
    def reads_previous(self) -> bool:
        """Whether the analysis reads the checkpoint before the one in hand (by step)."""
        return bool({"prev", "distances"} & set(self.deltas))


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
    distance: LayerDistance | None = None  # against the checkpoint before (or analyze's base)


@dataclass(frozen=True, slots=True)
class Analysis:
    """Every analysed layer of one checkpoint, in reading order."""

    layers: tuple[AnalysedLayer, ...]
    base_read_s: float = 0.0  # seconds spent reading base checkpoints (update spectra)
    base_error: str | None = None  # why a base checkpoint could not be read, if one could not


def analyze_checkpoint(
    path: Path | ObjectURL,
    first: Path | ObjectURL | None,
    options: AnalysisOptions,
    *,
    prev: Path | ObjectURL | None = None,
    newest: bool = True,
) -> Analysis:
    """Read and analyse one checkpoint, tensor by tensor (the worker's analysis).

    ``first`` is the run's first checkpoint, against which distance from init (and, with
    ``deltas`` "init", the update spectra ``@delta_init``) is measured; ``prev`` the checkpoint
    before it by step, for ``@delta_prev`` and the layer distances. Any of them may be an
    object-store URL: it is read through a mirror of its objects
    (:func:`~alphawatch.workers.checkpoints.objects.staged`) by the same readers. ``newest``:
    no later checkpoint of the run is known, so this one will be the next one's ``prev``.

    Raises:
        ValueError: the checkpoint holds no weight matrix.
    """
    if any(isinstance(place, ObjectURL) for place in (path, first, prev)):
        return _analyze_objects(path, first, options, prev=prev, newest=newest)
    assert not isinstance(path, ObjectURL)
    assert not isinstance(first, ObjectURL) and not isinstance(prev, ObjectURL)
    bases = base_readers(path, options, first=first, prev=prev)
    try:
        layers = analysed_layers(path, first, options, bases=bases)
    finally:
        for reader in bases.values():
            reader.close()
    if not layers:
        raise ValueError(f"{path}: no weight matrices found")
    errors = [f"{v}: {r.error}" for v, r in bases.items() if r.error is not None]
    return Analysis(
        tuple(layers),
        base_read_s=sum(r.read_s for r in bases.values()),
        base_error="; ".join(errors) or None,
    )


def base_readers(
    path: Path,
    options: AnalysisOptions,
    *,
    first: Path | None = None,
    prev: Path | None = None,
    base: Path | None = None,
) -> dict[str, BaseMatrices]:
    """The base checkpoints the options ask to compare with, by the variant they make.

    ``base`` (``analyze --base``) makes ``delta`` rows and distances; ``first`` makes
    ``delta_init`` rows with ``deltas`` "init"; ``prev`` makes ``delta_prev`` rows with "prev"
    and distances with "prev" or "distances". A base that is the checkpoint itself, does not
    exist, or lies outside the allowed roots is left out: it is a reference, never the work.
    """
    wanted = {
        Source.DELTA.value: base,
        Source.DELTA_INIT.value: first if "init" in options.deltas else None,
        Source.DELTA_PREV.value: prev if options.reads_previous else None,
    }
    readers: dict[str, BaseMatrices] = {}
    for variant, other in wanted.items():
        if other is None or not other.exists() or not options.confine.allows(other):
            continue
        if other.resolve() == path.resolve():
            continue
        readers[variant] = BaseMatrices(other, options.confine)
    return readers


def _analyze_objects(
    path: Path | ObjectURL,
    first: Path | ObjectURL | None,
    options: AnalysisOptions,
    *,
    prev: Path | ObjectURL | None = None,
    newest: bool = True,
) -> Analysis:
    """:func:`analyze_checkpoint` of a checkpoint (or first checkpoint) in object storage;
    errors name the URLs, never the mirror's temporary folder.

    The base checkpoints are read from the worker's local copies (each downloaded once): with
    ``deltas`` "init" the first checkpoint; with "prev" or "distances" the previous one, which
    the analysis before copied as the checkpoint in hand, as this one copies itself for the
    next (it is read whole anyway: the same bytes, one read from the bucket per checkpoint).
    """
    from alphawatch.workers.checkpoints.objects import local_copies, staged

    init = first if "init" in options.deltas and isinstance(first, ObjectURL) else None
    # The checkpoint in hand is copied for the next analysis only when it is the run's newest:
    # a backfilled one is seldom the next analysis's base, and its copy would push out the
    # newest's, which the next new checkpoint compares with.
    later = (prev, path if newest else None) if options.reads_previous else ()
    copied = tuple(u for u in (init, *later) if isinstance(u, ObjectURL))
    with staged(
        [
            path if isinstance(path, ObjectURL) else None,
            first if isinstance(first, ObjectURL) else None,
            prev if isinstance(prev, ObjectURL) else None,
        ],
        options.confine,
        options.url_roots,
        options.spool_max_bytes,
        copies=local_copies(options.base_copies, options.base_copies_bytes) if copied else None,
        copied=copied,
        # The previous checkpoint will not be a base again, unless it is the init base.
        spent=prev if isinstance(prev, ObjectURL) and prev != init else None,
    ) as (roots, confine, mirrors):
        local = roots[0] if isinstance(path, ObjectURL) else path
        local_first = roots[1] if isinstance(first, ObjectURL) else first
        local_prev = roots[2] if isinstance(prev, ObjectURL) else prev
        assert local is not None
        try:
            analysis = analyze_checkpoint(
                local, local_first, replace(options, confine=confine), prev=local_prev
            )
        except CheckpointError as exc:
            raise type(exc)(
                path if isinstance(path, Path) else Path(path.name), mirrors.shown(str(exc))
            ) from exc
        except ValueError as exc:
            raise ValueError(mirrors.shown(str(exc))) from exc
        layers = tuple(
            replace(layer, result=replace(layer.result, error=mirrors.shown(layer.result.error)))
            if layer.result.error
            else layer
            for layer in analysis.layers
        )
        base_error = analysis.base_error
        return Analysis(
            layers,
            base_read_s=analysis.base_read_s,
            base_error=None if base_error is None else mirrors.shown(base_error),
        )


def analysed_layers(
    path: Path,
    first: Path | None,
    options: AnalysisOptions,
    *,
    bases: dict[str, BaseMatrices] | None = None,
) -> list[AnalysedLayer]:
    """Every layer of one checkpoint the options ask for, analysed, in reading order.

    ``bases`` (from :func:`base_readers`) add update-spectrum rows ``<layer>@<variant>`` after
    each weight matrix, and distances to the weight rows.
    """
    confine = options.confine
    bases = bases or {}
    first_key = None if Source.DELTA_INIT.value in bases else _first_key(first, confine)
    compared = _Compared()
    share = options.crosscheck_share
    if share > 0 and (reason := crosscheck.unavailable(options.method)) is not None:
        logging.getLogger(__name__).warning("cross-check skipped: %s", reason)
        share = 0.0
    # Refused optimizer state joins this list while the engine still works on earlier matrices
    # (see analysed_matrices): the order the worker stores and ``analyze`` prints.
    layers: list[AnalysedLayer] = []
    for matrix, result in analyze_stream(
        _stream_items(analysed_matrices(path, options, layers, bases=bases, compared=compared)),
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
                distance_from_init=(
                    compared.from_init.pop(matrix.name, None)
                    if first_key is None
                    else _distance(first_key, matrix.name, matrix.weight, confine)
                ),
                result=replace(result, evals=None, rand_evals=None),
                evals=_as_bytes(result.evals),
                rand_evals=_as_bytes(result.rand_evals),
                distance=compared.distances.pop(matrix.name, None),
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
    if compared.distances or compared.from_init:
        # Analysed one at a time, a weight's result comes back before its update spectra (and
        # with them its comparisons) are read from the stream: they join its layer here.
        layers = [_compared(layer, compared) for layer in layers]
    return layers


def _compared(layer: AnalysedLayer, compared: _Compared) -> AnalysedLayer:
    """``layer`` with the comparisons found after it was analysed."""
    if layer.name in compared.distances:
        layer = replace(layer, distance=compared.distances.pop(layer.name))
    if layer.name in compared.from_init:
        layer = replace(layer, distance_from_init=compared.from_init.pop(layer.name))
    return layer


def _stream_items(
    matrices: Iterator[LayerMatrix],
) -> Iterator[tuple[LayerMatrix, torch.Tensor | np.ndarray, object]]:
    """``analyze_stream``'s items, each released here before the next is read."""
    for matrix in matrices:
        yield matrix, matrix.weight, matrix.stored_dtype
        del matrix


@dataclass
class _Compared:
    """What comparing each weight matrix with its bases found, by the weight's name, until the
    analysed layer takes it."""

    distances: dict[str, LayerDistance] = field(default_factory=dict)
    from_init: dict[str, float | None] = field(default_factory=dict)


def analysed_matrices(
    path: Path,
    options: AnalysisOptions,
    refused: list[AnalysedLayer],
    *,
    bases: dict[str, BaseMatrices] | None = None,
    compared: _Compared | None = None,
) -> Iterator[LayerMatrix]:
    """Every matrix the options ask for: weights, their nested slices and update spectra
    (``@delta``, ``@delta_init``, ``@delta_prev`` against ``bases``), then their exp_avg.

    Optimizer state that cannot be read or named exactly adds one failed layer to ``refused``
    (named ``optimizer_state@exp_avg``, its error saying why) instead of failing the checkpoint.
    """
    confine = options.confine
    bases = bases or {}
    compared = compared if compared is not None else _Compared()
    widths = nested_widths(path, options.nested_widths, confine)
    for matrix in iter_layers(path, confine=confine):
        yield matrix
        yield from nested_matrices(matrix, widths)
        yield from _updates(matrix, bases, options, compared)
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


def _updates(
    matrix: LayerMatrix,
    bases: dict[str, BaseMatrices],
    options: AnalysisOptions,
    compared: _Compared,
) -> Iterator[LayerMatrix]:
    """The update spectra ΔW = W − W_base of one weight matrix, one per base that has it.

    Each base matrix is read when its turn comes and released with ΔW: a base is never held
    whole. A layer the base lacks, or holds in another shape, has no update row.
    """
    for variant, reader in bases.items():
        then = reader.take(matrix.name)
        if then is None or tuple(then.shape) != tuple(matrix.weight.shape):
            continue
        now_array, then_array = host_array(matrix.weight), host_array(then)
        if variant == Source.DELTA_INIT.value:
            norm0 = float(np.linalg.norm(then_array))
            compared.from_init[matrix.name] = (
                float(np.linalg.norm(now_array - then_array)) / norm0 if norm0 > 0 else None
            )
        if variant != Source.DELTA_INIT.value and now_array.ndim == 2:
            compared.distances[matrix.name] = layer_distance(now_array, then_array)
        if variant == Source.DELTA_PREV.value and "prev" not in options.deltas:
            continue  # read for the distances alone
        delta = np.subtract(now_array, then_array, dtype=np.float32)
        del then, then_array
        yield LayerMatrix(
            f"{matrix.name}{VARIANT_SEPARATOR}{variant}",
            matrix.kind,
            matrix.block,
            delta,
            matrix.stored_dtype,
            matrix.source,
        )


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
