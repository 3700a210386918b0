"""What the analysis hands to storage: every field of the engine is a column, and stays one.

``results.complete`` used to drop any key that was not a column, so a metric added to the engine
without a column (or a misspelt one) vanished without a word. The row is typed now and a field
without a column is refused, naming it.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import select

from alphawatch.service.db import queue, registry, results
from alphawatch.service.db.models import LAYER_COLUMNS, LayerMetric, Spectrum
from alphawatch.service.db.rows import LAYER_ROW_FIELDS, LayerRow, UnknownColumns
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint, refused_layer
from alphawatch.workers.checkpoints import UNCONFINED
from alphawatch.workers.spectral import LayerResult
from alphawatch.workers.spectral.distances import LayerDistance
from alphawatch.workers.watcher import stored_rows

# Fields of the engine's result that are deliberately no layer_metric column: the eigenvalue
# arrays, kept as float32 bytes in the spectrum table (SpectrumRow) for ESD plots and re-fits.
NOT_COLUMNS = frozenset({"evals", "rand_evals"})
# Columns the worker adds from where the matrix sits and the run's first checkpoint.
PLACE = frozenset({"name", "kind", "block", "dtype", "distance_from_init"})
# Columns the worker adds from the layer's distance to the checkpoint before, and its step.
MOVED = frozenset({f.name for f in fields(LayerDistance)} | {"change_ref_step"})


def test_every_engine_field_is_a_layer_metric_column() -> None:
    engine = {f.name for f in fields(LayerResult)}
    assert engine >= NOT_COLUMNS, "a field named here as not stored is gone: drop it from here"
    missing = engine - NOT_COLUMNS - LAYER_COLUMNS
    assert not missing, (
        f"LayerResult fields without a layer_metric column: {sorted(missing)}; add the column "
        "(service/db/models.py, a migration, LayerRow) or list the field in NOT_COLUMNS"
    )
    # The row type is the table: nothing more, nothing less; and nothing but the engine's
    # fields and the matrix's place in the model.
    assert LAYER_ROW_FIELDS == LAYER_COLUMNS
    assert (engine - NOT_COLUMNS) | PLACE | MOVED == LAYER_COLUMNS


def test_a_field_without_a_column_is_refused_by_name() -> None:
    row = {"name": "model.layers.0.mlp.up_proj", "fit_status": "ok", "alpha": 3.0}
    assert LayerRow.from_mapping(row) == LayerRow(
        name="model.layers.0.mlp.up_proj", fit_status="ok", alpha=3.0
    )
    with pytest.raises(
        UnknownColumns,
        match=r"'model.layers.0.mlp.up_proj': alpah, shape "
        r"are not layer_metric columns",
    ):
        LayerRow.from_mapping({**row, "alpah": 3.1, "shape": [4, 4]})
    with pytest.raises(UnknownColumns, match="rand_evals is not a layer_metric column"):
        LayerRow.from_mapping({**row, "rand_evals": b""})


def test_stored_rows_hold_every_value_the_engine_computed(tmp_path: Path, db_url: str) -> None:
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "model.safetensors"
    save_file(
        {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(200, 80, generator=g)
            for i in range(2)
        },
        str(path),
    )
    options = AnalysisOptions.from_settings(Settings(device="cpu"), confine=UNCONFINED)
    before = tmp_path / "before.safetensors"
    save_file(
        {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(200, 80, generator=g)
            for i in range(2)
        },
        str(before),
    )
    distances = AnalysisOptions.from_settings(
        Settings(device="cpu", deltas="prev"), confine=UNCONFINED
    )
    layers = [
        *analyze_checkpoint(path, path, options).layers,
        refused_layer("optimizer_state@exp_avg", "unreadable", "ww"),
    ]
    moved = analyze_checkpoint(path, path, distances, prev=before).layers
    # The weights' rows, now with distances from the checkpoint before, and the update rows.
    assert [x.name for x in moved][::2] == [x.name for x in layers[:2]]
    layers = [*moved, layers[2]]
    rows, spectra = stored_rows(layers, ref_step=0)
    assert [s.name for s in spectra] == [x.name for x in layers[:4]]  # none for the refusal

    engine = make_engine(db_url)
    with session_scope(engine) as session:
        run_id = registry.ensure_run(session, name="r", path=str(tmp_path))
        registry.register_checkpoint(
            session, run_id=run_id, step=1, path=str(path), fingerprint="f", fmt="safetensors"
        )
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=60)
    assert job is not None
    with session_scope(engine) as session:
        assert results.complete(
            session,
            job_id=job.job_id,
            worker_id="w",
            layers=rows,
            spectra=spectra,
            device="cpu",
            elapsed_s=0.1,
            thresholds=options.thresholds,
        )
    with session_scope(engine) as session:
        stored = {m.name: m for m in session.scalars(select(LayerMetric))}
        kept = {m.name: s for m, s in session.execute(select(LayerMetric, Spectrum).join(Spectrum))}
        assert set(stored) == {x.name for x in layers} and set(kept) == set(stored) - {
            "optimizer_state@exp_avg"
        }
        for layer in layers:
            row = stored[layer.name]
            want = {
                **layer.result.metrics(),
                "name": layer.name,
                "kind": layer.kind,
                "block": layer.block,
                "dtype": layer.dtype,
                "distance_from_init": layer.distance_from_init,
                **(
                    {k: getattr(layer.distance, k) for k in MOVED - {"change_ref_step"}}
                    | {"change_ref_step": 0}
                    if layer.distance is not None
                    else dict.fromkeys(MOVED)
                ),
            }
            assert (layer.distance is not None) == ("@" not in layer.name)
            for column in LAYER_COLUMNS:
                got = getattr(row, column)
                if isinstance(got, float) and math.isnan(got):
                    assert math.isnan(want[column]), (layer.name, column)
                else:
                    assert got == want[column], (layer.name, column)
            if layer.evals is not None:
                assert kept[layer.name].evals == layer.evals
                assert kept[layer.name].rand_evals == layer.rand_evals
