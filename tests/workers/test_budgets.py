"""Hostile checkpoints against a real worker process: budgets, refusals, dead workers counted.

Every hostile input is a real file (see ``tests/workers/hostile.py``), the worker is a real
``alphawatch watch`` process with its analysis child, and memory is read from ``/proc`` by the
test itself, not reported by the code under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from alphawatch.service.db import queue, registry
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.workers.budget import resident_mb
from alphawatch.workers.checkpoints import CheckpointError, iter_layers
from alphawatch.workers.watcher import Watcher, _Heartbeat
from tests.db import rows as _rows
from tests.db import wait_until as _wait
from tests.workers import hostile

ROOT = Path(__file__).resolve().parents[2]
MEMORY_MB = 600
TIMEOUT_S = 15


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _total_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class _MemoryProbe(threading.Thread):
    """Samples the worker's resident memory and its children's anonymous memory."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.worker_peak = 0.0
        self.child_peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            self.worker_peak = max(self.worker_peak, _total_rss_mb(self.pid))
            for child in _children(self.pid):
                self.child_peak = max(self.child_peak, resident_mb(child) or 0.0)


@contextmanager
def _worker(run: Path, url: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    values = {
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
        "ALPHAWATCH_JOB_MEMORY_MB": str(MEMORY_MB),
        "ALPHAWATCH_JOB_TIMEOUT_S": str(TIMEOUT_S),
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "alphawatch", "watch", str(run), "--db", url, "--poll", "0.2"],
        cwd=ROOT,
        env={**os.environ, **values},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    "name", [n for n, (_, words) in hostile.HOSTILE.items() if "budget" not in words]
)
def test_lying_and_exploding_files_are_refused_before_allocating(name: str, tmp_path: Path) -> None:
    build, words = hostile.HOSTILE[name]
    folder = build(tmp_path, 1)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=words):
        list(iter_layers(folder))
    assert not list(tmp_path.rglob(hostile.PWNED))  # nothing in it ever ran
    # Refused from the declarations, not after materialising what they declare.
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_hostile_checkpoints_fail_alone_under_a_real_worker(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    run = tmp_path / "runs" / "mixed"
    shutil.copytree(tiny_run, run)
    expected_layers = {
        int(p.name.split("-")[1]): sum(1 for _ in iter_layers(p)) for p in run.glob("checkpoint-*")
    }
    steps: dict[int, tuple[str, str, str]] = {}
    for offset, (name, (build, words)) in enumerate(hostile.HOSTILE.items()):
        folder = build(run, 101 + offset)
        steps[101 + offset] = (name, words, folder.name)
    every = len(expected_layers) + len(steps)

    with _worker(run, db_url, ALPHAWATCH_MAX_ATTEMPTS="2") as proc:
        probe = _MemoryProbe(proc.pid)
        probe.start()
        try:
            _wait(
                lambda: (
                    len(
                        _rows(
                            db_url,
                            "SELECT id FROM checkpoint WHERE status IN "
                            "('done', 'failed', 'vanished')",
                        )
                    )
                    == every
                ),
                240,
                "every checkpoint to be finished",
            )
        finally:
            probe.stop.set()
            probe.join(timeout=5)
        assert proc.poll() is None, "the worker died"

    status = {
        step: (state, error)
        for step, state, error in _rows(db_url, "SELECT step, status, error FROM checkpoint")
    }
    layers = dict(
        _rows(
            db_url,
            "SELECT c.step, count(*) FROM layer_metric l "
            "JOIN checkpoint c ON c.id = l.checkpoint_id GROUP BY c.step",
        )
    )
    for step, n in expected_layers.items():
        assert status[step] == ("done", None)
        assert layers[step] == n > 0
    for step, (name, words, folder_name) in steps.items():
        state, error = status[step]
        assert state == "failed", f"{name}: {state}"
        assert words in error and folder_name in error, f"{name}: {error}"
        assert step not in layers
    assert not list(run.rglob(hostile.PWNED))  # no payload ever ran
    # The memory bomb asked for 4 GiB: its child was stopped near the budget (it is polled
    # every 20 ms), and the worker itself never held a checkpoint's data.
    assert probe.child_peak < MEMORY_MB * 1.25, probe.child_peak
    assert probe.worker_peak < 1024, probe.worker_peak


def _running_attempt(url: str) -> int | None:
    rows = _rows(
        url,
        "SELECT j.attempts FROM analysis_job j JOIN checkpoint c "
        "ON c.id = j.checkpoint_id WHERE c.status = 'running'",
    )
    return int(rows[0][0]) if rows else None


@pytest.mark.slow
def test_worker_killed_every_time_is_given_up_after_max_attempts(
    tmp_path: Path, db_url: str
) -> None:
    run = tmp_path / "runs" / "killer"
    hostile.time_bomb(run, 1)
    env = {
        "ALPHAWATCH_LEASE_S": "2",
        "ALPHAWATCH_HEARTBEAT_S": "0.5",
        "ALPHAWATCH_MAX_ATTEMPTS": "2",
        "ALPHAWATCH_JOB_TIMEOUT_S": "600",
    }
    for attempt in (1, 2):
        with _worker(run, db_url, **env) as proc:
            _wait(
                lambda a=attempt: _running_attempt(db_url) == a, 120, f"attempt {attempt} to start"
            )
            children = _children(proc.pid)
            assert children
            proc.send_signal(signal.SIGKILL)  # as the OOM killer would
            proc.wait(timeout=30)
            # The analysis child does not outlive its worker.
            _wait(
                lambda c=children: (
                    not any(Path(f"/proc/{p}").exists() and resident_mb(p) for p in c)
                ),
                30,
                "the orphaned analysis process to stop",
            )
    with _worker(run, db_url, **env) as proc:
        _wait(
            lambda: _rows(db_url, "SELECT status FROM checkpoint") == [("failed",)],
            120,
            "the checkpoint to be given up",
        )
        assert proc.poll() is None
    ((attempts, job_status),) = _rows(db_url, "SELECT attempts, status FROM analysis_job")
    ((error,),) = _rows(db_url, "SELECT error FROM checkpoint")
    assert (attempts, job_status) == (2, "failed")
    assert "given up after 2 attempts" in error and "died" in error


@pytest.mark.slow
def test_analysis_process_killed_by_the_kernel_is_counted_then_given_up(
    tmp_path: Path, db_url: str
) -> None:
    run = tmp_path / "runs" / "oom"
    hostile.time_bomb(run, 1)
    env = {"ALPHAWATCH_MAX_ATTEMPTS": "2", "ALPHAWATCH_JOB_TIMEOUT_S": "600"}
    with _worker(run, db_url, **env) as proc:
        for attempt in (1, 2):
            _wait(
                lambda a=attempt: _running_attempt(db_url) == a, 120, f"attempt {attempt} to start"
            )
            # The worker starts its analysis process before it claims a job: this is the one
            # analysing. The kernel's OOM killer picks it, the largest process.
            (child,) = _children(proc.pid)
            os.kill(child, signal.SIGKILL)
        _wait(
            lambda: _rows(db_url, "SELECT status FROM checkpoint") == [("failed",)],
            60,
            "the checkpoint to be given up",
        )
        assert proc.poll() is None, "the worker died with its analysis process"
    ((error,),) = _rows(db_url, "SELECT error FROM checkpoint")
    assert "died of SIGKILL" in error and "out of memory" in error


def test_heartbeat_stops_renewing_after_the_budget(pg_url: str) -> None:
    settings = Settings(database_url=pg_url, device="cpu", lease_s=1.0, heartbeat_s=0.2)
    with session_scope(make_engine(pg_url)) as session:
        run = registry.ensure_run(session, name="r", path="/runs/r")
        registry.register_checkpoint(
            session, run_id=run, step=1, path="/runs/r/1", fingerprint="f", fmt="hf"
        )
    watcher = Watcher(settings)
    with session_scope(watcher.engine) as session:
        job = queue.claim(session, worker_id=watcher.worker_id, lease_s=1.0)
    assert job is not None
    beat = _Heartbeat(watcher, job.job_id, budget_s=1.5)
    beat.start()
    time.sleep(1.2)
    with session_scope(watcher.engine) as session:
        assert queue.requeue_stale(session) == 0  # renewed while within the budget
    beat.join(timeout=5)
    assert not beat.is_alive() and not beat.lost  # it gave up renewing by itself
    time.sleep(1.2)
    with session_scope(watcher.engine) as session:
        assert queue.requeue_stale(session) == 1  # the stuck job's lease ran out


def test_budgets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from alphawatch.workers.budget import budget_of, default_memory_mb

    monkeypatch.delenv("ALPHAWATCH_JOB_MEMORY_MB", raising=False)
    monkeypatch.delenv("ALPHAWATCH_JOB_TIMEOUT_S", raising=False)
    default = budget_of(Settings())
    with open("/proc/meminfo") as meminfo:
        total_mb = int(meminfo.readline().split()[1]) / 1024
    assert default.memory_mb == default_memory_mb()
    assert 0 < default.memory_mb <= 0.75 * total_mb + 1  # a container's limit may be lower
    assert default.timeout_s >= 3600  # generous: a large model on CPU takes a while
    monkeypatch.setenv("ALPHAWATCH_JOB_MEMORY_MB", "512")
    monkeypatch.setenv("ALPHAWATCH_JOB_TIMEOUT_S", "30")
    budget = budget_of(Settings())
    assert (budget.memory_mb, budget.timeout_s) == (512, 30)
    monkeypatch.setenv("ALPHAWATCH_JOB_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="job_timeout_s"):
        Settings()
