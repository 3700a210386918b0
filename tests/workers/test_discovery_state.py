"""What discovery keeps in the database: races between workers, rewritten checkpoints, errors."""

from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from alphawatch.cli import analyze_path
from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows


def _settings(url: str, root: Path) -> Settings:
    return Settings(
        database_url=url,
        allowed_roots=[root],
        device="cpu",
        settle_s=0.0,
        lease_s=30.0,
        heartbeat_s=0.5,
    )


def test_two_workers_discovering_the_same_new_runs_at_once(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "runs"
    settings = _settings(db_url, root)
    errors: list[BaseException] = []
    rounds = 6
    for n in range(rounds):
        run = root / f"run-{n}"
        shutil.copytree(tiny_run, run)
        # Each worker watches the same new run; they start discovering at the same instant.
        workers = [Watcher(settings, [run]) for _ in range(2)]
        barrier = threading.Barrier(len(workers))

        def discover(worker: Watcher, barrier: threading.Barrier) -> None:
            barrier.wait()
            try:
                worker._retry("discover", worker.discover_once)
            except BaseException as exc:  # the assertion below shows what ended a worker
                errors.append(exc)

        threads = [threading.Thread(target=discover, args=(w, barrier)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    per_path = _rows(db_url, "SELECT path, count(*) FROM run GROUP BY path")
    assert sorted(count for _, count in per_path) == [1] * rounds
    assert _rows(db_url, "SELECT count(*), count(DISTINCT run_id) FROM checkpoint") == [
        (3 * rounds, rounds)
    ]
    assert _rows(db_url, "SELECT count(*) FROM analysis_job WHERE status = 'queued'") == [
        (3 * rounds,)
    ]
    assert _rows(db_url, "SELECT count(*) FROM run WHERE discovery_error IS NOT NULL") == [(0,)]


def _alphas(url: str, step: int) -> dict[str, float]:
    return dict(
        _rows(
            url,
            "SELECT lm.name, lm.alpha FROM layer_metric lm JOIN checkpoint c "
            f"ON c.id = lm.checkpoint_id WHERE c.step = {step}",
        )
    )


def test_checkpoint_rewritten_in_place_is_analysed_again(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "tiny"
    folder = run / "checkpoint-10"
    shutil.copytree(tiny_run / "checkpoint-10", folder)
    settings = _settings(db_url, root)
    watcher = Watcher(settings, [run])
    assert watcher.run_once() == 1
    before = _alphas(db_url, 10)

    # Same folder, new content (the weights of step 30, same size): the fingerprint changes.
    shutil.copy(tiny_run / "checkpoint-30" / "model.safetensors", folder / "model.safetensors")
    assert watcher.run_once() == 1
    after = _alphas(db_url, 10)
    expected = {
        layer["name"]: layer["alpha"]
        for layer in analyze_path(tiny_run / "checkpoint-30", settings)["layers"]
    }
    assert set(after) == set(before) == set(expected)  # replaced, not added beside
    assert after != before
    for name, alpha in expected.items():
        assert math.isclose(after[name], alpha, rel_tol=1e-9), name
    assert watcher.run_once() == 0  # unchanged since: not analysed a third time
    # Step 10 is the run's first checkpoint: its distance from itself is 0, so its matrices
    # were read again, not taken from memory of the files before the rewrite.
    distances = _rows(
        db_url, "SELECT distance_from_init FROM layer_metric WHERE distance_from_init IS NOT NULL"
    )
    assert distances and all(d == 0.0 for (d,) in distances)

    with TestClient(create_app(settings)) as client:
        run_id = client.get("/api/v1/runs").json()["runs"][0]["id"]
        (listed,) = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()["checkpoints"]
    assert listed["status"] == "done"
    assert listed["analysis_count"] == 2
    assert listed["rewritten_at"] is not None


def test_checkpoint_led_outside_after_analysis_keeps_results_and_says_why(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "tiny"
    shutil.copytree(tiny_run / "checkpoint-10", run / "checkpoint-10")
    outside = tmp_path / "outside" / "checkpoint-10"
    shutil.copytree(tiny_run / "checkpoint-20", outside)
    settings = _settings(db_url, root)
    watcher = Watcher(settings, [run])
    watcher.run_once()
    layers = _alphas(db_url, 10)

    (run / "checkpoint-10").rename(tmp_path / "kept")
    (run / "checkpoint-10").symlink_to(outside, target_is_directory=True)
    assert watcher.run_once() == 0
    ((status, error),) = _rows(db_url, "SELECT status, discovery_error FROM checkpoint")
    assert status == "done"
    assert "checkpoint-10" in error and "outside the allowed roots" in error
    assert _alphas(db_url, 10) == layers  # the results of what was analysed stay

    (run / "checkpoint-10").unlink()
    (tmp_path / "kept").rename(run / "checkpoint-10")
    os.utime(run / "checkpoint-10" / "model.safetensors")
    watcher.run_once()
    assert _rows(db_url, "SELECT status, discovery_error FROM checkpoint") == [("done", None)]


def test_a_run_that_cannot_be_listed_is_recorded_and_the_others_go_on(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "runs"
    good, gone = root / "good", root / "gone"
    shutil.copytree(tiny_run / "checkpoint-10", good / "checkpoint-10")
    shutil.copytree(tiny_run / "checkpoint-10", gone / "checkpoint-10")
    settings = _settings(db_url, root)
    watcher = Watcher(settings, [good, gone])
    (gone / "checkpoint-10").rename(tmp_path / "elsewhere")
    gone.rmdir()
    gone.symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # not a run any more
    watcher.run_once()
    runs = dict(_rows(db_url, "SELECT name, discovery_error FROM run"))
    assert runs["good"] is None
    assert "run folder" in runs["gone"] and "outside the allowed roots" in runs["gone"]
    assert _rows(db_url, "SELECT status FROM checkpoint") == [("done",)]
