"""What the analysis hands to storage: every field of the engine is a column, and stays one.

``queue.complete`` used to drop any key that was not a column, so a metric added to the engine
without a column (or a misspelt one) vanished without a word. The row is typed now and a field
without a column is refused, naming it.
"""

from __future__ import annotations

from dataclasses import fields

import pytest

from alphawatch.service.db.models import LAYER_COLUMNS
from alphawatch.service.db.rows import LAYER_ROW_FIELDS, LayerRow, UnknownColumns
from alphawatch.workers.spectral import LayerResult

# Fields of the engine's result that are deliberately no layer_metric column: the eigenvalue
# arrays, kept as float32 bytes in the spectrum table (SpectrumRow) for ESD plots and re-fits.
NOT_COLUMNS = frozenset({"evals", "rand_evals"})
# Columns the worker adds from where the matrix sits and the run's first checkpoint.
PLACE = frozenset({"name", "kind", "block", "dtype", "distance_from_init"})


def test_every_engine_field_is_a_layer_metric_column() -> None:
    engine = {f.name for f in fields(LayerResult)}
    assert engine >= NOT_COLUMNS, "a field named here as not stored is gone: drop it from here"
    missing = engine - NOT_COLUMNS - LAYER_COLUMNS
    assert not missing, (
        f"LayerResult fields without a layer_metric column: {sorted(missing)}; add the column "
        "(service/db/models.py, a migration, LayerRow) or list the field in NOT_COLUMNS")
    # The row type is the table: nothing more, nothing less; and nothing but the engine's
    # fields and the matrix's place in the model.
    assert LAYER_ROW_FIELDS == LAYER_COLUMNS
    assert (engine - NOT_COLUMNS) | PLACE == LAYER_COLUMNS


def test_a_field_without_a_column_is_refused_by_name() -> None:
    row = {"name": "model.layers.0.mlp.up_proj", "fit_status": "ok", "alpha": 3.0}
    assert LayerRow.from_mapping(row) == LayerRow(name="model.layers.0.mlp.up_proj",
                                                  fit_status="ok", alpha=3.0)
    with pytest.raises(UnknownColumns, match=r"'model.layers.0.mlp.up_proj': alpah, shape "
                                             r"are not layer_metric columns"):
        LayerRow.from_mapping({**row, "alpah": 3.1, "shape": [4, 4]})
    with pytest.raises(UnknownColumns, match="rand_evals is not a layer_metric column"):
        LayerRow.from_mapping({**row, "rand_evals": b""})
