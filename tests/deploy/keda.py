"""What KEDA's postgresql scaler does with deploy/k8s/worker-scaledjob.yaml, done here."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests import pg

# PyYAML comes with the dev extra only; without it the tests that use this module are skipped.
yaml = pytest.importorskip("yaml")

SCALED_JOB = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "worker-scaledjob.yaml"


def scaled_job() -> dict:
    return dict(yaml.safe_load(SCALED_JOB.read_text()))


def keda_query() -> str:
    """The trigger's query, as KEDA reads it from the manifest."""
    (trigger,) = scaled_job()["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


def keda_answer(url: str) -> int:
    """The query's single integer, in a session of its own (as KEDA polls)."""
    with psycopg.connect(pg.libpq_dsn(url), autocommit=True) as conn:
        row = conn.execute(keda_query()).fetchone()
    assert row is not None
    return int(row[0])


def new_jobs(*, queue_length: int, running: int, pending: int, max_replicas: int) -> int:
    """Workers KEDA starts this poll: its ``accurate`` scaling strategy with a target value of 1
    (``accurateScalingStrategy`` in KEDA's pkg/scaling/executor/scale_jobs.go).

    ``running``: jobs not finished; ``pending``: those of them not yet at work.
    """
    max_scale = min(queue_length, max_replicas)
    if max_scale + running - pending > max_replicas:
        return max(0, max_replicas - running)
    return max(0, max_scale - pending)
