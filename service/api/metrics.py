"""``/metrics``: Prometheus metrics read from the database at each scrape.

The API and the workers are separate processes (often on separate machines), so nothing is
counted in memory: a custom collector turns a few aggregate queries into metric families, one
query per group of families whatever the number of runs, and no per-layer label (a series per
layer of every run would swamp Prometheus).

Per run (label ``run``, the run's name), at its latest analysed checkpoint:
``alphawatch_run_alpha{run,stat}`` (the robust statistics kept at write time, trusted layers,
the worker's fit method), ``alphawatch_run_untrusted_ratio``, ``alphawatch_run_last_step``, and
``alphawatch_run_gate_passed`` (1/0: the verdict the worker recorded with the run's gate rules).
Totals: ``alphawatch_checkpoints_analyzed_total{status}`` (done counts every completed analysis,
re-analyses included; failed and vanished count checkpoints), the
``alphawatch_checkpoint_analysis_seconds`` histogram (the latest analysis of each checkpoint),
``alphawatch_checkpoints{status}``, ``alphawatch_queue_depth`` and ``alphawatch_runs``.
Lag (how far analysis is behind training): ``alphawatch_queue_oldest_seconds`` (the
longest-queued job), and per run ``alphawatch_run_lag_checkpoints`` (waiting: queued or being
analysed) and ``alphawatch_run_lag_seconds`` (age of its longest-waiting checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from alphawatch.service.db import lag, queue
from alphawatch.service.db.models import (
    Checkpoint,
    CheckpointStat,
    CheckpointStatus,
    Run,
    RunGate,
)
from alphawatch.service.db.session import utcnow
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import DEFAULT_FILTER, DEFAULT_OUTLIER_RULE, Statistic

# The text format Prometheus 2 and 3 both read; prometheus-client writes exactly this.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a small checkpoint on a GPU (seconds) to a large one on a CPU (hours).
ANALYSIS_BUCKETS_S = (
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    4 * 3600.0,
)
LEVELS = tuple(s.value for s in Statistic if s.is_level)


class DatabaseCollector(Collector):
    """Every alphawatch metric, from the database the session reads."""

    def __init__(self, session: Session, *, method: str, thresholds: Thresholds) -> None:
        self.session = session
        self.method = method
        self.thresholds = thresholds
        # One instant for every age of a scrape, so the ages compare with each other.
        self.now = utcnow()

    def collect(self) -> Iterator[Metric]:
        yield from self._checkpoints()
        yield from self._runs()
        yield from self._lag()
        yield self._gate()
        yield self._durations()

    def _checkpoints(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "alphawatch_checkpoints", "Checkpoints by analysis status.", labels=["status"]
        )
        analyzed = CounterMetricFamily(
            "alphawatch_checkpoints_analyzed",
            "Checkpoint analyses finished: done counts every completed analysis (re-analyses "
            "too), failed and vanished count checkpoints.",
            labels=["status"],
        )
        completed = 0
        ended = dict.fromkeys((CheckpointStatus.FAILED.value, CheckpointStatus.VANISHED.value), 0)
        for status, count, analyses in self.session.execute(
            select(
                Checkpoint.status,
                func.count(),
                func.coalesce(func.sum(Checkpoint.analysis_count), 0),
            ).group_by(Checkpoint.status)
        ):
            by_status.add_metric([status], count)
            completed += int(analyses)
            if status in ended:
                ended[status] = int(count)
        analyzed.add_metric([CheckpointStatus.DONE.value], completed)
        for status, count in ended.items():
            analyzed.add_metric([status], count)
        yield by_status
        yield analyzed
        queued = lag.backlog(self.session)
        yield GaugeMetricFamily(
            "alphawatch_queue_depth",
            "Jobs a worker could claim: queued, or running under a lease that ran out "
            "(the count deploy/k8s/ scales GPU workers on).",
            value=queue.depth(self.session),
        )
        yield GaugeMetricFamily(
            "alphawatch_queue_oldest_seconds",
            "Seconds the longest-queued job has waited since its checkpoint was queued "
            "(0 when the queue is empty).",
            value=lag.seconds_since(queued.oldest_since, self.now) or 0.0,
        )
        yield GaugeMetricFamily(
            "alphawatch_runs",
            "Runs known.",
            value=self.session.scalar(select(func.count()).select_from(Run)) or 0,
        )

    def _runs(self) -> Iterator[Metric]:
        alpha = GaugeMetricFamily(
            "alphawatch_run_alpha",
            "Robust statistic of alpha over the trusted layers of the "
            "run's latest analysed checkpoint.",
            labels=["run", "stat"],
        )
        untrusted = GaugeMetricFamily(
            "alphawatch_run_untrusted_ratio",
            "Share of untrusted layers at the run's latest analysed checkpoint.",
            labels=["run"],
        )
        last_step = GaugeMetricFamily(
            "alphawatch_run_last_step",
            "Step of the run's latest analysed checkpoint.",
            labels=["run"],
        )
        done = Checkpoint.status == CheckpointStatus.DONE.value
        latest = (
            select(Checkpoint.run_id, func.max(Checkpoint.step).label("step"))
            .where(done)
            .group_by(Checkpoint.run_id)
            .subquery()
        )
        kept = and_(
            CheckpointStat.checkpoint_id == Checkpoint.id,
            CheckpointStat.method == self.method,
            CheckpointStat.metric == "alpha",
            CheckpointStat.filter == DEFAULT_FILTER.value,
            CheckpointStat.outliers == DEFAULT_OUTLIER_RULE.value,
            CheckpointStat.kinds == "",
            CheckpointStat.alpha_max == self.thresholds.alpha_max,
        )
        rows = self.session.execute(
            select(
                Run.name,
                Checkpoint.step,
                Checkpoint.n_layers,
                Checkpoint.n_trusted,
                CheckpointStat.n_used,
                *[getattr(CheckpointStat, s) for s in LEVELS],
            )
            .join(latest, latest.c.run_id == Run.id)
            .join(
                Checkpoint,
                and_(Checkpoint.run_id == Run.id, Checkpoint.step == latest.c.step, done),
            )
            .outerjoin(CheckpointStat, kept)
        )
        for name, step, n_layers, n_trusted, n_used, *values in rows:
            last_step.add_metric([name], step)
            if n_layers:
                untrusted.add_metric([name], (n_layers - (n_trusted or 0)) / n_layers)
            if n_used:
                for stat, value in zip(LEVELS, values, strict=True):
                    if value is not None:
                        alpha.add_metric([name, stat], value)
        yield alpha
        yield untrusted
        yield last_step

    def _lag(self) -> Iterator[Metric]:
        checkpoints = GaugeMetricFamily(
            "alphawatch_run_lag_checkpoints",
            "Checkpoints of the run waiting for analysis (queued or being analysed).",
            labels=["run"],
        )
        seconds = GaugeMetricFamily(
            "alphawatch_run_lag_seconds",
            "Seconds the run's longest-waiting checkpoint has waited since it was queued "
            "(0 when none waits).",
            labels=["run"],
        )
        # Every run gets both series, 0 when it keeps up: an alert on "> 0 for 10m" needs the
        # series to exist before the run falls behind.
        for waiting in lag.waiting(self.session).values():
            checkpoints.add_metric([waiting.run], waiting.checkpoints)
            seconds.add_metric(
                [waiting.run], lag.seconds_since(waiting.oldest_since, self.now) or 0.0
            )
        yield checkpoints
        yield seconds

    def _gate(self) -> Metric:
        passed = GaugeMetricFamily(
            "alphawatch_run_gate_passed",
            "1 when the run's gate passed at its latest analysed "
            "checkpoint, 0 when it failed (as recorded by the worker).",
            labels=["run"],
        )
        for name, verdict in self.session.execute(
            select(Run.name, RunGate.passed)
            .join(RunGate, RunGate.run_id == Run.id)
            .where(RunGate.passed.is_not(None))
        ):
            passed.add_metric([name], 1.0 if verdict else 0.0)
        return passed

    def _durations(self) -> Metric:
        seconds = Checkpoint.analysis_s
        counts = self.session.execute(
            select(
                func.count(seconds),
                func.coalesce(func.sum(seconds), 0.0),
                *[
                    func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0)
                    for bound in ANALYSIS_BUCKETS_S
                ],
            ).where(seconds.is_not(None))
        ).one()
        total, sum_s, *cumulative = counts
        buckets = [
            (str(float(bound)), float(n))
            for bound, n in zip(ANALYSIS_BUCKETS_S, cumulative, strict=True)
        ]
        buckets.append(("+Inf", float(total)))
        return HistogramMetricFamily(
            "alphawatch_checkpoint_analysis_seconds",
            "Wall-clock seconds of each checkpoint's latest analysis.",
            buckets=buckets,
            sum_value=float(sum_s),
        )


def metrics_text(*, session: Session, method: str, thresholds: Thresholds) -> bytes:
    """Every metric in Prometheus' text format."""
    return generate_latest(DatabaseCollector(session, method=method, thresholds=thresholds))
