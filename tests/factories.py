"""Runs, checkpoints and layer rows written into a test database the worker's way.

Everything goes through the job queue (register, claim, complete), so what a test reads back
was stored by the same code that stores a real analysis: the checkpoint summary, the kept
statistics and, given a ``GateCheck``, the gate's verdict and any alert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from alphawatch.service.db import queue, registry, results
from alphawatch.service.db.alerts import GateCheck
from alphawatch.service.db.rows import LayerRow, SpectrumRow
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds

Row = dict[str, Any]

# The steps of random_run's checkpoints.
STEPS = (100, 200, 300)
# Llama-style projections: what a block holds, and the names random rows get.
KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def worker_settings(url: str, **extra: object) -> Settings:
    """A worker's settings for tests: CPU, no settle time, fast polls and heartbeats."""
    values: dict[str, object] = {
        "database_url": url,
        "device": "cpu",
        "settle_s": 0.0,
        "poll_interval_s": 0.2,
        "lease_s": 30.0,
        "heartbeat_s": 0.5,
    }
    values.update(extra)
    return Settings(**values)


def layer_row(
    name: str = "model.layers.0.mlp.up_proj",
    *,
    kind: str = "up",
    block: int | None = 0,
    alpha: float = 3.0,
    **metrics: Any,
) -> Row:
    """One layer as ``results.complete`` takes it: a trusted ``ww`` fit unless ``metrics`` say
    otherwise (any ``LayerResult.metrics()`` key, e.g. ``fit_status="poor_fit"``)."""
    row: Row = {
        "name": name,
        "kind": kind,
        "block": block,
        "method": "ww",
        "fit_status": "ok",
        "trusted": True,
        "correlation_trap": False,
        "rank_collapse": False,
        "alpha": alpha,
    }
    row.update(metrics)
    return row


def register_run(
    url: str,
    *,
    name: str,
    steps: Iterable[int],
    path: str | None = None,
    checkpoint_path: str = "/r/{step}",
) -> int:
    """The run ``name`` (at ``/runs/<name>`` unless ``path``) with a pending checkpoint per
    step, as discovery registers them; its id. ``checkpoint_path`` is formatted with ``step``
    and ``name``."""
    with session_scope(make_engine(url)) as session:
        run_id = registry.ensure_run(session, name=name, path=path or f"/runs/{name}")
        for step in steps:
            registry.register_checkpoint(
                session,
                run_id=run_id,
                step=step,
                path=checkpoint_path.format(step=step, name=name),
                fingerprint="x",
                fmt="hf",
            )
    return run_id


def complete_next(
    url: str,
    *,
    layers: Callable[[int], list[Row]],
    spectra: Callable[[list[Row]], list[Row]] | None = None,
    elapsed_s: Callable[[int], float] | float = 0.1,
    thresholds: Thresholds | None = None,
    gate: GateCheck | None = None,
) -> tuple[int, list[Row]]:
    """Claims the next queued checkpoint and completes it with ``layers(step)`` (and
    ``spectra(rows)``); its step and the rows stored."""
    engine = make_engine(url)
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="t", lease_s=60)
    assert job is not None, "no checkpoint was waiting to be analysed"
    rows = layers(job.step)
    elapsed = elapsed_s(job.step) if callable(elapsed_s) else elapsed_s
    with session_scope(engine) as session:
        assert results.complete(
            session,
            job_id=job.job_id,
            worker_id="t",
            layers=[LayerRow.from_mapping(row) for row in rows],
            spectra=[SpectrumRow(**s) for s in spectra(rows)] if spectra else [],
            device="cpu",
            elapsed_s=elapsed,
            thresholds=thresholds or (gate.thresholds if gate else Thresholds()),
            gate=gate,
        )
    return job.step, rows


def analysed_run(
    url: str,
    *,
    name: str,
    steps: Iterable[int],
    layers: Callable[[int], list[Row]],
    path: str | None = None,
    checkpoint_path: str = "/r/{step}",
    spectra: Callable[[list[Row]], list[Row]] | None = None,
    elapsed_s: Callable[[int], float] | float = 0.1,
    thresholds: Thresholds | None = None,
    gate: GateCheck | None = None,
) -> dict[int, list[Row]]:
    """A run whose checkpoints at ``steps`` are all analysed: :func:`register_run`, then
    :func:`complete_next` once per step, in the order the queue hands them out (a caller's
    random generator is drawn in that order, as before). The rows stored, by step."""
    steps = list(steps)
    register_run(url, name=name, steps=steps, path=path, checkpoint_path=checkpoint_path)
    written: dict[int, list[Row]] = {}
    for _ in steps:
        step, rows = complete_next(
            url,
            layers=layers,
            spectra=spectra,
            elapsed_s=elapsed_s,
            thresholds=thresholds,
            gate=gate,
        )
        written[step] = rows
    return written


def random_layers(rng: np.random.Generator, *, blocks: int = 4) -> list[Row]:
    """The :data:`KINDS` of ``blocks`` blocks, alpha spread over [1.5, 9.5] (some above the
    alpha_max of 8), about a quarter poor_fit or unstable and one in ten trapped."""
    rows = []
    for block in range(blocks):
        for kind in KINDS:
            alpha = float(rng.uniform(1.5, 9.5))
            status = "ok" if rng.random() > 0.25 else str(rng.choice(["poor_fit", "unstable"]))
            trap = bool(rng.random() < 0.1)
            rows.append(
                layer_row(
                    f"model.layers.{block}.{kind}_proj",
                    kind=kind,
                    block=block,
                    alpha=alpha,
                    fit_status=status,
                    correlation_trap=trap,
                    trusted=status == "ok" and not trap,
                    D=float(rng.uniform(0, 0.2)),
                    stable_rank=float(rng.uniform(1, 50)),
                    xmin=1.0,
                    xmax=10.0,
                    num_pl_spikes=20,
                )
            )
    return rows


def random_run(url: str, name: str = "run-a", seed: int = 0) -> dict[int, list[Row]]:
    """The run ``name`` analysed at :data:`STEPS`: :func:`random_layers` and a Pareto spectrum
    per layer, all drawn from ``seed``. The rows stored, by step."""
    rng = np.random.default_rng(seed)

    def spectra(rows: list[Row]) -> list[Row]:
        evals = np.sort(rng.pareto(2.0, 64) + 1).astype(np.float32).tobytes()
        return [
            {"name": row["name"], "method": "ww", "evals": evals, "rand_evals": None}
            for row in rows
        ]

    return analysed_run(
        url, name=name, steps=STEPS, layers=lambda _: random_layers(rng), spectra=spectra
    )
