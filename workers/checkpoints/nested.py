"""Nested sub-model spectra: MLP matrices cut to their first k intermediate neurons.

A MatFormer-style model (one Llama whose MLP's first k intermediate neurons form a smaller
model, after the neurons were permuted by importance) trains every width at once. Each nested
sub-model's MLP is the full one sliced: gate and up keep their first k rows (the neurons are
their outputs), down keeps its first k columns (its inputs). The slices are analysed as rows
named ``<layer>@w<k>``, kind and block as the layer's.

Widths come from ``--nested-widths`` / ``ALPHAWATCH_NESTED_WIDTHS`` or, when those name none,
from the model's ``config.json`` key ``nested_widths`` (a list of positive integers). A width at
or beyond the layer's intermediate size is the full matrix, which is analysed already: skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from alphawatch.vocabulary import VARIANT_SEPARATOR, Kind, nested_variant
from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import CheckpointError
from alphawatch.workers.checkpoints.files import LayerMatrix, model_config

CONFIG_KEY = "nested_widths"
# Matrices whose rows are the intermediate neurons, and those whose columns are.
NEURON_ROWS = frozenset({Kind.GATE.value, Kind.UP.value, Kind.FC_IN.value})
NEURON_COLUMNS = frozenset({Kind.DOWN.value, Kind.FC_OUT.value})


def widths_from_config(config: Mapping[str, object]) -> tuple[int, ...]:
    """The nested widths a model's config names under ``nested_widths``; () when none or bad."""
    value = config.get(CONFIG_KEY)
    if not isinstance(value, list):
        return ()
    if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in value):
        return ()
    return tuple(sorted(set(value)))


def nested_widths(
    path: Path, explicit: Iterable[int] = (), confine: Confinement = UNCONFINED
) -> tuple[int, ...]:
    """The widths to analyse a checkpoint at: ``explicit`` ones, else its config's."""
    chosen = tuple(sorted(set(explicit)))
    if chosen:
        return chosen
    try:
        config = model_config(path if path.is_dir() else path.parent, confine)
    except CheckpointError:
        return ()  # an unreadable config names no widths; the weights' reader says why
    return widths_from_config(config)


def nested_matrices(matrix: LayerMatrix, widths: Iterable[int]) -> Iterator[LayerMatrix]:
    """The first-k-neuron slices of an MLP matrix, one per width below its intermediate size.

    Gate, up and plain-MLP input matrices (intermediate, hidden) keep their first k rows; down
    and plain-MLP output matrices (hidden, intermediate) their first k columns. Other kinds
    yield nothing.
    """
    if matrix.weight.ndim != 2 or matrix.kind not in NEURON_ROWS | NEURON_COLUMNS:
        return
    rows = matrix.kind in NEURON_ROWS
    neurons = matrix.weight.shape[0 if rows else 1]
    for width in sorted(set(widths)):
        if not 0 < width < neurons:
            continue
        piece = matrix.weight[:width] if rows else matrix.weight[:, :width]
        yield replace(
            matrix,
            name=f"{matrix.name}{VARIANT_SEPARATOR}{nested_variant(width)}",
            weight=np.ascontiguousarray(piece)
            if isinstance(piece, np.ndarray)
            else piece.contiguous(),
        )
