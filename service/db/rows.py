"""What an analysis hands to storage: one typed row per ``layer_metric`` and ``spectrum`` row.

The worker builds them from the engine's ``LayerResult`` (this package may not import the
engine); ``results.complete`` stores them. A name that is not a column is an error here, never
dropped on the way: a field the engine adds without a column would otherwise vanish silently.
``tests/service/test_layer_rows.py`` holds the fields equal to the table's columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class UnknownColumns(ValueError):
    """A layer row named fields that ``layer_metric`` has no column for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerRow:
    """One ``layer_metric`` row: a matrix's place in the model and every metric of its fit.

    The defaults are the columns' own, so a row that leaves a field out stores what the table
    would have stored. See ``models.LayerMetric`` and docs/ARCHITECTURE.md for each field.
    """

    name: str
    fit_status: str
    kind: str = "other"
    block: int | None = None
    dtype: str | None = None
    method: str = "ww"
    trusted: bool = False
    error: str | None = None
    rows: int | None = None
    cols: int | None = None
    num_evals: int | None = None
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
    elapsed_ms: float | None = None
    distance_from_init: float | None = None
    num_fingers: int | None = None
    tpl_alpha: float | None = None
    tpl_lambda: float | None = None
    pl_vs_tpl_R: float | None = None
    pl_vs_tpl_p: float | None = None
    pl_vs_lognormal_R: float | None = None
    pl_vs_lognormal_p: float | None = None
    crosscheck_diff: float | None = None
    change_fro: float | None = None
    change_spectral: float | None = None
    subspace_overlap: float | None = None
    overlap_k: int | None = None
    change_ref_step: int | None = None
    trap_localisation: str | None = None  # JSON text

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LayerRow:
        """The row of ``values``, keyed by column name (a ``trap_localisation`` mapping becomes
        its JSON text).

        Raises:
            UnknownColumns: ``values`` names a field that is not a ``layer_metric`` column.
        """
        unknown = sorted(set(values) - LAYER_ROW_FIELDS)
        if unknown:
            verb = (
                "is not a layer_metric column"
                if len(unknown) == 1
                else ("are not layer_metric columns")
            )
            raise UnknownColumns(
                f"layer {values.get('name')!r}: {', '.join(unknown)} {verb} (add the column "
                "and a migration, or leave the field out of the row)"
            )
        localisation = values.get("trap_localisation")
        if isinstance(localisation, Mapping):
            # the engine's JSON-ready dict, stored as JSON text (one column, trapped layers only)
            values = {**values, "trap_localisation": json.dumps(localisation, allow_nan=False)}
        return cls(**values)

    def values(self) -> dict[str, Any]:
        """Every column's value by name, as ``LayerMetric(**...)`` and the statistics read it."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}


@dataclass(frozen=True, slots=True, kw_only=True)
class SpectrumRow:
    """The eigenvalues of the layer row with this ``name`` and ``method``, as float32 bytes."""

    name: str
    method: str = "ww"
    evals: bytes | None = None
    rand_evals: bytes | None = None  # of the shuffled matrix (the trap search); None: not run


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LayerRow))
LAYER_ROW_FIELDS = frozenset(_FIELD_NAMES)
"""The fields of :class:`LayerRow`: the ``layer_metric`` columns an analysis writes."""
