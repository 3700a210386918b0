"""The gate's verdict and a run's stored rules: one evaluation for the API, the CLI and alerts.

The API answers ``GET /runs/{id}/gate`` with :func:`evaluate`; the worker calls it, through
:mod:`alphawatch.service.db.alerts`, in the transaction that stores each analysed checkpoint.
Both read the rules the same way: the server's defaults (``Settings.gate``), then the run's
stored overrides (:func:`stored_rules`), then, for the API only, the query's own.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from alphawatch.gate_rules import GateRules
from alphawatch.service import robust
from alphawatch.service.db.layers import LayerSelection
from alphawatch.service.db.models import (
    Checkpoint,
    CheckpointStatus,
    LayerMetric,
    RunGate,
    utcnow,
)
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import DEFAULT_VARIANT

# What robust.select and robust.untrusted_reason read from a layer row.
_FIELDS = ("alpha", "fit_status", "trusted", "correlation_trap", "rank_collapse")


# How long a later step must have been analysed before a step that was never registered counts as
# skipped: discovery registers every checkpoint a scan finds, but a folder still being written
# when the later one was found may only be registered at the next poll.
SETTLE_S = 30.0


def pending(session: Session, *, run_id: int, step: int | None, settle_s: float = SETTLE_S) -> bool:
    """True while the gate's verdict at ``step`` may still change by analysis alone.

    Without a step: no checkpoint of the run is analysed yet. With one: its checkpoint is
    pending or running, or it is not registered and no later step was analysed at least
    ``settle_s`` seconds ago. An analysed, failed, vanished or skipped checkpoint is settled
    (the keep-up policy moved past a skipped one without it), and so is a step the run moved
    past without it.
    """
    of_run = Checkpoint.run_id == run_id
    done = Checkpoint.status == CheckpointStatus.DONE.value
    if step is None:
        return session.scalar(select(Checkpoint.id).where(of_run, done).limit(1)) is None
    status = _status_at(session, run_id, step)
    if status is not None:
        return status in (CheckpointStatus.PENDING.value, CheckpointStatus.RUNNING.value)
    cutoff = utcnow() - timedelta(seconds=settle_s)
    past = session.scalar(
        select(Checkpoint.id)
        .where(of_run, done, Checkpoint.step > step, Checkpoint.finished_at <= cutoff)
        .limit(1)
    )
    return past is None


def _status_at(session: Session, run_id: int, step: int) -> str | None:
    return session.scalar(
        select(Checkpoint.status).where(Checkpoint.run_id == run_id, Checkpoint.step == step)
    )


def overrides_of(session: Session, *, run_id: int) -> dict[str, Any]:
    """The rules stored for a run (rule name -> value, ``None`` = off); {} when none are."""
    stored = session.scalar(select(RunGate.rules).where(RunGate.run_id == run_id))
    loaded: dict[str, Any] = json.loads(stored) if stored else {}
    return loaded


def stored_rules(session: Session, *, run_id: int, defaults: GateRules) -> GateRules:
    """The server's default rules with the run's stored overrides applied."""
    # Stored rules were validated against the defaults of the server that stored them; a server
    # started with other defaults may find the band empty, and the gate then simply fails.
    return defaults.merged(overrides_of(session, run_id=run_id), empty_band_allowed=True)


def _layers(
    session: Session, checkpoint_id: int, method: str, variant: str
) -> list[dict[str, Any]]:
    result = session.execute(
        select(*[getattr(LayerMetric, f).label(f) for f in _FIELDS]).where(
            LayerMetric.checkpoint_id == checkpoint_id,
            *LayerSelection(method=method, variant=variant).where(),
        )
    )
    return [dict(zip(_FIELDS, row, strict=True)) for row in result]


def _stat_at(
    session: Session,
    checkpoint_id: int,
    rules: GateRules,
    method: str,
    thresholds: Thresholds,
    variant: str,
) -> tuple[float | None, float | None, int]:
    layers = _layers(session, checkpoint_id, method, variant)
    chosen = robust.select(
        layers,
        metric="alpha",
        filter=rules.filter,
        alpha_max=thresholds.alpha_max,
        mad_k=thresholds.mad_k,
    )
    untrusted = sum(1 for layer in layers if robust.untrusted_reason(layer) is not None)
    share = untrusted / len(layers) if layers else None
    return robust.statistic(chosen.values, rules.stat), share, chosen.n_used


def evaluate(
    session: Session,
    *,
    run_id: int,
    rules: GateRules,
    step: int | None,
    method: str,
    thresholds: Thresholds,
    variant: str = DEFAULT_VARIANT,
) -> dict[str, Any]:
    """Check the robust alpha of ``step`` (default: the latest analysed) against ``rules``.

    Returns the verdict: ``passed``, the ``violations`` (rule, value, threshold, message), the
    statistic's ``value`` and the ``untrusted_share`` at ``step``, the ``delta`` since the
    reference step. Rows are one ``variant``'s (the weights by default). No analysed
    checkpoint, or no layer passing the filter, fails the gate.
    """
    done = {
        int(s): int(c)
        for c, s in session.execute(
            select(Checkpoint.id, Checkpoint.step).where(
                Checkpoint.run_id == run_id, Checkpoint.status == CheckpointStatus.DONE.value
            )
        )
    }
    stat = rules.stat
    violations: list[dict[str, Any]] = []
    verdict: dict[str, Any] = {
        "run_id": run_id,
        "stat": stat,
        "filter": rules.filter.value,
        "step": None,
        "value": None,
        "untrusted_share": None,
        "ref_step": rules.ref_step,
        "delta": None,
        "violations": violations,
    }
    if step is None:
        step = max(done) if done else None
    if step is None or step not in done:
        what = "no analysed checkpoint yet" if step is None else f"step {step} is not analysed"
        if step is not None and _status_at(session, run_id, step) == CheckpointStatus.SKIPPED:
            what += " (skipped by the keep-up policy, ALPHAWATCH_KEEP_UP)"
        violations.append(
            {
                "rule": "no_data",
                "value": None,
                "threshold": None,
                "message": f"run {run_id}: {what}",
            }
        )
        verdict.update(step=step, passed=False)
        return verdict
    value, share, n_used = _stat_at(session, done[step], rules, method, thresholds, variant)
    verdict.update(step=step, value=value, untrusted_share=share)

    def violate(rule: str, got: float | None, threshold: float | None, message: str) -> None:
        violations.append({"rule": rule, "value": got, "threshold": threshold, "message": message})

    if value is None:
        violate(
            "no_trusted_layers",
            None,
            None,
            f"step {step}: no layer passed the '{rules.filter.value}' filter, so alpha has "
            "no value",
        )
    else:
        if rules.max_alpha is not None and value > rules.max_alpha:
            violate(
                "max_alpha",
                value,
                rules.max_alpha,
                f"{stat} alpha {value:.3f} at step {step} is above {rules.max_alpha:g}",
            )
        if rules.min_alpha is not None and value < rules.min_alpha:
            violate(
                "min_alpha",
                value,
                rules.min_alpha,
                f"{stat} alpha {value:.3f} at step {step} is below {rules.min_alpha:g}",
            )
    limit = rules.max_untrusted_share
    if limit is not None and share is not None and share > limit:
        violate(
            "max_untrusted_share",
            share,
            limit,
            f"{share:.0%} of layers are untrusted at step {step} (limit {limit:.0%})",
        )
    ref_step = rules.ref_step
    if ref_step is None and rules.max_delta is not None:
        # No reference named: the change since the analysed checkpoint before this one.
        ref_step = max((s for s in done if s < step), default=None)
        verdict["ref_step"] = ref_step
    if ref_step is not None:
        if ref_step not in done:
            violate("no_reference", None, None, f"reference step {ref_step} is not analysed")
        else:
            ref, _, _ = _stat_at(session, done[ref_step], rules, method, thresholds, variant)
            if ref is not None and value is not None:
                delta = value - ref
                verdict["delta"] = delta
                if rules.max_delta is not None and abs(delta) > rules.max_delta:
                    violate(
                        "max_delta",
                        abs(delta),
                        rules.max_delta,
                        f"{stat} alpha moved by {delta:+.3f} since step {ref_step} "
                        f"(limit {rules.max_delta:g})",
                    )
    verdict["passed"] = not violations
    verdict["n_used"] = n_used
    return verdict
