"""End to end on real files and a real database: discover, claim, analyse, write, serve."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alphawatch.cli import analyze_path
from alphawatch.service.api import create_app
from alphawatch.workers.demo_run import train
from alphawatch.workers.watcher import RunDirError, Watcher
from tests.db import rows as _rows
from tests.db import wait_until as _wait
from tests.factories import worker_settings

ROOT = Path(__file__).resolve().parents[2]


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    return run


def test_real_run_is_analysed_and_served(tiny_run: Path, tmp_path: Path, pg_url: str) -> None:
    run = _copy_run(tiny_run, tmp_path)
    settings = worker_settings(pg_url)
    assert Watcher(settings, [run]).run_once() == 3
    # A second pass finds nothing new: results are never computed twice unless asked.
    assert Watcher(settings, [run]).run_once() == 0

    with TestClient(create_app(settings)) as client:
        runs = client.get("/api/v1/runs").json()["runs"]
        assert [r["name"] for r in runs] == ["tiny"]
        run_id = runs[0]["id"]
        trend = client.get(f"/api/v1/runs/{run_id}/trend", params={"filter": "all"}).json()
        assert [p["step"] for p in trend["points"]] == [10, 20, 30]
        assert all(p["n_used"] > 0 for p in trend["points"])
        served = client.get(f"/api/v1/runs/{run_id}/checkpoints/30/layers").json()["layers"]

    direct = analyze_path(run / "checkpoint-30", settings)
    ours = {layer["name"]: layer for layer in served}
    assert set(ours) == {layer["name"] for layer in direct["layers"]}
    for layer in direct["layers"]:
        got = ours[layer["name"]]
        assert got["fit_status"] == layer["fit_status"]
        if layer["alpha"] is not None:
            assert math.isclose(got["alpha"], layer["alpha"], rel_tol=1e-9)
            assert got["num_pl_spikes"] == layer["num_pl_spikes"]
    # Distance from the run's first checkpoint grows from zero.
    first = {
        r[0]: r[1]
        for r in _rows(
            pg_url,
            "SELECT lm.name, lm.distance_from_init FROM "
            "layer_metric lm JOIN checkpoint c ON c.id = lm.checkpoint_id WHERE c.step = 10",
        )
    }
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in first.values() if v is not None)


def test_corrupt_checkpoint_fails_alone(tiny_run: Path, tmp_path: Path, pg_url: str) -> None:
    run = _copy_run(tiny_run, tmp_path)
    bad = run / "checkpoint-15"
    shutil.copytree(run / "checkpoint-10", bad)
    header = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"
    (bad / "model.safetensors").write_bytes(header + b"0" * 64)
    settings = worker_settings(pg_url, max_attempts=1)
    Watcher(settings, [run]).run_once()
    status = dict(_rows(pg_url, "SELECT step, status FROM checkpoint"))
    assert status == {10: "done", 15: "failed", 20: "done", 30: "done"}
    (error,) = _rows(pg_url, "SELECT error FROM checkpoint WHERE step = 15")[0]
    assert "model.safetensors" in error


def test_hostile_tensor_names_are_stored_escaped_and_cut(tmp_path: Path, pg_url: str) -> None:
    """Tensor keys are whatever a file's header says: a NUL byte (which PostgreSQL text cannot
    hold: it stopped the worker), a newline, or thousands of characters (the name column holds
    512) are stored escaped or cut with a hash, and the checkpoint is analysed and served."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    keys = [
        "model.layers.0.mlp.up\x00proj.weight",
        "model.layers.0.mlp.down\nproj.weight",
        *(f"model.layers.0.{'x' * 5000}{end}.weight" for end in "ab"),
    ]
    folder = tmp_path / "runs" / "hostile" / "checkpoint-1"
    folder.mkdir(parents=True)
    save_file(
        {k: torch.randn(48, 32, generator=g) for k in keys}, str(folder / "model.safetensors")
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    settings = worker_settings(pg_url, max_attempts=1)
    assert Watcher(settings, [folder.parent]).run_once() == 1
    assert _rows(pg_url, "SELECT status FROM checkpoint") == [("done",)]
    names = sorted(name for (name,) in _rows(pg_url, "SELECT name FROM layer_metric"))
    assert len(names) == len(set(names)) == 4
    assert "model.layers.0.mlp.up\\x00proj" in names
    assert "model.layers.0.mlp.down\\nproj" in names
    long = [n for n in names if n.startswith("model.layers.0.xxx")]
    assert len(long) == 2 and all(len(n) <= 400 for n in long)
    with TestClient(create_app(settings)) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
        served = client.get(f"/api/v1/runs/{run['id']}/checkpoints/1/layers").json()["layers"]
    assert sorted(layer["name"] for layer in served) == names


def test_checkpoint_deleted_before_reading_is_vanished(
    tiny_run: Path, tmp_path: Path, pg_url: str
) -> None:
    run = _copy_run(tiny_run, tmp_path)
    watcher = Watcher(worker_settings(pg_url), [run])
    watcher.discover_once()
    shutil.rmtree(run / "checkpoint-10")  # rotation by save_total_limit
    while watcher.process_one():
        pass
    status = dict(_rows(pg_url, "SELECT step, status FROM checkpoint"))
    assert status[10] == "vanished"
    assert status[20] == status[30] == "done"


def test_missing_run_dir_is_a_clear_error(tmp_path: Path, pg_url: str) -> None:
    with pytest.raises(RunDirError, match="does not exist"):
        Watcher(worker_settings(pg_url), [tmp_path / "nope"])
    result = subprocess.run(
        [sys.executable, "-m", "alphawatch", "watch", str(tmp_path / "nope"), "--db", pg_url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr


@pytest.mark.slow
def test_killed_worker_job_is_finished_once_by_another(tmp_path: Path, pg_url: str) -> None:
    run = tmp_path / "runs" / "wide"
    # Wide enough that analysing one checkpoint takes a while on 2 cores: ~2.5 s at 1024 wide
    # (512 wide took ~0.6 s, and the worker at times finished before the kill below).
    train(run, steps=2, save_every=2, d_model=1024, n_layers=4, ffn=2752, seq_len=16, batch_size=2)
    env = {
        **os.environ,
        "ALPHAWATCH_LEASE_S": "3",
        "ALPHAWATCH_HEARTBEAT_S": "1",
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "alphawatch", "watch", str(run), "--db", pg_url, "--poll", "0.2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(
            lambda: _rows(pg_url, "SELECT status FROM checkpoint") == [("running",)],
            90,
            "the first worker to start analysing",
        )
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert _rows(pg_url, "SELECT count(*) FROM layer_metric") == [(0,)]
    time.sleep(3.5)  # the lease runs out
    settings = worker_settings(pg_url, lease_s=30.0)
    assert Watcher(settings, [run]).run_once() == 1
    assert _rows(pg_url, "SELECT status FROM checkpoint") == [("done",)]
    (n_layers,) = _rows(pg_url, "SELECT count(*) FROM layer_metric")[0]
    (distinct,) = _rows(pg_url, "SELECT count(DISTINCT name) FROM layer_metric")[0]
    from alphawatch.workers.checkpoints import iter_layers

    expected = sum(1 for _ in iter_layers(run / "checkpoint-2"))
    assert n_layers == distinct == expected > 4 * 7


@pytest.mark.slow
def test_worker_survives_a_database_restart(
    tiny_run: Path, tmp_path: Path, throwaway_cluster: Callable
) -> None:
    cluster = throwaway_cluster()
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    shutil.copytree(tiny_run / "checkpoint-10", run / "checkpoint-10")
    settings = worker_settings(cluster.url)
    watcher = Watcher(settings, [run])
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        _wait(
            lambda: _rows(cluster.url, "SELECT status FROM checkpoint") == [("done",)],
            60,
            "the first checkpoint",
        )
        cluster.stop()
        shutil.copytree(tiny_run / "checkpoint-20", run / "checkpoint-20")
        time.sleep(2.0)  # the worker polls against a dead database meanwhile
        assert thread.is_alive()
        cluster.start()
        _wait(
            lambda: (
                sorted(_rows(cluster.url, "SELECT step, status FROM checkpoint"))
                == [(10, "done"), (20, "done")]
            ),
            90,
            "the checkpoint saved during the outage",
        )
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
