"""KEDA without a cluster: a scaler loop starts and stops real GPU-worker processes from the
manifest's query, over a real backlog, and nothing is lost or analysed twice.

One ``alphawatch watch --discover-only`` process fills the queue from checkpoint files the test
writes, as deploy/k8s/discovery.yaml does. Ten times a second the loop below runs the ScaledJob's
query on PostgreSQL, as KEDA's postgresql trigger does, and starts workers with the ScaledJob's
own command line (``--max-jobs``, ``--exit-when-idle``) by KEDA's ``accurate`` strategy, up to
``maxReplicaCount`` (3 here). Two workers are stopped just after a claim, the way Kubernetes
stops a pod: one is sent SIGTERM and finishes its checkpoint within its grace period, the other
is sent SIGTERM twice (as when a grace period runs out) and gives its job back. The fleet goes
0 → 3 → 0 by itself: workers exit when nothing has been claimable for a while.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from alphawatch.cli import build_parser
from tests import pg
from tests.db import rows, wait_until
from tests.deploy.keda import keda_answer, new_jobs, scaled_job
from tests.workers.small import write_busy_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MAX_WORKERS = 3
RUNS, STEPS = 2, 4
MATRICES = 12  # per checkpoint: a second or more of work, so a signal lands mid-analysis
TIMEOUT_S = 150


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    stopped: str | None = None  # how it was stopped mid-analysis, if it was

    def outcome(self) -> str | None:
        """What its stop did to the job in hand, read from its log once it has exited."""
        text = self.log.read_text()
        if "given back to the queue" in text:
            return "give back"
        signalled = text.find("finishing the job in hand")
        if 0 <= signalled < text.rfind(" layers in "):
            return "finish"  # the analysis in hand went on after the signal, and was written
        return None


@dataclass
class Fleet:
    url: str
    tmp: Path
    env: dict[str, str]
    argv: list[str]
    workers: list[Worker] = field(default_factory=list)

    def start(self) -> None:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "alphawatch", *self.argv, "--db", self.url],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=out,
            )
        self.workers.append(Worker(proc, log))

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def holding(self, conn: psycopg.Connection) -> dict[int, tuple[Worker, float]]:
        """Live workers holding a job, by the job's id, with the seconds since its claim."""
        held = conn.execute(
            "SELECT j.worker_id, j.id, extract(epoch FROM now() - c.started_at) "
            "FROM analysis_job j JOIN checkpoint c ON c.id = j.checkpoint_id "
            "WHERE j.status = 'running'"
        ).fetchall()
        return {
            int(job): (w, float(age))
            for w in self.alive()
            for holder, job, age in held
            if holder and f":{w.proc.pid}:" in holder
        }


def _worker_argv() -> list[str]:
    """The ScaledJob's command, for this machine: CPU, the test's folder, quick idle exit."""
    (container,) = scaled_job()["spec"]["jobTargetRef"]["template"]["spec"]["containers"]
    argv = list(container["command"][1:])
    args = build_parser().parse_args(argv)
    assert args.command == "watch" and args.max_jobs and args.exit_when_idle
    values = {"--device": "cpu", "--exit-when-idle": "3", "--health-port": "0"}
    out: list[str] = []
    for arg in argv:
        out.append(values.get(out[-1], arg) if out and out[-1] in values else arg)
    assert out[-1] == "/runs"  # the volume; here the runs come from discovery's registrations
    return [*out[:-1], "--poll", "0.2"]


@pytest.mark.slow
def test_keda_scales_real_workers_zero_to_n_to_zero_without_losing_a_job(
    tmp_path: Path, pg_url: str
) -> None:
    root = tmp_path / "runs"
    for r in range(RUNS):
        for step in range(1, STEPS + 1):
            write_busy_checkpoint(root / f"run-{r}", step, seed=10 * r + step, matrices=MATRICES)
    total = RUNS * STEPS
    env = {
        **os.environ,
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_ALLOWED_ROOTS": f'["{root}"]',
        "ALPHAWATCH_HEARTBEAT_S": "0.5",
        "ALPHAWATCH_LEASE_S": "30",
        "ALPHAWATCH_STOP_GRACE_S": "60",
    }
    argv = _worker_argv()
    fleet = Fleet(pg_url, tmp_path, env, argv)
    discovery = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alphawatch",
            "watch",
            "--discover-only",
            *(str(root / f"run-{r}") for r in range(RUNS)),
            "--db",
            pg_url,
            "--poll",
            "0.2",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    history: list[tuple[float, int, int]] = []  # (seconds, claimable, live workers) per poll
    to_stop = ["finish", "give back"]  # what a stop mid-analysis must show, once each
    tries = 0
    started = time.monotonic()
    try:
        with psycopg.connect(pg.libpq_dsn(pg_url), autocommit=True) as conn:
            while time.monotonic() - started < TIMEOUT_S:
                depth = keda_answer(pg_url)
                alive = fleet.alive()
                holding = fleet.holding(conn)
                history.append((round(time.monotonic() - started, 1), depth, len(alive)))
                (done,) = conn.execute(
                    "SELECT count(*) FROM checkpoint WHERE status = 'done'"
                ).fetchone() or (0,)
                if done == total and not alive:
                    break
                for _ in range(
                    new_jobs(
                        queue_length=depth,
                        running=len(alive),
                        pending=len(alive) - len(holding),
                        max_replicas=MAX_WORKERS,
                    )
                ):
                    fleet.start()
                # A stop whose job was done before the signal showed nothing: it is tried again.
                for w in fleet.workers:
                    if w.stopped and w.proc.poll() is not None and w.outcome() != w.stopped:
                        to_stop.append(w.stopped)
                        w.stopped = "missed"
                # Once the fleet has reached its maximum, busy workers are stopped as Kubernetes
                # stops pods: SIGTERM (finish within the grace), or twice (give back at once).
                busy = sorted((age, i) for i, (w, age) in enumerate(holding.values()))
                workers = list(holding.values())
                fresh = [workers[i][0] for _, i in busy if not workers[i][0].stopped]
                if to_stop and fresh and max(n for _, _, n in history) == MAX_WORKERS:
                    tries += 1
                    worker = fresh[0]  # the latest claim: the most analysis still ahead
                    worker.stopped = to_stop.pop(0)
                    worker.proc.send_signal(signal.SIGTERM)
                    if worker.stopped == "give back":
                        time.sleep(0.05)
                        worker.proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
            else:
                raise AssertionError(f"the backlog was not worked off in {TIMEOUT_S} s: {history}")
    finally:
        for w in fleet.alive():
            w.proc.kill()
        discovery.send_signal(signal.SIGTERM)
        discovery.wait(timeout=30)
    trace = tmp_path / "history.txt"  # read it when an assertion below fails
    trace.write_text("\n".join(" ".join(map(str, h)) for h in history))

    # 0 → N → 0: no worker before there was work, the maximum while there was, none after.
    assert history[0][1:] == (0, 0), trace
    assert max(n for _, _, n in history) == MAX_WORKERS
    assert history[-1][1:] == (0, 0)
    # Every worker ended by itself (idle) or by its SIGTERM, with status 0.
    assert [w.proc.returncode for w in fleet.workers] == [0] * len(fleet.workers)
    # Each kind of stop landed mid-analysis once (a stop that came too late is tried again).
    assert to_stop == [] and tries <= 6
    assert sorted(w.outcome() for w in fleet.workers if w.stopped in {"finish", "give back"}) == [
        "finish",
        "give back",
    ]

    # Nothing lost, nothing twice: each checkpoint analysed once, on the attempt that counted
    # (the job given back cost no attempt), with one set of layer rows.
    checkpoints = rows(
        pg_url,
        "SELECT c.status, c.analysis_count, j.attempts, j.status FROM checkpoint c "
        "JOIN analysis_job j ON j.checkpoint_id = c.id",
    )
    assert sorted(checkpoints) == [("done", 1, 1, "done")] * total
    per_checkpoint = rows(
        pg_url,
        "SELECT count(*) FROM layer_metric GROUP BY checkpoint_id",
    )
    assert [n for (n,) in per_checkpoint] == [MATRICES] * total
    assert discovery.returncode == 0
    wait_until(lambda: keda_answer(pg_url) == 0, 5, "the query to read 0")
