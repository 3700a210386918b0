"""The CI gate: one verdict with every violated rule, from the same robust statistics."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from alphawatch.service import robust
from alphawatch.service.api import queries
from alphawatch.service.api.errors import Invalid
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import DEFAULT_VARIANT, Statistic


def _stat_at(*, session: Session, run_id: int, checkpoint_id: int, stat: str, filter: str,
             method: str, thresholds: Thresholds, variant: str = DEFAULT_VARIANT
             ) -> tuple[float | None, float | None, int]:
    layers = queries.layer_dicts(session=session, checkpoint_ids=[checkpoint_id], method=method,
                                 variant=variant)
    chosen = robust.select(layers, metric="alpha", filter=filter,
                           alpha_max=thresholds.alpha_max, mad_k=thresholds.mad_k)
    untrusted = sum(1 for layer in layers if robust.untrusted_reason(layer) is not None)
    share = untrusted / len(layers) if layers else None
    return robust.statistic(chosen.values, stat), share, chosen.n_used


def evaluate(
    *, session: Session, run_id: int, stat: str, filter: str, step: int | None,
    min_alpha: float | None, max_alpha: float | None, max_untrusted_share: float | None,
    ref_step: int | None, max_delta: float | None, method: str, thresholds: Thresholds,
    variant: str = DEFAULT_VARIANT,
) -> dict[str, Any]:
    """Check the robust alpha of ``step`` (default: latest analysed) against the thresholds."""
    if not Statistic(stat).is_level:
        levels = ", ".join(s for s in Statistic if s.is_level)
        raise Invalid(f"stat {stat} is a spread, not a level of alpha that a band can gate; "
                      f"choose one of {levels}")
    queries.get_run(session=session, run_id=run_id)
    done = {s: c for c, s in queries.done_checkpoints(session=session, run_id=run_id)}
    violations: list[dict[str, Any]] = []
    verdict: dict[str, Any] = {"run_id": run_id, "stat": stat, "filter": filter, "step": None,
                               "value": None, "untrusted_share": None, "ref_step": ref_step,
                               "delta": None, "violations": violations}
    if step is None:
        step = max(done) if done else None
    if step is None or step not in done:
        what = "no analysed checkpoint yet" if step is None else f"step {step} is not analysed"
        violations.append({"rule": "no_data", "value": None, "threshold": None,
                           "message": f"run {run_id}: {what}"})
        verdict.update(step=step, passed=False)
        return verdict
    value, share, n_used = _stat_at(session=session, run_id=run_id, checkpoint_id=done[step],
                                    stat=stat, filter=filter, method=method, thresholds=thresholds,
                                    variant=variant)
    verdict.update(step=step, value=value, untrusted_share=share)

    def violate(rule: str, got: float | None, threshold: float | None, message: str) -> None:
        violations.append({"rule": rule, "value": got, "threshold": threshold,
                           "message": message})

    if value is None:
        violate("no_trusted_layers", None, None,
                f"step {step}: no layer passed the '{filter}' filter, so alpha has no value")
    else:
        if max_alpha is not None and value > max_alpha:
            violate("max_alpha", value, max_alpha,
                    f"{stat} alpha {value:.3f} at step {step} is above {max_alpha:g}")
        if min_alpha is not None and value < min_alpha:
            violate("min_alpha", value, min_alpha,
                    f"{stat} alpha {value:.3f} at step {step} is below {min_alpha:g}")
    if max_untrusted_share is not None and share is not None and share > max_untrusted_share:
        violate("max_untrusted_share", share, max_untrusted_share,
                f"{share:.0%} of layers are untrusted at step {step} "
                f"(limit {max_untrusted_share:.0%})")
    if ref_step is not None:
        if ref_step not in done:
            violate("no_reference", None, None, f"reference step {ref_step} is not analysed")
        else:
            ref, _, _ = _stat_at(session=session, run_id=run_id, checkpoint_id=done[ref_step],
                                 stat=stat, filter=filter, method=method, thresholds=thresholds,
                                 variant=variant)
            if ref is not None and value is not None:
                delta = value - ref
                verdict["delta"] = delta
                if max_delta is not None and abs(delta) > max_delta:
                    violate("max_delta", abs(delta), max_delta,
                            f"{stat} alpha moved by {delta:+.3f} since step {ref_step} "
                            f"(limit {max_delta:g})")
    verdict["passed"] = not violations
    verdict["n_used"] = n_used
    return verdict
