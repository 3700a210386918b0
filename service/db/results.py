"""Writing a job's results: every layer row, spectrum and statistic, and the job completed.

One transaction per checkpoint, so a reader sees it either not analysed or complete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from alphawatch.service.db.aggregates import block_stat_rows, stat_rows, weight_rows
from alphawatch.service.db.alerts import GateCheck, record_verdict
from alphawatch.service.db.models import (
    BlockStat,
    Checkpoint,
    CheckpointStat,
    LayerMetric,
    Spectrum,
)
from alphawatch.service.db.queue import Event, held, move
from alphawatch.service.db.rows import LayerRow, SpectrumRow
from alphawatch.service.db.session import is_connection_error, utcnow
from alphawatch.trust import Thresholds

log = logging.getLogger("alphawatch.queue")


def complete(
    session: Session,
    *,
    job_id: int,
    worker_id: str,
    layers: Sequence[LayerRow],
    spectra: Sequence[SpectrumRow],
    device: str,
    elapsed_s: float,
    thresholds: Thresholds,
    gate: GateCheck | None = None,
) -> bool:
    """Write every layer row, spectrum, robust statistic (whole model and per block) and the
    checkpoint summary at once.

    One transaction: a reader sees the checkpoint either not analysed or complete. Re-analysis
    replaces earlier rows of the same checkpoint and method. With ``gate``, the run's gate
    verdict is recorded in the same transaction, and an alert queued when it changed
    (:mod:`alphawatch.service.db.alerts`). Returns False (and writes nothing) when the lease was
    lost to another worker.
    """
    job = held(session, job_id, worker_id)
    if job is None:
        return False
    checkpoint_id = job.checkpoint_id
    methods = {layer.method for layer in layers}
    session.execute(
        delete(LayerMetric).where(
            LayerMetric.checkpoint_id == checkpoint_id, LayerMetric.method.in_(methods)
        )
    )
    for kept in (CheckpointStat, BlockStat):
        session.execute(
            delete(kept).where(kept.checkpoint_id == checkpoint_id, kept.method.in_(methods))
        )
    by_name = {(s.name, s.method): s for s in spectra}
    values = [layer.values() for layer in layers]
    for layer, columns in zip(layers, values, strict=True):
        row = LayerMetric(checkpoint_id=checkpoint_id, **columns)
        session.add(row)
        session.flush()
        spectrum = by_name.get((layer.name, layer.method))
        if spectrum is not None and spectrum.evals is not None:
            session.add(
                Spectrum(
                    layer_metric_id=row.id, evals=spectrum.evals, rand_evals=spectrum.rand_evals
                )
            )
    summaries = stat_rows(values, checkpoint_id=checkpoint_id, thresholds=thresholds)
    if summaries:
        session.execute(insert(CheckpointStat), summaries)
    blocks = block_stat_rows(values, checkpoint_id=checkpoint_id, thresholds=thresholds)
    if blocks:
        session.execute(insert(BlockStat), blocks)
    checkpoint = session.get(Checkpoint, checkpoint_id)
    assert checkpoint is not None
    move(job, checkpoint, Event.COMPLETE)
    checkpoint.error = None
    checkpoint.finished_at, checkpoint.analysis_s, checkpoint.device = utcnow(), elapsed_s, device
    weights = weight_rows(values)  # what the checkpoint's counts and statistics are about
    checkpoint.n_layers = len(weights)
    checkpoint.analysis_count += 1
    checkpoint.n_trusted = sum(1 for layer in weights if layer.get("trusted"))
    job.lease_expires_at, job.last_error = None, None
    if gate is not None:
        try:
            # A savepoint: a gate that cannot be evaluated never costs the results.
            with session.begin_nested():
                record_verdict(session, run_id=checkpoint.run_id, check=gate)
        except Exception as exc:
            # A lost connection took the whole transaction with it, results included: swallowed
            # here, the commit would fail as PendingRollbackError; raised, the caller writes the
            # results again on a fresh connection.
            if is_connection_error(exc):
                raise
            log.exception(
                "the gate of run %s could not be evaluated after step %s",
                checkpoint.run_id,
                checkpoint.step,
            )
    return True
